"""Create the work pool and one deployment per stage, so stages can run on a worker.

    python -m flows.deploy --pool llm-gpu      # then: prefect worker start --pool llm-gpu

Each deployment runs this repository's flow files in place (the worker's working directory is
this repository), so on one host the outputs land in the DVC workspace.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

import flows  # noqa: F401  (environment defaults)
from flows.remote import DEPLOYMENT

STAGES = ("download", "tokenizer", "pack", "pretrain", "classify", "instruct", "judge", "export")


def existing_stages(root: Path) -> list[str]:
    return [s for s in STAGES if (root / "flows" / f"{s}.py").exists()]


def deploy(pool: str, root: Path | None = None) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    root = (root or Path.cwd()).resolve()
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass
    created = []
    for stage in existing_stages(root):
        flow = getattr(importlib.import_module(f"flows.{stage}"), f"{stage}_flow")
        source = flow.from_source(source=str(root), entrypoint=f"flows/{stage}.py:{stage}_flow")
        source.deploy(name=DEPLOYMENT, work_pool_name=pool, job_variables={"working_dir": str(root)},
                      print_next_steps=False, build=False, push=False)
        created.append(f"{stage}/{DEPLOYMENT}")
    return created


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default="llm-gpu", help="work pool name (created if missing)")
    args = parser.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        from flows import servers
        os.environ["PREFECT_API_URL"] = servers.ensure_prefect()
    for name in deploy(args.pool):
        print(f"deployed {name} on pool {args.pool}")


if __name__ == "__main__":
    main()
