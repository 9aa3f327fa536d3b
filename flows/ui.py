"""`make ui` / `make stop`: the Prefect and MLflow UIs on 127.0.0.1.

    python -m flows.ui start     start both (if not already up) and print their URLs
    python -m flows.ui stop      stop the servers this project started
"""

from __future__ import annotations

import argparse

import flows  # noqa: F401  (environment defaults)
from flows import servers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.ui", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    args = parser.parse_args(argv)
    if args.action == "stop":
        for name in ("prefect", "mlflow"):
            print(f"{name}: {'stopped' if servers.stop(name) else 'not started by this project'}")
        return
    prefect_api = servers.ensure_prefect(port=args.prefect_port)
    mlflow_url = servers.ensure_mlflow(port=args.mlflow_port)
    print(f"Prefect UI: {prefect_api.removesuffix('/api')}")
    print(f"MLflow UI:  {mlflow_url}")
    print("Stop both with `make stop`.")


if __name__ == "__main__":
    main()
