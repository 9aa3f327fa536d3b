"""What the model computes, as plain data: lists and dicts of numbers and strings, ready for JSON.

One forward pass of a token sequence gives, per position, the model's next-token distribution,
and on request each layer's attention probabilities and residual stream. Four views of it:

    token_table   each token with the probability the model gave it, its surprisal in bits,
                  and the top-k candidates the model proposes for the token after it
    attention     attention probabilities per layer and head (choose which), rows = queries
    logit_lens    each layer's residual stream read out through the final norm and the output
                  layer: what the model "would predict" if it stopped at that layer
    inspect       all of the above from a single forward pass

Token text comes from `decode_token(id) -> str`, so this module needs no tokenizer class:
pass `tokenizer.decode_one`, `lambda i: vocab[i]`, or `str` for bare ids.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch

from llm.model import GPT, GPTOutput

DecodeToken = Callable[[int], str]


@contextmanager
def _evaluating(model: GPT):
    """Eval mode (no dropout) and no gradients for the duration; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _run(model: GPT, token_ids: Sequence[int], *, attention: bool, hidden: bool) -> GPTOutput:
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("token_ids is empty")
    config = model.config
    if len(ids) > config.context_length:
        raise ValueError(f"{len(ids)} tokens is more than context_length={config.context_length}")
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
        raise ValueError(f"token ids outside [0, {config.vocab_size}): {bad[:5]}")
    device = next(model.parameters()).device
    with _evaluating(model):
        return model(torch.tensor([ids], device=device), return_attention=attention, return_hidden=hidden)


def _round(x: float, digits: int | None) -> float:
    return x if digits is None else round(x, digits)


def _candidates(probs: torch.Tensor, k: int, decode_token: DecodeToken, digits) -> list[list[dict]]:
    """Top-k of each row of probs (T, V): [[{"id", "text", "prob"}, ...], ...]."""
    best = probs.topk(min(k, probs.size(-1)), dim=-1)
    return [[{"id": i, "text": decode_token(i), "prob": _round(p, digits)} for i, p in zip(ids, ps)]
            for ids, ps in zip(best.indices.tolist(), best.values.tolist())]


def _check_indices(kind: str, chosen: Sequence[int] | None, count: int) -> list[int]:
    if chosen is None:
        return list(range(count))
    bad = [i for i in chosen if not 0 <= i < count]
    if bad:
        raise ValueError(f"{kind} {bad} out of range: the model has {count} (0..{count - 1})")
    return list(chosen)


# --- the views, from a forward pass's output ----------------------------------------------------

def _token_table(output: GPTOutput, ids: list[int], decode_token: DecodeToken, top_k: int, digits) -> list[dict]:
    probs = output.logits[0].float().softmax(dim=-1)                  # (T, V): row i predicts token i+1
    # Probability of each actual token given the ones before it; the first token has no prediction.
    following = torch.tensor(ids[1:], dtype=torch.long, device=probs.device)
    given = [None] + probs[:-1].gather(-1, following[:, None]).squeeze(-1).tolist()
    nexts = _candidates(probs, top_k, decode_token, digits)
    rows = []
    for i, (token, p) in enumerate(zip(ids, given)):
        rows.append({
            "position": i, "id": token, "text": decode_token(token),
            "prob": None if p is None else _round(p, digits),
            # Surprisal -log2 p: bits of information the token carried for the model.
            "surprisal_bits": None if p is None else _round(-math.log2(max(p, 1e-45)), digits),
            "next": nexts[i],
        })
    return rows


def _attention(output: GPTOutput, ids: list[int], decode_token: DecodeToken, layers, heads, digits) -> dict:
    n_layer, n_head = len(output.attentions), output.attentions[0].size(1)
    layers = _check_indices("layers", layers, n_layer)
    heads = _check_indices("heads", heads, n_head)
    out = []
    for layer in layers:
        maps = output.attentions[layer][0].float()                     # (H, T, T)
        out.append({"layer": layer, "heads": [
            {"head": h, "weights": [[_round(w, digits) for w in row] for row in maps[h].tolist()]}
            for h in heads]})
    return {"tokens": [decode_token(t) for t in ids], "layers": out}


def _logit_lens(model: GPT, output: GPTOutput, ids: list[int], decode_token: DecodeToken, top_k: int,
                layers, digits) -> dict:
    streams = output.hidden_states                                     # n_layer + 1 of (1, T, C)
    layers = _check_indices("layers", layers, len(streams))
    out = []
    with _evaluating(model):
        for layer in layers:
            logits = model.lm_head(model.final_norm(streams[layer][0]))  # the same read-out as the last layer
            out.append({"layer": layer, "label": "embeddings" if layer == 0 else f"after block {layer - 1}",
                        "positions": _candidates(logits.float().softmax(dim=-1), top_k, decode_token, digits)})
    return {"tokens": [decode_token(t) for t in ids], "layers": out}


# --- public API ---------------------------------------------------------------------------------

def token_table(model: GPT, token_ids: Sequence[int], decode_token: DecodeToken, *, top_k: int = 5,
                digits: int | None = 6) -> list[dict]:
    """Per position: {"position", "id", "text", "prob", "surprisal_bits", "next": top-k candidates
    for the following token}. prob and surprisal are None at position 0 (nothing predicts it)."""
    output = _run(model, token_ids, attention=False, hidden=False)
    return _token_table(output, [int(t) for t in token_ids], decode_token, top_k, digits)


def attention(model: GPT, token_ids: Sequence[int], decode_token: DecodeToken, *,
              layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
              digits: int | None = 4) -> dict:
    """{"tokens": [...], "layers": [{"layer", "heads": [{"head", "weights": T x T}]}]}; weights[q][k]
    is how much query position q attends to key position k (each row sums to 1; k > q is 0).
    layers / heads: which to include (0-based), all by default."""
    output = _run(model, token_ids, attention=True, hidden=False)
    return _attention(output, [int(t) for t in token_ids], decode_token, layers, heads, digits)


def logit_lens(model: GPT, token_ids: Sequence[int], decode_token: DecodeToken, *, top_k: int = 5,
               layers: Sequence[int] | None = None, digits: int | None = 6) -> dict:
    """{"tokens": [...], "layers": [{"layer", "label", "positions": [top-k per position]}]}.
    Layer 0 is the embeddings, layer i the residual stream after block i-1; the last layer's
    read-out is the model's actual prediction."""
    output = _run(model, token_ids, attention=False, hidden=True)
    return _logit_lens(model, output, [int(t) for t in token_ids], decode_token, top_k, layers, digits)


def inspect(model: GPT, token_ids: Sequence[int], decode_token: DecodeToken, *, top_k: int = 5,
            attention_layers: Sequence[int] | None = None, attention_heads: Sequence[int] | None = None,
            with_attention: bool = True, with_logit_lens: bool = True, digits: int | None = 6) -> dict:
    """All views from one forward pass: {"tokens": token_table, "attention": ..., "logit_lens": ...}."""
    ids = [int(t) for t in token_ids]
    output = _run(model, ids, attention=with_attention, hidden=with_logit_lens)
    result = {"tokens": _token_table(output, ids, decode_token, top_k, digits)}
    if with_attention:
        result["attention"] = _attention(output, ids, decode_token, attention_layers, attention_heads, digits)
    if with_logit_lens:
        result["logit_lens"] = _logit_lens(model, output, ids, decode_token, top_k, None, digits)
    return result
