"""Why this token? Direct logit attribution and activation patching, as plain data.

Both read the one forward pass (GPT.forward) through PyTorch forward hooks on its modules, so the
model's math stays in llm/model.py: hooks only copy out, or overwrite, what a module returns.

Direct logit attribution (DLA). In a pre-norm model the residual stream at the last layer is a
sum of writes: token embedding + position embedding + for each block, each attention head's
output (W_O restricted to the head, times the head's weighted values), the attention output bias,
and the MLP's output. The logit of token t at position p is

    logit_t = W_U[t] . finalnorm(x),   finalnorm(x) = g * (x - mean(x)) / s + b     (LayerNorm)
                                       finalnorm(x) = g * x / s                      (RMSNorm)

where s is the norm's scale at that position (sqrt(var(x) + eps), or sqrt(mean(x^2) + eps)).
Freezing s at its value for the real x (as TransformerLens does) makes the read-out linear, so
each write c gets

    contribution(c) = W_U[t] . (g * centre(c) / s)     centre(c) = c - mean(c) for LayerNorm, c for RMSNorm

and the contributions sum to the logit minus the one term no write owns: W_U[t] . b, the final
norm's bias (0 for RMSNorm or a bias-free LayerNorm). The output layer has no bias. Post-norm
models normalise the stream inside every block, so their writes do not add up: refused.

Activation patching. Run a corrupted prompt, but overwrite the residual stream at one layer and
position with its value from the clean prompt; how much of the clean answer comes back says where
the information that decides the answer lives. The measure is the logit of the clean answer minus
that of a foil (by default the corrupted prompt's own answer), at the last position. Layer 0 is
the embeddings, layer i the stream after block i-1 (the indices of GPTOutput.hidden_states).
Overwriting a whole layer (every position) gives back the clean run exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from llm.introspect import DecodeToken, _evaluating, _run
from llm.model import GPT

# --- hooks --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _hooks(*handles):
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _capture_writes(model: GPT, position: int) -> tuple[list, list, list, list, contextlib.AbstractContextManager]:
    """Per block, during the next forward pass inside the returned context: the query/key/value
    projection (B, T, (H + 2 Hkv) * D), the attention weights of the query at `position` (H, T),
    the heads' outputs before the output projection (B, T, H*D) and the MLP's output (B, T, C).
    Only the one row of each attention map is kept: the block's full (H, T, T) map is dropped as
    soon as it is made, so a long prompt costs one map at a time, not one per layer."""
    qkvs, reads, heads, mlps = [], [], [], []

    def keep_one_row(module, args, out):
        x, probs = out
        reads.append(probs[0, :, position])
        return x, None

    handles = []
    for block in model.blocks:
        handles.append(block.attn.qkv.register_forward_hook(lambda module, args, out: qkvs.append(out)))
        handles.append(block.attn.proj.register_forward_pre_hook(lambda module, args: heads.append(args[0])))
        handles.append(block.mlp.register_forward_hook(lambda module, args, out: mlps.append(out)))
        handles.append(block.register_forward_hook(keep_one_row))
    return qkvs, reads, heads, mlps, _hooks(*handles)


def _residual_module(model: GPT, layer: int) -> nn.Module:
    """The module whose output is hidden_states[layer]: the embeddings' dropout, or block layer-1."""
    return model.drop if layer == 0 else model.blocks[layer - 1]


def _overwrite_residual(model: GPT, layer: int, edit: Callable[[torch.Tensor], None]):
    """A context in which hidden_states[layer] is edited in place by `edit(x)` before use."""
    def hook(module, args, out):
        x = out[0] if isinstance(out, tuple) else out
        edit(x)
        return out
    return _hooks(_residual_module(model, layer).register_forward_hook(hook))


# --- direct logit attribution -------------------------------------------------------------------

def _final_norm_readout(model: GPT, x: torch.Tensor, target: int) -> tuple[Callable, float, float, str]:
    """For the final residual x (C,): read(c) (writes (..., C) -> their contributions (...)), the
    frozen scale s, the bias term, the norm kind."""
    norm = model.final_norm
    w_u = model.lm_head.weight[target].double()
    x = x.double()
    if isinstance(norm, nn.LayerNorm):
        scale = torch.sqrt(x.var(unbiased=False) + norm.eps)
        centre = lambda c: c - c.mean(dim=-1, keepdim=True)  # noqa: E731
        kind = "layernorm"
    elif isinstance(norm, nn.RMSNorm):
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        scale = torch.sqrt(x.pow(2).mean() + eps)
        centre = lambda c: c  # noqa: E731
        kind = "rmsnorm"
    else:
        raise ValueError("direct logit attribution needs a pre-norm model (norm_placement='pre'): a post-norm "
                         "model normalises the residual stream inside every block, so its writes do not add up")
    gain = norm.weight.double() if norm.weight is not None else torch.ones_like(x)
    direction = w_u * gain / scale
    bias = getattr(norm, "bias", None)
    bias_term = float(w_u @ bias.double()) if bias is not None else 0.0
    return (lambda c: centre(c.double()) @ direction), float(scale), bias_term, kind


def direct_logit_attribution(model: GPT, token_ids: Sequence[int], decode_token: DecodeToken = str, *,
                             position: int = -1, target: int | None = None, top_k: int = 5,
                             digits: int | None = 6) -> dict:
    """How much each part of the model pushed the logit of `target` (default: the model's top
    prediction) at `position` (default: the last). One forward pass. Returns

        {"position", "target": {"id", "text"}, "logit", "bias_term", "sum",
         "final_norm": {"kind", "scale"}, "embeddings": {"token", "position" (learned only)},
         "layers": [{"layer", "heads": [per head], "sources": [per head, per source position
                     0..position: the part of the head's contribution read from that token],
                     "attention_bias", "mlp"}],
         "top": top-k predictions at the position [{"id", "text", "logit", "prob"}]}

    where sum = every contribution added up = logit - bias_term (see the module docstring)."""
    ids = [int(t) for t in token_ids]
    config = model.config
    if not -len(ids) <= position < len(ids):
        raise ValueError(f"position {position} is outside the {len(ids)} tokens")
    position %= len(ids)
    qkvs, reads, heads, mlps, capturing = _capture_writes(model, position)
    with capturing:
        output = _run(model, ids, attention=True, hidden=True)
    logits = output.logits[0, position].float()
    if target is None:
        target = int(logits.argmax())
    if not 0 <= target < config.vocab_size:
        raise ValueError(f"target token {target} is outside the vocabulary [0, {config.vocab_size})")
    r = (lambda v: v) if digits is None else (lambda v: round(v, digits))
    with _evaluating(model):
        read, scale, bias_term, kind = _final_norm_readout(model, output.hidden_states[-1][0, position], target)
        embeddings = {"token": float(read(model.tok_emb.weight[ids[position]]))}
        if config.position == "learned":
            embeddings["position"] = float(read(model.pos_emb.weight[position]))
        layers = []
        H, Hkv, D = config.n_head, config.n_kv_head, config.head_dim
        for i, block in enumerate(model.blocks):
            w_o = block.attn.proj.weight.view(-1, H, D)                      # (C, H, D): head h's slice of W_O
            y = heads[i][0, position].view(H, D)                             # each head's output here
            per_head = read(torch.einsum("chd,hd->hc", w_o, y))              # (H,)
            # A head's output is its attention-weighted sum of value vectors, so its contribution
            # splits exactly over the positions it read from: p[position, k] * read(W_O_h v_h[k]).
            values = qkvs[i][0].view(len(ids), H + 2 * Hkv, D)[:position + 1, H + Hkv:]   # (k, Hkv, D)
            values = values.repeat_interleave(H // Hkv, dim=1)                 # query head h reads kv head h // group
            probs = reads[i][:, :position + 1].double()                       # (H, k)
            sources = probs * read(torch.einsum("chd,khd->hkc", w_o, values))  # (H, k)
            attn_bias = block.attn.proj.bias
            layers.append({"layer": i, "heads": per_head.tolist(), "sources": sources.tolist(),
                           "attention_bias": float(read(attn_bias)) if attn_bias is not None else 0.0,
                           "mlp": float(read(mlps[i][0, position]))})
    total = sum(embeddings.values()) + sum(sum(la["heads"]) + la["attention_bias"] + la["mlp"] for la in layers)
    best = logits.topk(min(top_k, logits.numel()))
    probs = logits.softmax(-1)
    return {
        "position": position,
        "target": {"id": target, "text": decode_token(target)},
        "logit": r(float(logits[target])), "bias_term": r(bias_term), "sum": r(total),
        "final_norm": {"kind": kind, "scale": r(scale)},
        "embeddings": {k: r(v) for k, v in embeddings.items()},
        "layers": [{"layer": la["layer"], "heads": [r(v) for v in la["heads"]],
                    "sources": [[r(v) for v in head] for head in la["sources"]],
                    "attention_bias": r(la["attention_bias"]), "mlp": r(la["mlp"])} for la in layers],
        "top": [{"id": i, "text": decode_token(i), "logit": r(float(logits[i])), "prob": r(float(probs[i]))}
                for i in best.indices.tolist()],
    }


# --- activation patching ------------------------------------------------------------------------

def _check_pair(model: GPT, clean: Sequence[int], corrupted: Sequence[int]) -> tuple[list[int], list[int]]:
    clean, corrupted = [int(t) for t in clean], [int(t) for t in corrupted]
    if len(clean) != len(corrupted):
        raise ValueError(f"the clean prompt has {len(clean)} tokens and the corrupted one {len(corrupted)}: "
                         "patching swaps activations position by position, so both need the same number of tokens")
    return clean, corrupted


def _patched_logits(model: GPT, corrupted: list[int], clean_stream: torch.Tensor, layer: int,
                    rows: list[list[int]]) -> torch.Tensor:
    """Logits at the last position (len(rows), V) of the corrupted prompt, row r with the residual
    stream at `layer` overwritten by clean_stream (T, C) at positions rows[r]. One batched pass."""
    n = len(rows)
    device = clean_stream.device
    batch_rows = torch.tensor([r for r, positions in enumerate(rows) for _ in positions], dtype=torch.long, device=device)
    batch_positions = torch.tensor([p for positions in rows for p in positions], dtype=torch.long, device=device)

    def edit(x):
        x[batch_rows, batch_positions] = clean_stream[batch_positions].to(x.dtype)

    idx = torch.tensor([corrupted] * n, device=device)
    last = torch.full((n,), len(corrupted) - 1, dtype=torch.long, device=device)
    with _evaluating(model), _overwrite_residual(model, layer, edit):
        return model(idx, logits_at=last).logits[:, 0].float()


def patch_residual(model: GPT, clean: Sequence[int], corrupted: Sequence[int], layer: int,
                   positions: Sequence[int]) -> torch.Tensor:
    """Logits (V,) at the last position of the corrupted prompt with the residual stream at `layer`
    (0 = embeddings, i = after block i-1) taken from the clean prompt at `positions`."""
    clean, corrupted = _check_pair(model, clean, corrupted)
    if not 0 <= layer <= model.config.n_layer:
        raise ValueError(f"layer {layer} is outside 0..{model.config.n_layer}")
    stream = _run(model, clean, attention=False, hidden=True).hidden_states[layer][0]
    return _patched_logits(model, corrupted, stream, layer, [list(positions)])[0]


def activation_patching(model: GPT, clean: Sequence[int], corrupted: Sequence[int],
                        decode_token: DecodeToken = str, *, target: int | None = None, foil: int | None = None,
                        digits: int | None = 6) -> dict:
    """Patch every (layer, position) of the residual stream from the clean into the corrupted run.

    metric = logit(target) - logit(foil) at the last position; target defaults to the clean run's
    prediction, foil to the corrupted run's (none when they agree: then the metric is the target's
    logit). Returns {"target", "foil", "metric", "clean", "corrupted", "layers": [{"layer", "label",
    "values": metric per position, "restored": (value - corrupted) / (clean - corrupted) per
    position, null when clean = corrupted}], "tokens": {"clean": [...], "corrupted": [...]}}.
    Cost: (n_layer + 1) batched passes of T rows."""
    clean, corrupted = _check_pair(model, clean, corrupted)
    V = model.config.vocab_size
    for name, token in (("target", target), ("foil", foil)):
        if token is not None and not 0 <= token < V:
            raise ValueError(f"{name} token {token} is outside the vocabulary [0, {V})")
    clean_out = _run(model, clean, attention=False, hidden=True)
    corrupted_logits = _run(model, corrupted, attention=False, hidden=False).logits[0, -1].float()
    clean_logits = clean_out.logits[0, -1].float()
    if target is None:
        target = int(clean_logits.argmax())
    if foil is None:
        answer = int(corrupted_logits.argmax())
        foil = answer if answer != target else None

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[..., target] - (logits[..., foil] if foil is not None else 0.0)

    clean_m, corrupted_m = float(metric(clean_logits)), float(metric(corrupted_logits))
    gap = clean_m - corrupted_m
    r = (lambda v: v) if digits is None else (lambda v: round(v, digits))
    T = len(clean)
    layers = []
    for layer in range(model.config.n_layer + 1):
        stream = clean_out.hidden_states[layer][0]
        values = metric(_patched_logits(model, corrupted, stream, layer, [[p] for p in range(T)])).tolist()
        layers.append({"layer": layer, "label": "embeddings" if layer == 0 else f"after block {layer - 1}",
                       "values": [r(v) for v in values],
                       "restored": [r((v - corrupted_m) / gap) if gap != 0 else None for v in values]})
    described = "logit(target)" + (" - logit(foil)" if foil is not None else "")
    return {
        "target": {"id": target, "text": decode_token(target)},
        "foil": None if foil is None else {"id": foil, "text": decode_token(foil)},
        "metric": described, "clean": r(clean_m), "corrupted": r(corrupted_m), "layers": layers,
        "tokens": {"clean": [decode_token(t) for t in clean], "corrupted": [decode_token(t) for t in corrupted]},
    }
