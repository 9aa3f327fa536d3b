"""Where served models come from: model folders and a real (SQLite) MLflow registry; and a server
started from a `models:/NAME@ALIAS` URI, with a queue of one, answering 429 when full."""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import pytest

from serving.loading import (
    DEFAULT_MODEL,
    ModelNotFound,
    check_model_dir,
    default_name,
    load_model_dir,
    resolve_model,
    tracking_uri,
)

from test_serving_support import make_model_dir, running


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # A long context, so that one request can keep the tiny model busy for a second.
    return make_model_dir(tmp_path_factory.mktemp("served") / "model", context_length=1024)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, model_dir):
    """A SQLite MLflow registry with one run whose artifacts are a model folder, registered as
    `tiny` and given the alias `champion`."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("serving-test", artifact_location=(root / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        mlflow.log_artifacts(str(model_dir), "model")
        source = mlflow.get_artifact_uri("model")
    version = mlflow.register_model(source, "tiny")
    mlflow.MlflowClient().set_registered_model_alias("tiny", "champion", version.version)
    return uri


def test_a_model_folder_is_checked_and_named(model_dir, tmp_path, monkeypatch):
    check_model_dir(model_dir)
    model, tokenizer = load_model_dir(model_dir)
    assert tokenizer.vocab_size <= model.config.vocab_size and not model.training
    assert default_name(str(model_dir), model_dir) == model_dir.parent.name  # ".../<name>/model"
    assert default_name("models:/tiny@champion", model_dir) == "tiny@champion"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="model.safetensors.*tokenizer"):
        check_model_dir(tmp_path / "empty")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFound, match="make run"):  # the default, before the pipeline has run
        resolve_model(DEFAULT_MODEL)


def test_mismatched_tokenizer_and_model_are_refused(tmp_path):
    folder = make_model_dir(tmp_path / "m", vocab_size=50)  # fewer embeddings than tokenizer ids
    with pytest.raises(ModelNotFound, match="do not belong together"):
        load_model_dir(folder)


def test_registry_uris_resolve_to_the_logged_folder(registry, model_dir):
    folder = resolve_model("models:/tiny@champion", registry)
    assert json.loads((folder / "config.json").read_text()) == json.loads((model_dir / "config.json").read_text())
    assert resolve_model("models:/tiny/1", registry) == folder
    with pytest.raises(ModelNotFound, match="models:/tiny@nope"):
        resolve_model("models:/tiny@nope", registry)
    missing = registry.replace("mlflow.db", "missing.db")
    with pytest.raises(ModelNotFound, match="no MLflow database"):  # and none is created
        resolve_model("models:/tiny@champion", missing)
    assert not os.path.exists(missing.removeprefix("sqlite:///"))
    assert tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_a_server_started_from_the_registry_sheds_load_with_429(registry):
    env = {"MLFLOW_TRACKING_URI": registry}
    with running("--model", "models:/tiny@champion", "--max-batch-size", "1", "--max-queue", "0",
                 "--max-tokens", "1000", env=env) as server:
        body = {"model": "tiny@champion", "prompt": "Hello", "max_tokens": 1000, "temperature": 0}

        async def burst():  # room for one request at a time: of ten at once, most are refused
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                return await asyncio.gather(*[client.post("/v1/completions", json=body) for _ in range(10)])

        responses = asyncio.run(burst())
        statuses = sorted(r.status_code for r in responses)
        assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"

        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert client.get("/v1/models").json()["data"][0]["id"] == "tiny@champion"
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as long_running:
                next(long_running.iter_lines())  # started; the client then goes away
            # The server notices, cancels the request in the engine and frees its slot.
            deadline = time.monotonic() + 10
            while (again := client.post("/v1/completions", json={**body, "max_tokens": 1})
                   ).status_code == 429 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert again.status_code == 200, again.text
        assert server.stop(presses=2) < 20  # an impatient double Ctrl-C must not leave workers behind
