"""POST /v1/introspect: ask the model why it said what it said.

For a text (or token ids) one forward pass gives, per token: its id, display text and byte span
in the UTF-8 text; the probability the model gave it and its surprisal in bits; the top-k
candidates for the next token; on request, attention probabilities for chosen layers and heads,
and the logit lens (the top-k read-out of the residual stream after every layer). The numbers
come from llm.introspect; this module adds byte spans, validation and the caps below.

Caps (defaults; see serving.options.Limits and `python -m serving --help`):

    tokens                      at most the model's context length (introspect_max_tokens)
    top_k                       at most the vocabulary size (introspect_max_top_k)
    tokens x top_k              at most 1,048,576 numbers (introspect_max_values)
    (layers + 1) x tokens x top_k   the same, with logit_lens
    layers x heads x tokens^2   the same, for attention maps
    layer / head indices        within the model (0-based): else 400
    step                        one of the model's training snapshots: else 404 listing them

It is a plain LitAPI on LitServe's own request path, with its own worker process and its own
copy of the model (a LitAPI's worker cannot see another's); requests are validated there and
answered 400 with a message when over a cap.
"""

# No `from __future__ import annotations` here: LitServe reads decode_request's parameter
# annotation as a class to build the route's request model (a string would become a query field).

import copy
import signal
from functools import lru_cache

import litserve as ls
import torch
from fastapi import HTTPException

from llm import introspect
from llm.model import GPT, ModelConfig
from llm.snapshots import load_snapshot
from llm.tokenizer import Tokenizer
from serving.loading import load_model_dir, snapshot_steps, snapshots_dir, step_problem
from serving.options import Limits, ServeOptions
from serving.schemas import IntrospectRequest, IntrospectResponse
from serving.text import token_bytes, token_text
from serving.worker import die_with_parent

INTROSPECT_PATH = "/v1/introspect"


def caps(config: ModelConfig, tokenizer: Tokenizer, limits: Limits) -> dict[str, int]:
    return {
        "max_tokens": min(limits.introspect_max_tokens or config.context_length, config.context_length),
        "max_top_k": min(limits.introspect_max_top_k or tokenizer.vocab_size, tokenizer.vocab_size),
        "max_values": limits.introspect_max_values,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
    }


def plan(request: IntrospectRequest, config: ModelConfig, tokenizer: Tokenizer, limits: Limits,
         model_name: str, steps: list[int] = ()) -> dict:
    """Check a request against the model and the caps (HTTPException 4xx naming the problem);
    the token ids and options for `run`."""
    def bad(message: str, status: int = 400):
        raise HTTPException(status, message)

    if request.model is not None and request.model != model_name:
        bad(f"the model '{request.model}' does not exist here; this server serves '{model_name}'", 404)
    check_step(request.step, steps, model_name)
    cap = caps(config, tokenizer, limits)
    ids = tokenizer.encode(request.text) if request.text is not None else list(request.token_ids)
    if not ids:
        bad("the text encodes to no tokens")
    outside = [t for t in ids if t >= tokenizer.vocab_size]
    if outside:
        bad(f"token ids must be below the vocabulary size {tokenizer.vocab_size}; got {outside[:5]}")
    n, k = len(ids), request.top_k
    if n > cap["max_tokens"]:
        bad(f"{n} tokens; introspection takes at most {cap['max_tokens']}")
    if k > cap["max_top_k"]:
        bad(f"top_k is {k}; at most {cap['max_top_k']}")
    if n * k > cap["max_values"]:
        bad(f"tokens x top_k = {n * k} candidates; at most {cap['max_values']}")
    if request.logit_lens and (config.n_layer + 1) * n * k > cap["max_values"]:
        bad(f"the logit lens would hold (layers + 1) x tokens x top_k = {(config.n_layer + 1) * n * k} "
            f"candidates; at most {cap['max_values']}: lower top_k or send less text")
    layers = heads = None
    if request.attention is not None:
        layers = sorted(set(request.attention.layers))
        heads = sorted(set(request.attention.heads)) if request.attention.heads else list(range(config.n_head))
        if layers[-1] >= config.n_layer:
            bad(f"attention layer {layers[-1]} is out of range: the model has {config.n_layer} layers "
                f"(0..{config.n_layer - 1})")
        if heads[-1] >= config.n_head:
            bad(f"attention head {heads[-1]} is out of range: the model has {config.n_head} heads "
                f"(0..{config.n_head - 1})")
        size = len(layers) * len(heads) * n * n
        if size > cap["max_values"]:
            bad(f"attention maps of layers x heads x tokens^2 = {size} numbers; at most {cap['max_values']}: "
                "ask for fewer layers or heads, or send less text")
    return {"ids": ids, "top_k": k, "layers": layers, "heads": heads, "logit_lens": request.logit_lens,
            "step": request.step, "caps": cap}


def check_step(step: int | None, steps: list[int], model_name: str) -> None:
    """A request's `step` must be one of the model's snapshots (None: the trained model): else 404."""
    if step is not None and (problem := step_problem(step, list(steps), model_name)):
        raise HTTPException(404, problem)


def byte_spans(tokenizer: Tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each token in the UTF-8 bytes of the decoded text."""
    spans, at = [], 0
    for i in ids:
        size = len(token_bytes(tokenizer, i))
        spans.append((at, at + size))
        at += size
    return spans


def run(model, tokenizer: Tokenizer, planned: dict, model_name: str) -> dict:
    """One forward pass; the response body."""
    ids = planned["ids"]
    result = introspect.inspect(
        model, ids, lambda i: token_text(tokenizer, i), top_k=planned["top_k"],
        attention_layers=planned["layers"], attention_heads=planned["heads"],
        with_attention=planned["layers"] is not None, with_logit_lens=planned["logit_lens"])
    tokens = []
    for row, (start, end) in zip(result["tokens"], byte_spans(tokenizer, ids)):
        tokens.append({"position": row["position"], "id": row["id"], "text": row["text"],
                       "byte_start": start, "byte_end": end, "prob": row["prob"],
                       "surprisal_bits": row["surprisal_bits"], "next": row["next"]})
    return {
        "model": model_name,
        "step": planned["step"],
        "tokens": tokens,
        "attention": result["attention"]["layers"] if "attention" in result else None,
        "logit_lens": result["logit_lens"]["layers"] if "logit_lens" in result else None,
        "caps": planned["caps"],
    }


class IntrospectAPI(ls.LitAPI):
    def __init__(self, options: ServeOptions):
        super().__init__(api_path=INTROSPECT_PATH)
        self.options = options

    def setup(self, device):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops the workers on Ctrl-C
        die_with_parent()
        torch.set_num_threads(1)
        self.model, self.tokenizer = load_model_dir(self.options.model_dir, device)
        self.steps = snapshot_steps(self.options.model_dir)
        self.device = device

    @lru_cache(maxsize=2)  # noqa: B019 (one API object per worker process, alive as long as it)
    def snapshot(self, step: int) -> GPT:
        """The model as it was at a training step: a copy of the model with that snapshot's weights."""
        return load_snapshot(copy.deepcopy(self.model), snapshots_dir(self.options.model_dir), step, self.device)

    def decode_request(self, request: IntrospectRequest) -> dict:
        return plan(request, self.model.config, self.tokenizer, self.options.limits, self.options.model_name,
                    self.steps)

    def model_at(self, step: int | None) -> GPT:
        """The trained model, or a snapshot's (`step` already checked by check_step)."""
        return self.model if step is None else self.snapshot(step)

    def predict(self, planned: dict) -> dict:
        return run(self.model_at(planned["step"]), self.tokenizer, planned, self.options.model_name)

    def encode_response(self, output: dict) -> IntrospectResponse:
        return output
