"""The architecture diagram's numbers: per-part parameters and FLOPs that add up to the model's
totals, for every family of switches, and the text each part carries."""

from __future__ import annotations

import pytest
import torch

from llm.architecture import describe
from llm.model import GPT, ModelConfig, flops_per_token, num_params, parts_of

SMALL = dict(n_layer=2, n_head=4, d_model=32, vocab_size=64, context_length=16)
CONFIGS = {
    "gpt2": ModelConfig.from_preset("tiny", **SMALL),
    "llama-gqa": ModelConfig.from_preset("llama-tiny", **SMALL, n_kv_head=2),
    "untied-post-norm": ModelConfig.from_preset("tiny", **SMALL, tie_embeddings=False, norm_placement="post"),
    "qk-norm-no-bias": ModelConfig.from_preset("tiny", **SMALL, qk_norm=True, bias=False, qkv_bias=False),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_parts_sum_to_the_models_parameters_and_flops(name):
    model = GPT(CONFIGS[name])
    for seq_len in (None, 5):
        parts = parts_of(model, seq_len)
        assert sum(p["params"] for p in parts) == num_params(model) == num_params(model.config)
        assert sum(p["flops"] for p in parts) == flops_per_token(model.config, seq_len)
    by_name = {p["name"]: p for p in parts_of(model)}
    assert by_name["lm_head"]["params"] == (0 if model.config.tie_embeddings else 64 * 32)
    assert by_name["tok_emb"]["flops"] == 0 and by_name["lm_head"]["flops"] == 6 * 64 * 32
    assert by_name["blocks.1.mlp"]["params"] == sum(p.numel() for p in model.blocks[1].mlp.parameters())
    assert ("final_norm" in by_name) == (model.config.norm_placement == "pre")


@pytest.mark.parametrize("name", CONFIGS)
def test_describe_adds_up_and_names_the_switches(name):
    config = CONFIGS[name]
    with torch.device("meta"):  # counting needs no weights
        model = GPT(config)
    diagram = describe(model)
    parts = diagram["input"] + diagram["output"]
    total = sum(p["params"] for p in parts) + sum(p["params_all"] for p in diagram["block"]["parts"])
    flops = sum(p["flops"] for p in parts) + sum(p["flops_all"] for p in diagram["block"]["parts"])
    assert total == diagram["totals"]["params"] == num_params(config)
    assert flops == diagram["totals"]["flops_per_token"] == flops_per_token(config)
    block = diagram["block"]
    assert block["count"] == 2 and all(p["params_all"] == 2 * p["params"] for p in block["parts"])
    assert all(p["equation"] and p["label"] for p in parts + block["parts"])
    attention = next(p for p in block["parts"] if p["name"] == "attn")
    if name == "llama-gqa":
        assert "grouped-query" in attention["detail"] and "2 key/value heads" in attention["detail"]
        assert diagram["input"][1]["name"] == "rope" and "SiLU" in block["parts"][3]["equation"]
        assert "mean(x\u00b2)" in block["parts"][0]["equation"]
    else:
        assert "multi-head" in attention["detail"] and diagram["input"][1]["name"] == "pos_emb"
    assert block["equation"].startswith("x = Norm") == (name == "untied-post-norm")
    assert ("(tied)" in diagram["output"][-1]["label"]) == config.tie_embeddings
