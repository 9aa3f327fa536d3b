"""The download stage end to end: real `dvc repro`, a real Prefect server, a real MLflow database."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

import sample_sources as samples
from conftest import VENV_BIN, dvc, run, stage_env

pytestmark = pytest.mark.e2e


def write_params(repo, sources, **download):
    params = {"project": {"name": "testllm", "experiment": "tests"},
              "download": {"sources": sources, "retries": 0, "timeout_s": 10, **download}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def completed_flow_runs(name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))
    return [r for r in asyncio.run(read()) if r.state and r.state.is_completed()]


def test_dvc_repro_download_every_scheme(pipeline_repo, prefect_api, tmp_path):
    repo = pipeline_repo
    env = stage_env(repo, **samples.pip_offline_env(tmp_path))
    before = len(completed_flow_runs("download"))
    with samples.http_server(tmp_path / "served") as url:
        write_params(repo, samples.sources_yaml(tmp_path, url))
        run(["git", "add", "-A"], repo)
        run(["git", "commit", "-qm", "pipeline"], repo)
        dvc(repo, "repro", "download", env=env)

    out = repo / "data/download/sources"
    assert sorted(p.name for p in out.iterdir()) == ["alpaca", "hub", "poems", "sms", "texts"]
    manifest = json.loads((out / "sms/manifest.json").read_text())
    assert manifest["documents"] == 3 and len(manifest["sha256"]) == 64
    texts = [json.loads(line)["text"] for line in (out / "texts/documents.jsonl").read_text().splitlines()]
    assert texts[0] == samples.NOVEL.replace("\r\n", "\n")
    metrics = json.loads((repo / "data/download/metrics.json").read_text())
    assert metrics["sources"] == 5 and metrics["per_source"]["alpaca"]["skipped"] == 1

    # MLflow: one run of the stage, nested under its pipeline run, with params and metrics.
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    [stage_run] = client.search_runs([experiment.experiment_id], "tags.`llm.stage` = 'download'")
    assert stage_run.info.status == "FINISHED"
    assert stage_run.data.params["download.sources.2.role"] == "classify"
    assert stage_run.data.metrics["documents"] == metrics["documents"]
    parent_id = stage_run.data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).data.tags["llm.pipeline_run_id"] == stage_run.data.tags["llm.pipeline_run_id"]

    # Prefect: a completed flow run, recorded by the server.
    assert len(completed_flow_runs("download")) == before + 1

    # Nothing changed: DVC skips the stage.
    assert "up to date" in dvc(repo, "repro", "download", env=env).stdout
    shown = dvc(repo, "metrics", "show", "--json", env=env).stdout
    assert '"documents"' in shown
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "lock"], repo)
    # One knob changed from the command line, as an experiment DVC can list.
    dvc(repo, "exp", "run", "download", "-S", "download.timeout_s=30", env=env)
    assert '"timeout_s": 30' in dvc(repo, "exp", "show", "--json", env=env).stdout.replace("\n", "")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["download"]["timeout_s"] = 20
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "download.timeout_s" in dvc(repo, "params", "diff", env=env).stdout


def test_wrong_sha256_fails_the_stage_and_writes_nothing(pipeline_repo, prefect_api, tmp_path):
    repo = pipeline_repo
    folder = samples.text_folder(tmp_path)
    write_params(repo, [
        {"name": "good", "uri": f"file:{folder}", "role": "pretrain", "include": ["*.txt"]},
        {"name": "bad", "uri": f"file:{folder}", "role": "pretrain", "sha256": "c" * 64},
    ])
    result = dvc(repo, "repro", "download", check=False)
    assert result.returncode != 0
    assert "source 'bad': sha256 mismatch" in result.stdout + result.stderr
    # The first source was written before the second failed: none of it may remain.
    assert not (repo / "data/download/sources").exists()
    assert not list((repo / "data/download").glob(".sources.tmp-*"))
    assert not (repo / "dvc.lock").exists()


def test_unknown_params_key_stops_before_any_work(pipeline_repo, tmp_path):
    repo = pipeline_repo
    write_params(repo, [{"name": "a", "uri": "file:x.txt", "role": "pretrain"}], retry=3)
    env = stage_env(repo, PREFECT_API_URL="http://127.0.0.1:9/api")  # nothing there: must not be needed
    result = run([str(VENV_BIN / "python"), "-m", "flows.download"], repo, env, check=False)
    assert result.returncode != 0
    assert "unknown key 'download.retry'; allowed keys: sources, cache_dir, timeout_s, retries" in result.stderr
    assert not (repo / "data").exists()


def test_killed_mid_download_leaves_no_partial_output(pipeline_repo, prefect_api, tmp_path):
    repo = pipeline_repo
    folder = samples.text_folder(tmp_path)
    served = tmp_path / "served"
    served.mkdir()
    env = stage_env(repo)
    with samples.http_server(served, slow_seconds=60) as url:
        write_params(repo, [
            {"name": "texts", "uri": f"file:{folder}", "role": "pretrain", "include": ["*.txt"]},
            {"name": "stalls", "uri": f"{url}/slow/big.txt", "role": "pretrain", "sha256": "d" * 64},
        ])
        stage = subprocess.Popen([str(VENV_BIN / "python"), "-m", "flows.download"], cwd=repo, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        partial = repo / "data/download"
        deadline = time.monotonic() + 120
        # Wait until the first source sits in the temporary folder and the second is downloading.
        while not list(partial.glob(".sources.tmp-*/texts/manifest.json")):
            assert stage.poll() is None and time.monotonic() < deadline, "stage ended before it could be killed"
            time.sleep(0.2)
        stage.send_signal(signal.SIGKILL)
        stage.wait()
    assert not (partial / "sources").exists()

    # The next run sweeps the killed run's temporary folder away and completes.
    write_params(repo, [{"name": "texts", "uri": f"file:{folder}", "role": "pretrain", "include": ["*.txt"]}])
    run([str(VENV_BIN / "python"), "-m", "flows.download"], repo, env)
    assert (partial / "sources/texts/documents.jsonl").exists()
    assert not list(partial.glob(".sources.tmp-*"))
