"""The real pipeline, stage after stage, through `dvc repro` on a tiny configuration."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from llm.checkpoint import load_checkpoint
from llm.classify import Classifier
from llm.data import TokenDataset, read_meta
from llm.model import num_params
from llm.snapshots import list_steps, read_record
from llm.tokenizer import load_tokenizer, load_tokenizers

import sample_sources as samples
from conftest import dvc, stage_env

pytestmark = pytest.mark.e2e


def test_tiny_pipeline_end_to_end(pipeline_repo, prefect_api, judge_gguf, tmp_path):
    repo = pipeline_repo
    params = samples.tiny_pipeline_params(tmp_path, judge_gguf)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = stage_env(repo)
    dvc(repo, "repro", "pack", env=env)

    # tokenizer: the project's tokenizer and a comparison across tokenizers and languages
    tokenizer = load_tokenizer(repo / "data/tokenizer/model")
    assert tokenizer.vocab_size == 400
    metrics = json.loads((repo / "data/tokenizer/metrics.json").read_text())
    compared = {key.split(".")[0] for key in metrics["comparison"]}
    assert compared == {"bpe", "unigram", "char", "bpe-en-ar"}
    assert set(load_tokenizers(repo / "data/tokenizer/comparison")) == compared  # for the server's side-by-side view
    # A BPE that saw Arabic spends fewer tokens on it than one trained on English only.
    assert metrics["language_cost"]["bpe-en-ar"]["ar_over_en"] < metrics["language_cost"]["bpe"]["ar_over_en"]
    assert (repo / "data/tokenizer/comparison.png").stat().st_size > 1000

    # pack: documents split, boundary tokens in place, tokenizer fingerprint recorded
    pack = json.loads((repo / "data/pack/metrics.json").read_text())
    assert pack["train"]["documents"] + pack["val"]["documents"] == 40 and pack["val"]["documents"] == 4
    train = TokenDataset(repo / "data/pack/tokens/train.bin", seq_len=32, batch_size=2,
                         expected_fingerprint=tokenizer.fingerprint())
    tokens = np.asarray(train.tokens)
    assert (tokens == tokenizer.special_tokens["<|endoftext|>"]).sum() == pack["train"]["documents"]
    # The first packed document decodes back to exactly one of the downloaded documents.
    boundaries = np.flatnonzero(tokens == tokenizer.special_tokens["<|endoftext|>"])
    first = tokenizer.decode(tokens[boundaries[0] + 1:boundaries[1]].tolist())
    corpus = (repo / "data/download/sources/corpus/documents.jsonl").read_text().splitlines()
    assert first in {json.loads(line)["text"] for line in corpus}
    assert "up to date" in dvc(repo, "repro", "pack", env=env).stdout

    # pretrain: a model that learned something, its curves, and a registered MLflow model
    dvc(repo, "repro", "pretrain", env=env)
    pretrain = json.loads((repo / "data/pretrain/metrics.json").read_text())
    assert pretrain["steps"] == 30 and pretrain["val_loss"] < math.log(400) - 1.0  # well below uniform guessing
    curve = (repo / "data/pretrain/curves/train.csv").read_text().splitlines()
    assert curve[0] == "step,tokens,loss,lr,grad_norm" and len(curve) == 31
    model = load_checkpoint(repo / "data/pretrain/model")
    assert model.config.vocab_size == 400 and (repo / "data/pretrain/model/tokenizer/tokenizer.json").exists()
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    [version] = client.search_model_versions("name = 'testllm-base'")
    assert version.run_id == client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id], "tags.`llm.stage` = 'pretrain'")[0].info.run_id
    # The machine it trained on, with the precisions it chose there (llm.device).
    machine = client.get_run(version.run_id).data.params
    assert machine["machine.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["machine.newton_schulz_dtype"] == ("bfloat16" if machine["machine.native_bf16"] == "True" else "float32")
    assert float(machine["machine.matmul_float32_gflops"]) > 0
    assert "val_loss" in dvc(repo, "plots", "show", "--json", env=env).stdout
    assert 0 < pretrain["unigram_val_loss"] < math.log(400)  # frequencies beat uniform guessing
    # bits per byte: the val loss in bits, times the val text's tokens per byte (as the pack stage counted them)
    val_text = [json.loads(line)["text"] for line in corpus]
    val_meta = read_meta(repo / "data/pack/tokens/val.bin")
    assert 0 < val_meta["bytes"] < sum(len(t.encode()) for t in val_text)
    assert pretrain["val_bits_per_byte"] == pytest.approx(
        pretrain["val_loss"] / math.log(2) * val_meta["num_tokens"] / val_meta["bytes"])
    assert pretrain["val_tokens_per_word"] == pytest.approx(pack["val"]["tokens_per_word"])
    assert pretrain["embedding_share"] == pytest.approx(1 - num_params(model, non_embedding=True) / num_params(model))
    assert len((repo / "data/pretrain/samples.txt").read_text().strip()) > 0
    # Snapshots of the run travel in the model folder: step 0 and each evaluation, with records.
    assert list_steps(repo / "data/pretrain/model/snapshots") == [0, 15, 30] and pretrain["snapshots"] == 3
    assert [p["name"] for p in read_record(repo / "data/pretrain/model/snapshots", 15)["probes"]] == [
        "probe text", "training row"]

    # Same params, same model: a second run from scratch reproduces the weights bit for bit
    # (the initial weights are seeded too, not only the training).
    weights = (repo / "data/pretrain/model/model.safetensors").read_bytes()
    shutil.rmtree(repo / "data/pretrain/checkpoints")
    dvc(repo, "repro", "--force", "--single-item", "pretrain", env=env)   # the stage alone, not its upstream
    assert (repo / "data/pretrain/model/model.safetensors").read_bytes() == weights

    # classify: pretrained vs from scratch vs the majority baseline, on one stratified test set
    dvc(repo, "repro", "classify", env=env)
    classify = json.loads((repo / "data/classify/metrics.json").read_text())
    assert set(classify["test"]) == {"pretrained", "from_scratch", "majority"}
    assert classify["test"]["majority"]["accuracy"] == pytest.approx(0.75, abs=0.02)
    assert classify["test"]["pretrained"]["accuracy"] > classify["test"]["majority"]["accuracy"]
    predictions = (repo / "data/classify/predictions.csv").read_text().splitlines()
    assert predictions[0] == "actual,predicted" and len(predictions) - 1 == classify["examples"]["test"]
    classifier = Classifier.load(repo / "data/classify/model")
    labels, probabilities = classifier.predict(["free prize call now", "the people have spoken"])
    assert labels[0] in ("ham", "spam") and abs(sum(probabilities[0]) - 1) < 1e-5

    # instruct: tuned model registered, answers from base and tuned model for the judge
    dvc(repo, "repro", "instruct", env=env)
    instruct = json.loads((repo / "data/instruct/metrics.json").read_text())
    assert instruct["val_loss"] < instruct["val_loss_before"]  # tuning lowered the validation loss
    assert instruct["padding_waste_packed"] < instruct["padding_waste_padded"]
    responses = [json.loads(line) for line in (repo / "data/instruct/responses.jsonl").read_text().splitlines()]
    assert len(responses) == instruct["test_items"] == 4
    assert set(responses[0]) == {"instruction", "input", "reference", "base_response", "tuned_response"}
    assert [int(v.version) for v in client.search_model_versions("name = 'testllm-instruct'")] == [1]
    # Its snapshots too: the base model at step 0, the tuned model at the last step (evaluations at epochs' ends).
    steps = list_steps(repo / "data/instruct/model/snapshots")
    assert len(steps) == instruct["snapshots"] == 3 and steps[0] == 0 and steps[-1] == instruct["steps"]

    # judge: the real local judge, calibrated on the same items; a re-run is answered by the cache
    dvc(repo, "repro", "judge", env=env)
    judged = json.loads((repo / "data/judge/metrics.json").read_text())
    # 4 judgements an item; identical prompts (base and tuned saying the same) are asked once
    assert judged["items"] == 3 and judged["requests_sent"] >= 2 * 3
    assert isinstance(judged["reliable"], bool) and judged["calibration"]["separation"]["n"] >= 1
    assert judged["calibration"]["reliable"] == (judged["calibration"]["separation"]["value"] >= 30)
    assert len((repo / "data/judge/items.jsonl").read_text().splitlines()) == 3
    dvc(repo, "repro", "--force", "--single-item", "judge", env=env)
    assert json.loads((repo / "data/judge/metrics.json").read_text())["requests_sent"] == 0

    # A tokenizer from another run is refused by the packed data.
    params["tokenizer"]["vocab_size"] = 420
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(repo, "repro", "tokenizer", env=env)
    other = load_tokenizer(repo / "data/tokenizer/model")
    with pytest.raises(ValueError, match="written by another tokenizer"):
        TokenDataset(repo / "data/pack/tokens/train.bin", seq_len=32, batch_size=2,
                     expected_fingerprint=other.fingerprint())
