"""Running a stage on a Prefect work pool (a GPU host's worker) instead of in the DVC process.

With `execution.mode: pool` in params.yaml, the stages listed in `execution.stages` do not run
their flow in the `dvc repro` process: it submits the flow as a run of that stage's deployment on
the pool, streams the run's logs, and waits. The run fails the DVC stage if it fails; if no
worker picks it up within `pickup_timeout_s`, or it outlasts `timeout_s`, it is cancelled and the
stage fails: it never hangs.

Deployments come from `python -m flows.deploy` (or `make worker`, which also starts a worker).
On one host the worker runs in this repository, so the outputs land where DVC expects them. Across
hosts, share the repository folder (NFS) or push outputs to a DVC remote from the worker.

Pretraining on several hosts (`pretrain.nodes: N`): the stage submits N runs of the same
deployment, run R with the parameter node_rank=R on the work queue `node-R`, which the worker of
host R serves (`python -m flows.worker --node-rank R`; node 0 is the host named in
pretrain.rendezvous). They are waited for together: one that fails or is not picked up cancels
the others.
"""

from __future__ import annotations

import os
import time

from flows.run_id import PIPELINE_RUN_ENV

DEPLOYMENT = "pipeline"
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", PIPELINE_RUN_ENV, "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class RemoteRunFailed(RuntimeError):
    pass


def node_queue(rank: int) -> str:
    """The work queue of host `rank` in a several-host run."""
    return f"node-{rank}"


def run_on_pool(stage: str, params_json: dict, pickup_timeout_s: float, timeout_s: float,
                poll_s: float = 1.0, nodes: int = 1) -> None:
    """Submit `stage` to its deployment (once per node), stream the logs, wait for it to finish."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    if not os.environ.get("PREFECT_API_URL"):
        raise RemoteRunFailed("execution.mode 'pool' needs a Prefect server: run through `make run`, "
                              "or export PREFECT_API_URL")
    env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    runs = {}   # label in messages -> flow run id
    for rank in range(nodes):
        label = f"{stage!r}" + (f" (node {rank})" if nodes > 1 else "")
        parameters, queue = ({"params": params_json}, None) if nodes == 1 else \
            ({"params": params_json, "node_rank": rank}, node_queue(rank))
        try:
            flow_run = run_deployment(f"{stage}/{DEPLOYMENT}", parameters=parameters, timeout=0, as_subflow=False,
                                      job_variables={"env": env}, work_queue_name=queue,
                                      tags=[f"stage:{stage}", f"pipeline:{os.environ.get(PIPELINE_RUN_ENV, '')}"])
        except Exception as err:  # an unknown deployment comes back as a 404 from the API
            with get_client(sync_client=True) as client:
                for submitted in runs.values():
                    _cancel(client, submitted)
            raise RemoteRunFailed(f"could not submit {label} to its deployment ({err}); create the deployments "
                                  "with `python -m flows.deploy --pool NAME` (or `make worker`)") from err
        runs[label] = flow_run.id
        print(f"submitted {label} as flow run {flow_run.name} ({flow_run.id})"
              + (f" on work queue {queue}" if queue else "") + "; waiting for a worker", flush=True)
    with get_client(sync_client=True) as client:
        _wait(client, runs, pickup_timeout_s, timeout_s, poll_s, nodes > 1)


def _wait(client, runs: dict, pickup_timeout_s: float, timeout_s: float, poll_s: float, several: bool) -> None:
    """Wait until every run has finished; the first that fails or is late cancels all that are not."""
    started = time.monotonic()
    printed = dict.fromkeys(runs, 0)
    states = {}
    while True:
        for label, flow_run_id in runs.items():
            states[label] = client.read_flow_run(flow_run_id).state
            printed[label] += _print_new_logs(client, flow_run_id, printed[label], label if several else "worker")
        if all(state is not None and state.is_final() for state in states.values()):
            break
        waited = time.monotonic() - started
        failed = [label for label, state in states.items() if state is not None and state.is_final()
                  and not state.is_completed()]
        waiting = [label for label, state in states.items() if state is not None
                   and (state.is_scheduled() or state.is_pending())]
        problem = None
        if failed:
            problem = f"{failed[0]} flow run ended {states[failed[0]].name}: {states[failed[0]].message or 'see its logs above'}"
        elif waiting and waited > pickup_timeout_s:
            queue = "its node's queue (`python -m flows.worker --node-rank R`)" if several else "the pool (`make worker`)"
            problem = f"no worker picked up {waiting[0]} within {pickup_timeout_s:.0f} s: start one on {queue}"
        elif waited > timeout_s:
            problem = f"{', '.join(runs)} did not finish within {timeout_s:.0f} s"
        if problem:
            for label, state in states.items():
                if state is None or not state.is_final():
                    _cancel(client, runs[label])
            raise RemoteRunFailed(f"{problem}; the unfinished flow run(s) were cancelled")
        time.sleep(poll_s)
    for label, flow_run_id in runs.items():
        _print_new_logs(client, flow_run_id, printed[label], label if several else "worker")
    for label, state in states.items():
        if not state.is_completed():
            raise RemoteRunFailed(f"{label} flow run ended {state.name}: {state.message or 'see its logs above'}")


def _print_new_logs(client, flow_run_id, already: int, source: str) -> int:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                            sort=LogSort.TIMESTAMP_ASC, offset=already)
    for log in logs:
        print(f"[{source}] {log.message}", flush=True)
    return len(logs)


def _cancel(client, flow_run_id) -> None:
    from prefect.states import Cancelled

    client.set_flow_run_state(flow_run_id, Cancelled(message="cancelled by the DVC stage"), force=True)
