"""The instruct stage's snapshots: the real flow (Prefect, MLflow) on a tiny base model and a few
Alpaca records, then the real server over HTTP on the model folder it wrote."""

from __future__ import annotations

import json
import random

import httpx
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from llm.checkpoint import load_checkpoint, save_model_dir
from llm.model import GPT, ModelConfig
from llm.snapshots import SNAPSHOTS_DIR, list_steps, load_snapshot, read_record
from llm.tokenizer import USER, train_char

from conftest import drain_flow_workers
from test_serving_support import running

WORDS = "cat dog bird fish tree house river stone cloud light".split()
PROBE = "Repeat the word cat twice."


def records(n: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(1, 3))
        out.append({"instruction": "Reverse the words.", "input": " ".join(words), "output": " ".join(words[::-1])})
    return out


def workspace(root):
    """What the instruct stage reads: a base model folder and one downloaded instruct source."""
    data = records()
    tokenizer = train_char([" ".join(r.values()) for r in data] + [PROBE], progress=False)
    torch.manual_seed(0)
    base = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=96, n_layer=2, n_head=2, d_model=32))
    save_model_dir(base, tokenizer, root / "data/pretrain/model")
    source = root / "data/download/sources/alpaca"
    source.mkdir(parents=True)
    (source / "manifest.json").write_text(json.dumps({"role": "instruct"}))
    (source / "documents.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))


def run_stage(root, monkeypatch, **instruct) -> dict:
    from flows._stage import main
    from flows.instruct import instruct_flow

    settings = {"epochs": 2, "batch_size": 4, "lr": 0.003, "warmup_steps": 2, "eval_every": 2, "threads": 1,
                "device": "cpu", "progress": False, "max_test_items": 2, "max_new_tokens": 4,
                "register_model": False, "snapshots": {"keep": 3, "probe_text": PROBE, "tokens": 16}}
    params = {"project": {"name": "snaps", "experiment": "instruct-snapshots"},
              "download": {"sources": [{"name": "alpaca", "uri": "file:x.json", "role": "instruct"}]},
              "instruct": {**settings, **instruct}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("LLM_PIPELINE_RUN_ID", "instruct-snapshots-test")   # main sets it: restored after the test
    try:
        main(instruct_flow, "instruct", ["--params", str(root / "params.yaml")])
    finally:
        drain_flow_workers()
    return json.loads((root / "data/instruct/metrics.json").read_text())


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Equal up to float16 rounding (snapshots keep half precision)."""
    return all(torch.allclose(x, y, rtol=2e-3, atol=1e-4) for x, y in zip(a.state_dict().values(),
                                                                          b.state_dict().values()))


@pytest.mark.usefixtures("one_torch_thread")
def test_instruct_stage_keeps_snapshots_that_the_server_serves(prefect_api, tmp_path, monkeypatch):
    workspace(tmp_path)
    metrics = run_stage(tmp_path, monkeypatch)
    folder = tmp_path / "data/instruct/model" / SNAPSHOTS_DIR
    steps = list_steps(folder)
    # keep: 3 of the evaluations (every 2 updates): the base model, one between, the tuned model.
    assert len(steps) == 3 and steps[0] == 0 and steps[-1] == metrics["steps"] and 0 < steps[1] < steps[-1]
    assert metrics["snapshots"] == 3 and metrics["snapshots_mb"] > 0
    tuned, base = load_checkpoint(tmp_path / "data/instruct/model"), load_checkpoint(tmp_path / "data/pretrain/model")
    assert same_weights(load_snapshot(GPT(tuned.config), folder, 0), base)
    assert same_weights(load_snapshot(GPT(tuned.config), folder, steps[-1]), tuned)
    record = read_record(folder, steps[1])
    assert [p["name"] for p in record["probes"]] == ["probe text", "training row"]
    assert record["probes"][0]["text"] == PROBE[:16]
    assert record["probes"][1]["text"].startswith(USER + "Reverse the")   # a training example, chat-formatted

    # MLflow: the validation loss a record carries is the one logged at its step; the probes' bits too.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("instruct-snapshots").experiment_id],
                               "tags.`llm.stage` = 'instruct'")
    val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_loss")}
    assert record["val_loss"] == pytest.approx(val[steps[1]])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "snapshot.probe_text_bits")) == steps

    # The server serves the instruct model's snapshots as it serves pretrain's.
    with running("--model", str(tmp_path / "data/instruct/model"), "--seed", "0") as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        [card] = http.get("/v1/models").json()["data"]
        assert card["snapshots"] == steps
        assert http.get("/v1/snapshots").json()["steps"] == steps
        assert http.get(f"/v1/snapshots/{steps[1]}").json() == {**record, "model": "instruct"}
        at_zero = http.post("/v1/introspect", json={"text": PROBE, "step": 0}).json()
        tuned_now = http.post("/v1/introspect", json={"text": PROBE}).json()
        assert at_zero["tokens"] != tuned_now["tokens"]   # the base model's probabilities, not the tuned one's
        assert http.get("/v1/snapshots/1").status_code == 404

    # Every run tunes from the base model again: keep 0 leaves no snapshot of the run before.
    metrics = run_stage(tmp_path, monkeypatch, snapshots={"keep": 0})
    assert list_steps(folder) == [] and metrics["snapshots"] == 0


@pytest.mark.usefixtures("one_torch_thread")
def test_lora_tuning_snapshots_the_merged_model(prefect_api, tmp_path, monkeypatch):
    workspace(tmp_path)
    metrics = run_stage(tmp_path, monkeypatch, method="lora", lora_dropout=0.0, lr=0.01,
                        snapshots={"keep": 2, "probe_text": PROBE, "tokens": 16})
    folder = tmp_path / "data/instruct/model" / SNAPSHOTS_DIR
    assert list_steps(folder) == [0, metrics["steps"]]
    tuned, base = load_checkpoint(tmp_path / "data/instruct/model"), load_checkpoint(tmp_path / "data/pretrain/model")
    last = load_snapshot(GPT(tuned.config), folder, metrics["steps"])
    assert same_weights(last, tuned) and not same_weights(last, base)
