"""The whole pipeline: `make run` = `python -m flows.pipeline`.

Runs `dvc repro` (so only stages whose inputs changed run again) as one Prefect flow run, against a
local Prefect server that is started if none answers: every stage then appears in the Prefect UI
at once and skips starting an ephemeral API for each stage. All stages share one pipeline-run id,
which tags their Prefect flow runs and groups their MLflow runs under one parent run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import flows  # noqa: F401  (environment defaults)
from flows import servers
from flows.run_id import PIPELINE_RUN_ENV, pipeline_run_id


def repro(args: list[str]) -> int:
    from prefect import flow, tags

    @flow(name="pipeline", log_prints=True)
    def pipeline_flow(dvc_args: list[str]) -> int:
        env = dict(os.environ)
        # Stages run `python -m flows.<stage>`: make that python this virtualenv's.
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        command = [servers.bin_path("dvc"), "repro", *dvc_args]
        print("$ " + " ".join(["dvc", "repro", *dvc_args]))
        code = subprocess.run(command, env=env).returncode
        if code != 0:
            raise RuntimeError(f"dvc repro exited with code {code}")
        return code

    with tags(f"pipeline:{os.environ[PIPELINE_RUN_ENV]}"):
        pipeline_flow(args)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any further arguments go to `dvc repro`, e.g. `python -m flows.pipeline pretrain --force`.")
    parser.add_argument("--no-server", action="store_true",
                        help="don't start a Prefect server; each stage uses an ephemeral API (slower)")
    args, dvc_args = parser.parse_known_args(argv)
    if not args.no_server and "PREFECT_API_URL" not in os.environ:
        os.environ["PREFECT_API_URL"] = servers.ensure_prefect()
    os.environ.setdefault(PIPELINE_RUN_ENV, pipeline_run_id())
    try:
        repro(dvc_args)
    except RuntimeError as err:
        sys.exit(f"error: {err}")
    if "PREFECT_API_URL" in os.environ:
        print(f"\nPrefect UI: {os.environ['PREFECT_API_URL'].removesuffix('/api')}   "
              "MLflow UI: `make ui` (stop the servers with `make stop`)")


if __name__ == "__main__":
    main()
