"""The architecture of a model, as plain data for a diagram: each part with what it is, the
equation it computes, and its parameters and training FLOPs per token (llm.model.parts_of).

    describe(model) -> {"totals", "input": [parts], "block": {"count", "equation", "parts"},
                        "output": [parts]}

A block's parts are shown once with the count of blocks: every block has the same shape, so the
numbers of one block ("params", "flops") times the count are the blocks' share of the totals
("params_all", "flops_all" hold the sums over all blocks, read from the model itself).
"""

from __future__ import annotations

from llm.model import GPT, flops_per_token, num_params, parts_of


def _norm_equation(config, name: str = "Norm") -> str:
    if config.norm == "rmsnorm":
        return f"{name}(x) = g \u2299 x / \u221a(mean(x\u00b2) + \u03b5)"
    bias = " + b" if config.bias else ""
    return f"{name}(x) = g \u2299 (x \u2212 mean(x)) / \u221a(var(x) + \u03b5){bias}"


def _norm_label(config) -> str:
    return "RMSNorm" if config.norm == "rmsnorm" else "LayerNorm"


def _attention_kind(config) -> str:
    H, Hkv = config.n_head, config.n_kv_head
    if Hkv == H:
        return "multi-head attention"
    if Hkv == 1:
        return "multi-query attention"
    return f"grouped-query attention ({H // Hkv} query heads share each key/value head)"


def _attention(config) -> dict:
    D, H, Hkv = config.head_dim, config.n_head, config.n_kv_head
    qkv_bias = " + b" if config.qkv_bias else ""
    out_bias = " + b_O" if config.bias else ""
    notes = []
    if config.qk_norm:
        notes.append("q, k RMS-normalised per head")
    if config.position == "rope":
        notes.append("q, k rotated by their position (RoPE)")
    return {
        "label": "Causal self-attention",
        "detail": f"{_attention_kind(config)}: {H} heads \u00d7 {D} dims, {Hkv} key/value heads"
                  + (f"; {', '.join(notes)}" if notes else ""),
        "equation": f"q, k, v = x W_qkv{qkv_bias};  head_h = softmax(q_h k_h\u1d40 / \u221a{D} + causal mask) v_h;  "
                    f"Attn(x) = [head_1 \u2026 head_{H}] W_O{out_bias}",
    }


def _mlp(config) -> dict:
    C, F = config.d_model, config.d_ff
    if config.mlp == "swiglu":
        return {"label": "MLP (SwiGLU)", "detail": f"{C} \u2192 2 \u00d7 {F} \u2192 {C}",
                "equation": "MLP(x) = (SiLU(x W_gate) \u2299 x W_up) W_down"}
    b1, b2 = (" + b_1", " + b_2") if config.bias else ("", "")
    return {"label": "MLP (GELU)", "detail": f"{C} \u2192 {F} \u2192 {C}",
            "equation": f"MLP(x) = GELU(x W_1{b1}) W_2{b2}"}


def _descriptions(config) -> dict[str, dict]:
    V, C, T = config.vocab_size, config.d_model, config.context_length
    norm = {"label": _norm_label(config), "detail": f"{C} wide, \u03b5 = {config.norm_eps:g}"}
    tied = config.tie_embeddings
    return {
        "tok_emb": {"label": "Token embedding", "detail": f"{V} tokens \u00d7 {C}"
                    + (" (also the output layer)" if tied else ""), "equation": "x = W_E[token]"},
        "pos_emb": {"label": "Learned positions", "detail": f"{T} positions \u00d7 {C}",
                    "equation": "x = x + W_P[position]"},
        "rope": {"label": "Rotary positions (RoPE)", "detail": f"no parameters, \u03b8 = {config.rope_theta:g}",
                 "equation": f"(q_i, q_i+D/2) rotated by position \u00b7 \u03b8^(\u22122i/{config.head_dim}); k likewise"},
        "norm1": {**norm, "equation": _norm_equation(config, "Norm\u2081")},
        "attn": _attention(config),
        "norm2": {**norm, "equation": _norm_equation(config, "Norm\u2082")},
        "mlp": _mlp(config),
        "final_norm": {**norm, "label": f"Final {_norm_label(config)}", "equation": _norm_equation(config)},
        "lm_head": {"label": "Output layer" + (" (tied)" if tied else ""),
                    "detail": f"{C} \u2192 {V} logits" + (", reuses the token embedding: no parameters of its own"
                                                          if tied else ""),
                    "equation": "logits = Norm(x) W_E\u1d40" if tied else "logits = Norm(x) W_U"},
    }


def block_equation(config) -> str:
    if config.norm_placement == "pre":
        return "x = x + Attn(Norm\u2081(x));  x = x + MLP(Norm\u2082(x))"
    return "x = Norm\u2081(x + Attn(x));  x = Norm\u2082(x + MLP(x))"


def describe(model: GPT, seq_len: int | None = None) -> dict:
    """The diagram's data for `model` (see the module docstring). seq_len: the sequence length the
    attention FLOPs assume (default: the context length)."""
    config = model.config
    T = config.context_length if seq_len is None else seq_len
    text = _descriptions(config)
    counted = parts_of(model, T)
    by_name = {p["name"]: p for p in counted}

    def part(name: str, params: int, flops: int, **extra) -> dict:
        return {"name": name, **text[name], "params": params, "flops": flops, **extra}

    inputs = [part("tok_emb", by_name["tok_emb"]["params"], 0)]
    if "pos_emb" in by_name:
        inputs.append(part("pos_emb", by_name["pos_emb"]["params"], 0))
    else:
        inputs.append(part("rope", 0, 0))
    block_parts = []
    for name in ("norm1", "attn", "norm2", "mlp"):
        each = [by_name[f"blocks.{i}.{name}"] for i in range(config.n_layer)]
        block_parts.append(part(name, each[0]["params"], each[0]["flops"],
                                params_all=sum(p["params"] for p in each), flops_all=sum(p["flops"] for p in each)))
    outputs = [part(name, by_name[name]["params"], by_name[name]["flops"])
               for name in ("final_norm", "lm_head") if name in by_name]
    return {
        "totals": {"params": num_params(model), "non_embedding_params": num_params(model, non_embedding=True),
                   "flops_per_token": flops_per_token(config, T), "seq_len": T,
                   "flops_note": "training FLOPs per token (forward + backward = 3 \u00d7 forward), "
                                 f"attention counted over {T} positions"},
        "input": inputs,
        "block": {"count": config.n_layer, "norm_placement": config.norm_placement,
                  "equation": block_equation(config), "parts": block_parts},
        "output": outputs,
    }
