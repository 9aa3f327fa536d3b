"""`make worker`: a Prefect process worker for the pool, on this host, with the deployments in place.

    python -m flows.worker [--pool llm-gpu]

Starts the local Prefect server if none answers, creates the pool and deployments, then becomes
the worker process itself (exec), so Ctrl-C or a kill reaches the worker and leaves no orphan.
"""

from __future__ import annotations

import argparse
import os

import flows  # noqa: F401  (environment defaults)
from flows import servers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default="llm-gpu")
    parser.add_argument("--node-rank", type=int, default=None,
                        help="this host's place in several-host pretraining (pretrain.nodes): the worker also "
                             "serves the work queue node-R, where that host's share of the run waits")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_API_URL", servers.ensure_prefect())
    from flows.deploy import deploy
    for name in deploy(args.pool):
        print(f"deployed {name}")
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")  # pick runs up within seconds
    command = [servers.bin_path("prefect"), "worker", "start", "--pool", args.pool, "--type", "process"]
    if args.node_rank is not None:   # its node's queue, and (node 0, where dvc runs) every other stage's
        from flows.remote import node_queue
        queues = [node_queue(args.node_rank)] + (["default"] if args.node_rank == 0 else [])
        command += [flag for queue in queues for flag in ("--work-queue", queue)]
    print("$ " + " ".join(command[1:]), flush=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
