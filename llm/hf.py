"""Hugging Face interop: our GPT <-> transformers' GPT2LMHeadModel and LlamaForCausalLM.

Two uses: the tests prove our model computes what the reference implementations compute (same
weights, same logits), and a user with internet can start from published GPT-2 / LLaMA weights
(`import_hf`) or hand a trained model to the Hugging Face ecosystem (`export_hf`).

Which family a config belongs to is read off its switches:

    gpt2:   learned positions, LayerNorm, GELU, pre-norm, biases everywhere, multi-head attention
    llama:  RoPE, RMSNorm, SwiGLU, pre-norm, (optionally) grouped-query attention

Weight layout differences handled here:
  - GPT-2 stores its linear layers as Conv1D with the weight transposed, (in, out): transpose.
  - GPT-2's fused c_attn is [q; k; v] like our qkv; LLaMA has separate q/k/v_proj: concatenate.
  - LLaMA's gate_proj and up_proj are our fused mlp.fc, gate first: concatenate.
  - RoPE: our model uses the same 'rotate half' pairing as transformers' LLaMA, so q/k copy as is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from llm.model import GPT, ModelConfig

# --- which family -------------------------------------------------------------------------------

def hf_family(config: ModelConfig) -> str:
    """'gpt2' or 'llama'; a ValueError saying which switch is off if the config is neither."""
    gpt2 = dict(position="learned", norm="layernorm", mlp="gelu", norm_placement="pre",
                qkv_bias=True, bias=True, n_kv_head=config.n_head, qk_norm=False)
    llama = dict(position="rope", norm="rmsnorm", mlp="swiglu", norm_placement="pre",
                 qkv_bias=config.bias,  # LLaMA's attention_bias covers q, k, v and o together
                 qk_norm=False)
    mismatches = {}
    for family, wanted in (("gpt2", gpt2), ("llama", llama)):
        off = [f"{k}={getattr(config, k)!r} (needs {v!r})" for k, v in wanted.items() if getattr(config, k) != v]
        if not off:
            return family
        mismatches[family] = off
    raise ValueError("config matches neither transformers family: "
                     + "; ".join(f"{family}: {', '.join(off)}" for family, off in mismatches.items()))


# --- ours -> transformers -----------------------------------------------------------------------

def _token_ids(config: ModelConfig, default: int, bos, eos, pad) -> dict:
    """bos/eos/pad ids for the HF config. The families' defaults (GPT-2: 50256) lie outside a small
    vocabulary, which transformers warns about and generate() trips on: fall back to the last id."""
    if default >= config.vocab_size:
        default = config.vocab_size - 1
    return dict(bos_token_id=default if bos is None else bos,
                eos_token_id=default if eos is None else eos,
                pad_token_id=pad)


def to_hf_config(config: ModelConfig, *, bos_token_id=None, eos_token_id=None, pad_token_id=None):
    family = hf_family(config)
    if family == "gpt2":
        return GPT2Config(
            vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.d_model,
            n_layer=config.n_layer, n_head=config.n_head, n_inner=config.d_ff,
            activation_function="gelu_new",  # the tanh approximation, like ours
            resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            layer_norm_epsilon=config.norm_eps, initializer_range=config.init_std,
            tie_word_embeddings=config.tie_embeddings,
            **_token_ids(config, 50256, bos_token_id, eos_token_id, pad_token_id))
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.context_length, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        attention_bias=config.bias, mlp_bias=config.bias, attention_dropout=config.dropout,
        initializer_range=config.init_std, tie_word_embeddings=config.tie_embeddings,
        **_token_ids(config, 2, bos_token_id, eos_token_id, pad_token_id))


def _renames(config: ModelConfig) -> list[tuple[str, str, bool]]:
    """(our name, transformers' name, transposed) of every tensor that maps one to one; both
    directions read this one table. LLaMA's fused qkv and gate/up tensors are split apart below."""
    kinds = ("weight", "bias") if config.bias else ("weight",)
    if hf_family(config) == "gpt2":
        table = [("tok_emb.weight", "transformer.wte.weight", False),
                 ("pos_emb.weight", "transformer.wpe.weight", False)]
        for i in range(config.n_layer):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
                table += [(f"{ours}{a}.{k}", f"{theirs}{b}.{k}", False) for k in ("weight", "bias")]
            for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                         ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                table += [(f"{ours}{a}.weight", f"{theirs}{b}.weight", True),  # Conv1D keeps (in, out)
                          (f"{ours}{a}.bias", f"{theirs}{b}.bias", False)]
        return table + [("final_norm.weight", "transformer.ln_f.weight", False),
                        ("final_norm.bias", "transformer.ln_f.bias", False)]
    table = [("tok_emb.weight", "model.embed_tokens.weight", False)]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        table += [(f"{ours}norm1.weight", f"{theirs}input_layernorm.weight", False),
                  (f"{ours}norm2.weight", f"{theirs}post_attention_layernorm.weight", False)]
        for k in kinds:
            table += [(f"{ours}attn.proj.{k}", f"{theirs}self_attn.o_proj.{k}", False),
                      (f"{ours}mlp.proj.{k}", f"{theirs}mlp.down_proj.{k}", False)]
    return table + [("final_norm.weight", "model.norm.weight", False)]


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict renamed (and transposed / split where needed) to transformers' names."""
    config, ours = model.config, model.state_dict()
    out = {theirs: ours[name].t() if transposed else ours[name] for name, theirs, transposed in _renames(config)}
    if hf_family(config) == "llama":
        q_rows, kv_rows = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        for i in range(config.n_layer):
            src, dst = f"blocks.{i}.", f"model.layers.{i}."
            for kind in (("weight", "bias") if config.bias else ("weight",)):
                q, k, v = ours[src + "attn.qkv." + kind].split([q_rows, kv_rows, kv_rows])
                out[dst + "self_attn.q_proj." + kind] = q
                out[dst + "self_attn.k_proj." + kind] = k
                out[dst + "self_attn.v_proj." + kind] = v
                gate, up = ours[src + "mlp.fc." + kind].chunk(2)
                out[dst + "mlp.gate_proj." + kind] = gate
                out[dst + "mlp.up_proj." + kind] = up
    out["lm_head.weight"] = ours["lm_head.weight"]  # with tied weights this is the embedding again
    return {name: tensor.contiguous() for name, tensor in out.items()}


def to_hf_model(model: GPT, **token_ids) -> PreTrainedModel:
    """A transformers model holding a copy of our weights (fp32, eval mode)."""
    hf_config = to_hf_config(model.config, **token_ids)
    hf_class = GPT2LMHeadModel if isinstance(hf_config, GPT2Config) else LlamaForCausalLM
    hf_model = hf_class(hf_config)
    hf_model.load_state_dict(to_hf_state_dict(model), strict=True)
    return hf_model.eval()


def export_hf(model: GPT, directory: str | Path, **token_ids) -> Path:
    """Write a folder that `AutoModelForCausalLM.from_pretrained(directory)` loads (config.json,
    generation_config.json, model.safetensors). token_ids: bos_token_id, eos_token_id, pad_token_id."""
    directory = Path(directory)
    to_hf_model(model, **token_ids).save_pretrained(directory)
    return directory


# --- transformers -> ours -----------------------------------------------------------------------

def from_hf_config(hf_config) -> ModelConfig:
    if hf_config.model_type == "gpt2":
        if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 activation {hf_config.activation_function!r} is not supported (tanh GELU only)")
        if hf_config.scale_attn_by_inverse_layer_idx or not hf_config.scale_attn_weights:
            raise ValueError("GPT-2 attention scaling options other than 1/sqrt(head_dim) are not supported")
        return ModelConfig(
            vocab_size=hf_config.vocab_size, context_length=hf_config.n_positions,
            n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_kv_head=hf_config.n_head,
            d_model=hf_config.n_embd, mlp="gelu", d_ff=hf_config.n_inner or 4 * hf_config.n_embd,
            norm="layernorm", norm_placement="pre", position="learned", qkv_bias=True, bias=True,
            dropout=float(hf_config.resid_pdrop), tie_embeddings=bool(hf_config.tie_word_embeddings),
            norm_eps=hf_config.layer_norm_epsilon, init_std=hf_config.initializer_range)
    if hf_config.model_type == "llama":
        rope = hf_config.rope_parameters or {}
        if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"LLaMA RoPE scaling {rope} is not supported (plain RoPE only)")
        if hf_config.hidden_act != "silu":
            raise ValueError(f"LLaMA activation {hf_config.hidden_act!r} is not supported (silu only)")
        if hf_config.head_dim != hf_config.hidden_size // hf_config.num_attention_heads:
            raise ValueError("LLaMA head_dim other than hidden_size / num_attention_heads is not supported")
        if hf_config.attention_bias != hf_config.mlp_bias:
            raise ValueError("LLaMA with attention_bias != mlp_bias is not supported (one `bias` switch)")
        return ModelConfig(
            vocab_size=hf_config.vocab_size, context_length=hf_config.max_position_embeddings,
            n_layer=hf_config.num_hidden_layers, n_head=hf_config.num_attention_heads,
            n_kv_head=hf_config.num_key_value_heads, d_model=hf_config.hidden_size, mlp="swiglu",
            d_ff=hf_config.intermediate_size, norm="rmsnorm", norm_placement="pre", position="rope",
            rope_theta=float(rope.get("rope_theta", 10000.0)), qkv_bias=bool(hf_config.attention_bias),
            bias=bool(hf_config.attention_bias), dropout=float(hf_config.attention_dropout),
            tie_embeddings=bool(hf_config.tie_word_embeddings), norm_eps=hf_config.rms_norm_eps,
            init_std=hf_config.initializer_range)
    raise ValueError(f"model_type {hf_config.model_type!r} is not supported (gpt2 or llama)")


def from_hf_state_dict(config: ModelConfig, theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of to_hf_state_dict."""
    out = {name: theirs[hf].t() if transposed else theirs[hf] for name, hf, transposed in _renames(config)}
    if hf_family(config) == "llama":
        for i in range(config.n_layer):
            src, dst = f"model.layers.{i}.", f"blocks.{i}."
            for kind in (("weight", "bias") if config.bias else ("weight",)):
                out[dst + "attn.qkv." + kind] = torch.cat(
                    [theirs[src + f"self_attn.{p}_proj." + kind] for p in ("q", "k", "v")])
                out[dst + "mlp.fc." + kind] = torch.cat(
                    [theirs[src + "mlp.gate_proj." + kind], theirs[src + "mlp.up_proj." + kind]])
    out["lm_head.weight"] = theirs["lm_head.weight"] if "lm_head.weight" in theirs else out["tok_emb.weight"]
    return {name: tensor.contiguous() for name, tensor in out.items()}


def from_hf_model(hf_model: PreTrainedModel) -> GPT:
    config = from_hf_config(hf_model.config)
    model = GPT(config)
    model.load_state_dict(from_hf_state_dict(config, hf_model.state_dict()), strict=True)
    return model


def import_hf(directory: str | Path, map_location: str | torch.device = "cpu") -> GPT:
    """Read a transformers GPT-2 or LLaMA folder (or, with internet, a hub name) into our GPT."""
    hf_model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    return from_hf_model(hf_model).to(map_location)

