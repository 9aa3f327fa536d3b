"""llm.introspect: plain-data views of a forward pass."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llm.introspect import attention, inspect, logit_lens, token_table
from llm.model import GPT, ModelConfig

IDS = [3, 14, 15, 9, 26, 5, 35, 8]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa"])
def any_model(request):
    torch.manual_seed(0)
    extra = {} if request.param == "gpt2" else dict(
        mlp="swiglu", norm="rmsnorm", position="rope", bias=False, qkv_bias=False, n_kv_head=2)
    model = GPT(ModelConfig(vocab_size=40, context_length=16, n_layer=3, n_head=4, d_model=32, **extra))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0 if p.dim() > 1 else 1.0)  # peaked predictions: layers disagree in the lens
    return model.eval()


def text(i: int) -> str:
    return f"<{i}>"


def assert_same(a, b, tol=1e-5):
    """Equal structure and strings, numbers within tol (the explicit and fused attention paths
    differ in the last bits)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key], tol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y, tol)
    elif isinstance(a, float):
        assert math.isclose(a, b, abs_tol=tol)
    else:
        assert a == b


def test_token_table(any_model):
    rows = token_table(any_model, IDS, text, top_k=4, digits=None)
    assert [r["id"] for r in rows] == IDS and [r["text"] for r in rows] == [text(i) for i in IDS]
    assert rows[0]["prob"] is None and rows[0]["surprisal_bits"] is None
    with torch.no_grad():
        probs = any_model(torch.tensor([IDS])).logits[0].softmax(-1)
    for i, row in enumerate(rows):
        if i:
            assert math.isclose(row["prob"], probs[i - 1, IDS[i]].item(), rel_tol=1e-5)
            assert math.isclose(row["surprisal_bits"], -math.log2(row["prob"]), rel_tol=1e-6)
        candidates = [c["prob"] for c in row["next"]]
        assert len(candidates) == 4 and candidates == sorted(candidates, reverse=True)
        assert row["next"][0]["id"] == probs[i].argmax().item()


def test_probabilities_sum_to_one(any_model):
    rows = token_table(any_model, IDS, text, top_k=40, digits=None)  # the whole vocabulary
    for row in rows:
        assert math.isclose(sum(c["prob"] for c in row["next"]), 1.0, abs_tol=1e-5)


def test_attention_rows_sum_to_one_and_selection(any_model):
    everything = attention(any_model, IDS, text, digits=None)
    assert everything["tokens"] == [text(i) for i in IDS]
    assert [entry["layer"] for entry in everything["layers"]] == [0, 1, 2]
    for entry in everything["layers"]:
        assert [h["head"] for h in entry["heads"]] == [0, 1, 2, 3]
        for head in entry["heads"]:
            weights = head["weights"]
            assert len(weights) == len(IDS) and all(len(row) == len(IDS) for row in weights)
            for q, row in enumerate(weights):
                assert math.isclose(sum(row), 1.0, abs_tol=1e-5)
                assert all(w == 0 for w in row[q + 1:])  # causal
    chosen = attention(any_model, IDS, text, layers=[2], heads=[1, 3], digits=None)
    assert [e["layer"] for e in chosen["layers"]] == [2]
    assert [h["head"] for h in chosen["layers"][0]["heads"]] == [1, 3]
    assert chosen["layers"][0]["heads"][1] == everything["layers"][2]["heads"][3]
    with pytest.raises(ValueError, match="heads"):
        attention(any_model, IDS, text, heads=[4])


def test_logit_lens(any_model):
    lens = logit_lens(any_model, IDS, text, top_k=3)
    layers = lens["layers"]
    assert [entry["layer"] for entry in layers] == [0, 1, 2, 3]
    assert layers[0]["label"] == "embeddings" and layers[-1]["label"] == "after block 2"
    assert all(len(entry["positions"]) == len(IDS) for entry in layers)
    # The last layer's read-out is the model's own prediction.
    final = [row["next"] for row in token_table(any_model, IDS, text, top_k=3)]
    assert layers[-1]["positions"] == final
    assert layers[0]["positions"] != final  # earlier layers predict something else
    assert [e["layer"] for e in logit_lens(any_model, IDS, text, layers=[0, 3])["layers"]] == [0, 3]


def test_inspect_is_json_ready_and_agrees_with_the_single_views(any_model):
    report = inspect(any_model, IDS, text, top_k=2, attention_layers=[1], attention_heads=[0])
    assert json.loads(json.dumps(report)) == report
    assert_same(report["tokens"], token_table(any_model, IDS, text, top_k=2))
    assert_same(report["attention"], attention(any_model, IDS, text, layers=[1], heads=[0], digits=6))
    assert_same(report["logit_lens"], logit_lens(any_model, IDS, text, top_k=2))
    light = inspect(any_model, IDS, text, with_attention=False, with_logit_lens=False)
    assert set(light) == {"tokens"}


def test_mode_is_restored_and_bad_input_raises(any_model):
    any_model.train()
    token_table(any_model, IDS, text)
    assert any_model.training
    any_model.eval()
    with pytest.raises(ValueError, match="context_length"):
        token_table(any_model, list(range(17)), text)
    with pytest.raises(ValueError, match="outside"):
        token_table(any_model, [1, 40], text)
    with pytest.raises(ValueError, match="empty"):
        token_table(any_model, [], text)
    assert token_table(any_model, [7], text)[0]["prob"] is None  # a single token works
