"""Running a stage on a Prefect work pool (a GPU host's worker) instead of in the DVC process.

With `execution.mode: pool` in params.yaml, the stages listed in `execution.stages` do not run
their flow in the `dvc repro` process: it submits the flow as a run of that stage's deployment on
the pool, streams the run's logs, and waits. The run fails the DVC stage if it fails; if no
worker picks it up within `pickup_timeout_s`, or it outlasts `timeout_s`, it is cancelled and the
stage fails: it never hangs.

Deployments come from `python -m flows.deploy` (or `make worker`, which also starts a worker).
On one host the worker runs in this repository, so the outputs land where DVC expects them. Across
hosts, share the repository folder (NFS) or push outputs to a DVC remote from the worker.
"""

from __future__ import annotations

import os
import time

from flows.run_id import PIPELINE_RUN_ENV

DEPLOYMENT = "pipeline"
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", PIPELINE_RUN_ENV, "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class RemoteRunFailed(RuntimeError):
    pass


def run_on_pool(stage: str, params_json: dict, pickup_timeout_s: float, timeout_s: float,
                poll_s: float = 1.0) -> None:
    """Submit `stage` to its deployment, stream its logs, wait for it to finish."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    if not os.environ.get("PREFECT_API_URL"):
        raise RemoteRunFailed("execution.mode 'pool' needs a Prefect server: run through `make run`, "
                              "or export PREFECT_API_URL")
    env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    try:
        flow_run = run_deployment(f"{stage}/{DEPLOYMENT}", parameters={"params": params_json}, timeout=0,
                                  as_subflow=False, job_variables={"env": env},
                                  tags=[f"stage:{stage}", f"pipeline:{os.environ.get(PIPELINE_RUN_ENV, '')}"])
    except Exception as err:  # an unknown deployment comes back as a 404 from the API
        raise RemoteRunFailed(f"could not submit {stage!r} to its deployment ({err}); create the deployments "
                              "with `python -m flows.deploy --pool NAME` (or `make worker`)") from err
    print(f"submitted {stage} as flow run {flow_run.name} ({flow_run.id}); waiting for a worker", flush=True)
    with get_client(sync_client=True) as client:
        _wait(client, flow_run.id, stage, pickup_timeout_s, timeout_s, poll_s)


def _wait(client, flow_run_id, stage: str, pickup_timeout_s: float, timeout_s: float, poll_s: float) -> None:
    started = time.monotonic()
    printed = 0
    while True:
        state = client.read_flow_run(flow_run_id).state
        printed += _print_new_logs(client, flow_run_id, printed)
        if state is not None and state.is_final():
            break
        waited = time.monotonic() - started
        if state is not None and (state.is_scheduled() or state.is_pending()) and waited > pickup_timeout_s:
            _cancel(client, flow_run_id)
            raise RemoteRunFailed(f"no worker picked up {stage!r} within {pickup_timeout_s:.0f} s: start one on "
                                  "the pool (`make worker`); the flow run was cancelled")
        if waited > timeout_s:
            _cancel(client, flow_run_id)
            raise RemoteRunFailed(f"{stage!r} did not finish within {timeout_s:.0f} s; the flow run was cancelled")
        time.sleep(poll_s)
    _print_new_logs(client, flow_run_id, printed)
    if not state.is_completed():
        raise RemoteRunFailed(f"{stage!r} flow run ended {state.name}: {state.message or 'see its logs above'}")


def _print_new_logs(client, flow_run_id, already: int) -> int:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                            sort=LogSort.TIMESTAMP_ASC, offset=already)
    for log in logs:
        print(f"[worker] {log.message}", flush=True)
    return len(logs)


def _cancel(client, flow_run_id) -> None:
    from prefect.states import Cancelled

    client.set_flow_run_state(flow_run_id, Cancelled(message="cancelled by the DVC stage"), force=True)
