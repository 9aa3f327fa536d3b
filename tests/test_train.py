"""The training loop: config, accumulation, checkpoints, exact resume, divergence."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_driver import CONTEXT, tiny_model_config

from llm.checkpoint import (
    STATE_FILE,
    CheckpointMismatch,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
)
from llm.model import GPT
from llm.step import TrainingDiverged
from llm.train import TrainConfig, accumulation_steps, load_datasets, train

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("train_driver.py")


@pytest.fixture(autouse=True)
def one_thread():
    # Same thread count in every run compared here (float sums depend on how work is split).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quick_config(**overrides) -> TrainConfig:
    values = dict(lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=6, batch_size=4, eval_every=3, eval_steps=1,
                  checkpoint_every=3, keep_checkpoints=3, threads=1, seed=1, progress=False)
    return TrainConfig(**{**values, **overrides})


def run_training(data_dir: Path, out_dir: Path, config: TrainConfig, model_seed: int = 0, **kwargs):
    torch.manual_seed(model_seed)
    model = GPT(tiny_model_config())
    train_data, val_data = load_datasets(data_dir / "train.bin", data_dir / "val.bin", CONTEXT, config)
    return model, train(model, train_data, val_data, config, out_dir, **kwargs)


# --- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("lr", 0.0), ("min_lr", 1.0), ("warmup_steps", 5000), ("decay", "exponential"), ("max_steps", 0),
    ("batch_size", 0), ("tokens_per_step", -1), ("grad_clip", -1.0), ("betas", (0.9, 1.0)),
    ("eval_steps", 0), ("keep_checkpoints", 0), ("device", "tpu"), ("dtype", "float16"),
    ("resume", "maybe"), ("threads", -1), ("sample_every", 7),
])
def test_invalid_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}\b"):
        TrainConfig(**{field: value})


def test_config_round_trips_through_a_plain_dict():
    config = TrainConfig(lr=5e-4, betas=[0.9, 0.99], decay="linear")
    assert config.betas == (0.9, 0.99)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown TrainConfig field.*'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


# --- gradient accumulation ----------------------------------------------------------------------

def test_accumulation_needs_a_whole_number_of_micro_batches():
    assert accumulation_steps(TrainConfig(batch_size=4, tokens_per_step=0), 32) == 1
    assert accumulation_steps(TrainConfig(batch_size=4, tokens_per_step=512), 32) == 4
    with pytest.raises(ValueError, match=r"tokens_per_step=500 must be a multiple of .* = 128"):
        accumulation_steps(TrainConfig(batch_size=4, tokens_per_step=500), 32)


def test_gradient_accumulation_matches_one_big_batch(data_dir, tmp_path):
    # 4 micro-batches of 2 rows read exactly the rows of one batch of 8 (batch i is rows 8i..8i+7).
    accumulated, big = (quick_config(batch_size=2, tokens_per_step=8 * CONTEXT, max_steps=4),
                        quick_config(batch_size=8, max_steps=4))
    model_a, result_a = run_training(data_dir, tmp_path / "a", accumulated)
    model_b, result_b = run_training(data_dir, tmp_path / "b", big)
    assert result_a.tokens_per_step == result_b.tokens_per_step == 8 * CONTEXT
    losses_a = [v for _, v in result_a.history["train_loss"]]
    losses_b = [v for _, v in result_b.history["train_loss"]]
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    norms_a = [v for _, v in result_a.history["grad_norm"]]
    assert norms_a == pytest.approx([v for _, v in result_b.history["grad_norm"]], rel=1e-4)
    # Adam divides by the gradient's own scale, so float-rounding differences in tiny gradients
    # become differences of a small fraction of lr (3e-3) in the weights: far below one update.
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


# --- the loop and its callbacks -----------------------------------------------------------------

def test_training_reports_every_step_and_evaluation_and_learns(data_dir, tmp_path):
    steps, evals, samples_seen = [], [], []

    def sample_fn(model, prompt, n):
        samples_seen.append(torch.rand(1).item())   # draws RNG: must not disturb training
        return prompt + "x" * n

    config = quick_config(max_steps=12, eval_every=6, checkpoint_every=6, sample_tokens=3, sample_prompt="Hi")
    _, result = run_training(data_dir, tmp_path, config, on_step=lambda s, m: steps.append((s, m)),
                             on_eval=lambda s, m: evals.append((s, m)), sample_fn=sample_fn)
    assert [s for s, _ in steps] == list(range(12))
    assert set(steps[0][1]) == {"loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "mfu"}
    assert steps[-1][1]["tokens_seen"] == 12 * 4 * CONTEXT == result.tokens_seen
    assert steps[0][1]["mfu"] is None and steps[0][1]["tokens_per_s"] > 0   # no MFU on a CPU
    assert [s for s, _ in evals] == [6, 12]
    assert evals[-1][1] == {"val_loss": result.val_loss, "val_ppl": pytest.approx(math.exp(result.val_loss)),
                            "sample": "Hixxx"}
    assert samples_seen[0] == samples_seen[1]   # each sample starts from the same seed
    assert result.train_loss < result.history["train_loss"][0][1] - 0.3   # it learns
    assert result.resumed_from is None and result.checkpoint.name == checkpoint_name(12)

    # The sample's RNG draws left training untouched: the same run without samples is identical.
    _, plain = run_training(data_dir, tmp_path / "plain", config)
    assert plain.history["train_loss"] == result.history["train_loss"]


def test_checkpoints_keep_the_last_k_and_a_finished_run_is_not_redone(data_dir, tmp_path):
    config = quick_config(max_steps=6, checkpoint_every=1, keep_checkpoints=2)
    _, first = run_training(data_dir, tmp_path, config)
    checkpoints = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == [checkpoint_name(5), checkpoint_name(6)]
    state = torch.load(checkpoints / checkpoint_name(6) / STATE_FILE, weights_only=True)
    assert state["step"] == 6 and set(state["rng"]) >= {"python", "numpy", "torch_cpu"}
    assert len(state["history"]["train_loss"]) == 6

    (checkpoints / ".step_0000007.tmp-abc").mkdir()   # as left by a run killed mid-write
    _, again = run_training(data_dir, tmp_path, config)
    assert again.resumed_from == 6 and again.history == first.history
    # Nothing left to train, yet the speed is the run's, from the updates' times in the history.
    assert len(first.history["step_s"]) == 6 and first.tokens_per_s > 0
    assert again.tokens_per_s == first.tokens_per_s
    assert not (checkpoints / ".step_0000007.tmp-abc").exists()

    _, fresh = run_training(data_dir, tmp_path, quick_config(max_steps=6, checkpoint_every=1, keep_checkpoints=2,
                                                             resume="never"))
    assert fresh.resumed_from is None and fresh.history["train_loss"] == first.history["train_loss"]


def test_muon_trains_and_resumes_exactly(data_dir, tmp_path):
    config = quick_config(optimizer="muon", checkpoint_every=3)
    _, adamw = run_training(data_dir, tmp_path / "adamw", quick_config())
    _, muon = run_training(data_dir, tmp_path / "muon", config)
    losses = [loss for _, loss in muon.history["train_loss"]]
    assert all(math.isfinite(x) for x in losses) and losses != [x for _, x in adamw.history["train_loss"]]
    state = torch.load(muon.checkpoint / STATE_FILE, weights_only=True)
    assert set(state["optimizer"]) == {"muon", "adamw"}   # Muon's momentum is saved with AdamW's moments
    # Lose the final checkpoint: the rerun resumes at step 3 and must retrace steps 4-6 exactly.
    shutil.rmtree(muon.checkpoint)
    model, resumed = run_training(data_dir, tmp_path / "muon", config)
    assert resumed.resumed_from == 3 and resumed.history["train_loss"] == muon.history["train_loss"]
    # A checkpoint of one optimizer is not continued with the other.
    with pytest.raises(CheckpointMismatch, match="optimizer .checkpoint 'muon', now 'adamw'"):
        run_training(data_dir, tmp_path / "muon", quick_config(checkpoint_every=3))


def test_checkpoint_of_another_model_config_is_refused_naming_the_fields(data_dir, tmp_path):
    config = quick_config(max_steps=3)
    run_training(data_dir, tmp_path, config)
    other = GPT(tiny_model_config(n_layer=3, d_model=32))
    train_data, _ = load_datasets(data_dir / "train.bin", None, CONTEXT, config)
    with pytest.raises(CheckpointMismatch, match="different model config") as error:
        train(other, train_data, None, TrainConfig(**{**config.to_dict(), "max_steps": 3}), tmp_path)
    message = str(error.value)
    assert "n_layer (checkpoint 2, now 3)" in message and "d_model (checkpoint 64, now 32)" in message
    assert "n_head" not in message and checkpoint_name(3) in message


def test_checkpoint_of_other_training_settings_is_refused_naming_the_fields(data_dir, tmp_path):
    run_training(data_dir, tmp_path, quick_config(max_steps=3))
    with pytest.raises(CheckpointMismatch, match=r"different training config: lr \(checkpoint 0.003, now 0.001\)"):
        run_training(data_dir, tmp_path, quick_config(max_steps=3, lr=1e-3, eval_every=1))


# --- divergence ---------------------------------------------------------------------------------

def poison_training_loss(model: GPT, from_call: int) -> None:
    """From the from_call-th training forward pass on, the loss is NaN (as after an overflow)."""
    calls = {"n": 0}
    original = model.forward

    def forward(*args, **kwargs):
        output = original(*args, **kwargs)
        if model.training:
            calls["n"] += 1
            if calls["n"] > from_call:
                output.loss = output.loss * float("nan")
        return output

    model.forward = forward


def test_nan_loss_stops_training_at_once_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    config = quick_config(max_steps=20, checkpoint_every=3)
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    poison_training_loss(model, from_call=7)   # steps 0..6 are fine, step 7 is NaN
    train_data, val_data = load_datasets(data_dir / "train.bin", data_dir / "val.bin", CONTEXT, config)
    steps = []
    with pytest.raises(TrainingDiverged, match=r"diverged at step 7: the training loss is nan") as error:
        train(model, train_data, val_data, config, tmp_path, on_step=lambda s, m: steps.append(s))
    good = tmp_path / "checkpoints" / checkpoint_name(6)
    assert error.value.step == 7 and error.value.checkpoint == good and str(good) in str(error.value)
    assert steps == list(range(7))
    assert latest_checkpoint(tmp_path / "checkpoints") == good
    # The checkpoint is whole and loads: weights finite, history of the 6 good steps.
    weights = load_file(good / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    state = torch.load(good / STATE_FILE, weights_only=True)
    assert state["step"] == 6 and all(math.isfinite(v) for _, v in state["history"]["train_loss"])
    # The model in memory never received the bad update either.
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- exact resume after SIGKILL -----------------------------------------------------------------

def start_driver(data_dir: Path, out_dir: Path, result: Path, step_sleep: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(DRIVER), str(data_dir), str(out_dir), str(result),
                             "--step-sleep", str(step_sleep)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> None:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output


def wait_for_checkpoints(process: subprocess.Popen, checkpoints: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(list_checkpoints(checkpoints)) < count:
        assert process.poll() is None, f"driver exited early:\n{process.communicate()[0]}"
        assert time.monotonic() < deadline, "no checkpoint appeared in time"
        time.sleep(0.005)


def test_sigkill_then_rerun_gives_a_bitwise_identical_loss_curve(data_dir, tmp_path):
    uninterrupted = start_driver(data_dir, tmp_path / "straight", tmp_path / "straight.json")
    interrupted = start_driver(data_dir, tmp_path / "killed", tmp_path / "killed.json", step_sleep=0.1)
    wait_for_checkpoints(interrupted, tmp_path / "killed" / "checkpoints", count=2)
    interrupted.send_signal(signal.SIGKILL)   # no handler, no cleanup: as a power cut to the process
    interrupted.wait()
    finish(uninterrupted)
    assert not (tmp_path / "killed.json").exists(), "the driver finished before it was killed"
    killed_at = latest_checkpoint(tmp_path / "killed" / "checkpoints")
    assert killed_at is not None and killed_at.name < checkpoint_name(30)

    finish(start_driver(data_dir, tmp_path / "killed", tmp_path / "killed.json"))

    straight = json.loads((tmp_path / "straight.json").read_text())
    resumed = json.loads((tmp_path / "killed.json").read_text())
    assert straight["resumed_from"] is None and resumed["resumed_from"] >= 10
    assert len(straight["train_loss"]) == 30
    assert resumed["train_loss"] == straight["train_loss"]        # every step, bit for bit
    assert resumed["val_loss"] == straight["val_loss"]
    assert resumed["sample"] == straight["sample"]
    final = checkpoint_name(30)
    a = load_file(tmp_path / "straight" / "checkpoints" / final / "model.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoints" / final / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
