"""Stages on a Prefect work pool: a real server, a real process worker, a real `dvc repro`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid

import pytest
import yaml

import sample_sources as samples
from conftest import VENV_BIN, dvc, run, stage_env

pytestmark = pytest.mark.e2e


def write_params(repo, sources, **execution):
    params = {"project": {"name": "testllm", "experiment": "tests"},
              "execution": {"mode": "pool", "stages": ["download"], **execution},
              "download": {"sources": sources, "retries": 0}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def flow_run_states(deployment_name: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name])))
            return [r.state.type.value for r in runs]
    return asyncio.run(read())


@pytest.fixture
def worker(pipeline_repo, prefect_api):
    pool = f"test-{uuid.uuid4().hex[:6]}"
    env = stage_env(pipeline_repo, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1")
    run([str(VENV_BIN / "python"), "-m", "flows.deploy", "--pool", pool], pipeline_repo, env)
    process = subprocess.Popen([str(VENV_BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                               cwd=pipeline_repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    yield pool
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_stage_runs_on_the_pool_and_failures_fail_dvc(pipeline_repo, worker, tmp_path):
    repo = pipeline_repo
    folder = samples.text_folder(tmp_path)
    source = {"name": "texts", "uri": f"file:{folder}", "role": "pretrain", "include": ["*.txt"]}
    write_params(repo, [source], pool=worker, pickup_timeout_s=90, timeout_s=300)
    result = dvc(repo, "repro", "download")
    assert "[worker]" in result.stdout  # the worker's logs were streamed to the DVC stage
    assert (repo / "data/download/sources/texts/documents.jsonl").exists()
    assert flow_run_states("pipeline").count("COMPLETED") >= 1

    write_params(repo, [{**source, "sha256": "e" * 64}], pool=worker, pickup_timeout_s=90, timeout_s=300)
    failed = dvc(repo, "repro", "download", check=False)
    assert failed.returncode != 0
    assert "'download' flow run ended Failed" in failed.stdout + failed.stderr


def test_no_worker_fails_after_the_pickup_timeout_and_cancels(pipeline_repo, prefect_api, tmp_path):
    repo = pipeline_repo
    pool = f"empty-{uuid.uuid4().hex[:6]}"
    env = stage_env(repo)
    run([str(VENV_BIN / "python"), "-m", "flows.deploy", "--pool", pool], repo, env)
    folder = samples.text_folder(tmp_path)
    write_params(repo, [{"name": "texts", "uri": f"file:{folder}", "role": "pretrain"}], pool=pool,
                 pickup_timeout_s=3, timeout_s=60)
    result = dvc(repo, "repro", "download", check=False)
    assert result.returncode != 0
    assert "no worker picked up 'download' within 3 s" in result.stdout + result.stderr
    assert "CANCELLED" in flow_run_states("pipeline")
