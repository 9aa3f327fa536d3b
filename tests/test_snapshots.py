"""Training snapshots (llm/snapshots.py): which steps are kept, what a record holds, that the
float16 weights give back the recorded numbers, and that a restart keeps or starts over."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from llm import introspect
from llm.checkpoint import WEIGHTS_FILE, checkpoint_name, read_config
from llm.model import GPT, ModelConfig
from llm.snapshots import (
    SNAPSHOTS_DIR,
    Probe,
    SnapshotConfig,
    Snapshots,
    chosen_steps,
    list_steps,
    load_snapshot,
    read_curves,
    read_record,
)
from llm.tokenizer import load_tokenizer

from test_serving_support import make_model_dir_with_snapshots


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread):
    """A tiny model trained 40 steps by llm.train, snapshots at 0, 20 and 40."""
    return make_model_dir_with_snapshots(tmp_path_factory.mktemp("snapshots") / "tiny")


def test_chosen_steps_are_evenly_spaced_with_first_and_last():
    evaluations = [100, 200, 300, 400, 500, 600]
    assert chosen_steps(evaluations, 4) == [0, 200, 400, 600]
    assert chosen_steps(evaluations, 2) == [0, 600]
    assert chosen_steps(evaluations, 1) == [600]
    assert chosen_steps(evaluations, 0) == []
    assert chosen_steps(evaluations, 99) == [0, *evaluations]
    assert chosen_steps([30], 3) == [0, 30]


@pytest.mark.parametrize("field, value", [("keep", -1), ("tokens", 1), ("top_k", 0), ("probe_text", "")])
def test_bad_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"SnapshotConfig.{field} "):
        SnapshotConfig(**{field: value})


def test_records_hold_probabilities_top_k_and_every_heads_attention(trained):
    folder = trained / SNAPSHOTS_DIR
    config = read_config(trained)
    assert list_steps(folder) == [0, 20, 40]
    first, last = read_record(folder, 0), read_record(folder, 40)
    assert first["val_loss"] is None and last["val_loss"] > 0
    for probe in last["probes"]:
        n = len(probe["ids"])
        assert n == 16 and [t["id"] for t in probe["tokens"]] == probe["ids"]
        assert probe["tokens"][0]["prob"] is None and all(len(t["next"]) == 5 for t in probe["tokens"])
        assert [layer["layer"] for layer in probe["attention"]] == list(range(config.n_layer))
        for layer in probe["attention"]:
            assert [h["head"] for h in layer["heads"]] == list(range(config.n_head))
            for head in layer["heads"]:
                for q, row in enumerate(head["weights"]):
                    assert math.isclose(sum(row), 1, abs_tol=2e-3) and not any(row[q + 1:])  # causal
    # Training changed what the model expects: the probe text got likelier.
    assert [p["name"] for p in last["probes"]] == ["probe text", "training row"]
    bits = [sum(t["surprisal_bits"] for t in record["probes"][1]["tokens"][1:]) for record in (first, last)]
    assert bits[1] < bits[0] - 5
    curves = read_curves(folder)
    assert [s for s, _ in curves["train"]] == list(range(40)) and [s for s, _ in curves["val"]] == [10, 20, 30, 40]


def test_float16_weights_give_back_the_recorded_numbers(trained):
    folder = trained / SNAPSHOTS_DIR
    weights = load_file(str(folder / checkpoint_name(20) / WEIGHTS_FILE))
    assert {t.dtype for t in weights.values()} == {torch.float16}
    assert (folder / checkpoint_name(20) / WEIGHTS_FILE).stat().st_size < 0.6 * (trained / WEIGHTS_FILE).stat().st_size
    tokenizer = load_tokenizer(trained / "tokenizer")
    model = load_snapshot(GPT(read_config(trained)), folder, 20)
    probe = read_record(folder, 20)["probes"][0]
    again = introspect.token_table(model, probe["ids"], tokenizer.token_text)
    for recorded, now in zip(probe["tokens"][1:], again[1:]):
        assert math.isclose(recorded["prob"], now["prob"], abs_tol=2e-3)


def test_a_restart_keeps_its_snapshots_and_records_them_again_if_the_probes_changed(tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=16, context_length=8, n_layer=1, n_head=2, d_model=16))
    probes = [Probe("probe text", [1, 2, 3, 4])]
    config = SnapshotConfig(keep=3, probe_text="x", tokens=4)
    snapshots = Snapshots(tmp_path, config, [0, 5, 10], probes, str)
    first = snapshots.take(model, 0)
    assert first is not None and snapshots.take(model, 3) is None   # 3 is not chosen
    again = Snapshots(tmp_path, SnapshotConfig(keep=2, probe_text="x", tokens=4), [0, 10], probes, str)
    assert list_steps(tmp_path) == [0] and not again.wanted(0) and again.wanted(10) and not again.stale

    # Three tokens recorded instead of four: the kept snapshot is recorded again from its weights.
    fewer = Snapshots(tmp_path, SnapshotConfig(keep=3, probe_text="x", tokens=3), [0, 5, 10], probes, str)
    assert fewer.stale and not fewer.wanted(0)
    with torch.no_grad():
        model.lm_head.weight.mul_(3)   # the run's model has moved on since step 0
    fewer.take(model, 5)
    out = fewer.finish(model, {"train_loss": [(0, 2.5)], "val_loss": []}, tmp_path / "model" / SNAPSHOTS_DIR)
    assert list_steps(out) == [0, 5] and read_curves(out) == {"train": [[0, 2.5]], "val": []}
    assert [len(read_record(out, step)["probes"][0]["ids"]) for step in (0, 5)] == [3, 3]
    # Step 0 was recorded again with step 0's weights (causal: its first 3 positions are as before).
    probs = {step: [t["prob"] for t in read_record(out, step)["probes"][0]["tokens"][1:]] for step in (0, 5)}
    assert probs[0] == pytest.approx([t["prob"] for t in first["probes"][0]["tokens"][1:3]], abs=2e-3)
    assert probs[5] != pytest.approx(probs[0], abs=2e-3)
    assert not Snapshots(tmp_path, SnapshotConfig(keep=3, probe_text="x", tokens=3), [0, 5], probes, str).stale
