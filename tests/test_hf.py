"""llm.hf: our GPT computes what transformers' GPT-2 and LLaMA compute, and converts both ways.

All offline: the transformers models are built from configs with random weights.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from llm.generate import generate
from llm.hf import export_hf, from_hf_model, hf_family, import_hf, to_hf_model
from llm.model import GPT, ModelConfig

GPT2 = dict(mlp="gelu", norm="layernorm", position="learned", qkv_bias=True, bias=True)
LLAMA = dict(mlp="swiglu", norm="rmsnorm", position="rope", qkv_bias=False, bias=False)
CASES = {
    "gpt2": dict(GPT2),
    "gpt2-untied": dict(GPT2, tie_embeddings=False),
    "llama-mha": dict(LLAMA, n_kv_head=4, tie_embeddings=False),
    "llama-gqa": dict(LLAMA, n_kv_head=2),
    "llama-mqa-bias": dict(LLAMA, n_kv_head=1, qkv_bias=True, bias=True, rope_theta=500000.0),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(case: str, seed=0) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=101, context_length=32, n_layer=2, n_head=4, d_model=64,
                         norm_eps=1e-5, **CASES[case])
    model = GPT(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping cannot hide behind 1s and 0s
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


IDX = torch.randint(0, 101, (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", CASES)
def test_our_weights_give_the_same_logits_in_transformers(case):
    model = build(case)
    hf_model = to_hf_model(model)
    assert isinstance(hf_model, GPT2LMHeadModel if case.startswith("gpt2") else LlamaForCausalLM)
    torch.testing.assert_close(logits(hf_model, IDX), logits(model, IDX), atol=1e-4, rtol=0)


def test_transformers_weights_give_the_same_logits_in_ours():
    torch.manual_seed(1)
    references = [
        GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                   bos_token_id=0, eos_token_id=0)),
        LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                     bos_token_id=0, eos_token_id=0)),
    ]
    for hf_model in references:
        hf_model.eval()
        ours = from_hf_model(hf_model).eval()
        torch.testing.assert_close(logits(ours, IDX), logits(hf_model, IDX), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa"])
def test_export_loads_in_auto_model_and_imports_back(tmp_path, case):
    model = build(case)
    export_hf(model, tmp_path)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(hf_model, IDX), logits(model, IDX), atol=1e-4, rtol=0)
    # A small vocabulary gets bos/eos ids inside it.
    assert 0 <= hf_model.config.eos_token_id < model.config.vocab_size
    back = import_hf(tmp_path).eval()
    assert back.config == model.config
    torch.testing.assert_close(logits(back, IDX), logits(model, IDX), atol=0, rtol=0)


def test_greedy_generation_agrees_with_transformers():
    model = build("llama-gqa")
    for p in model.parameters():  # peaked predictions: no near-ties in the argmax
        p.data.mul_(4.0 if p.dim() > 1 else 1.0)
    hf_model = to_hf_model(model)
    hf_model.generation_config.eos_token_id = None
    prompt = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        expected = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=12, pad_token_id=0)[0, 3:].tolist()
    assert generate(model, prompt, max_new_tokens=12)[0].tokens == expected


def test_configs_outside_both_families_are_refused_with_the_reason():
    assert hf_family(build("gpt2").config) == "gpt2" and hf_family(build("llama-gqa").config) == "llama"
    post_norm = GPT(ModelConfig(vocab_size=101, context_length=32, n_layer=1, n_head=4, d_model=64,
                                norm_placement="post"))
    with pytest.raises(ValueError, match="norm_placement"):
        to_hf_model(post_norm)
