"""POST /v1/attribution and POST /v1/patching: why the model predicts a token.

    /v1/attribution   direct logit attribution: how much each head, MLP and embedding pushed the
                      target token's logit at a position (llm.attribution; one forward pass)
    /v1/patching      activation patching between a clean and a corrupted prompt of the same length:
                      which layer and position bring the clean answer back ((layers + 1) passes)

Both run in the introspection worker, on its copy of the model: the HTTP process validates the
body (strict schemas), then puts it on that worker's LitServe queue, as LitServe's own route for
/v1/introspect does; the worker (IntrospectAndExplainAPI) hands these requests to `plan` and `run`.
Checks against the model (token ids, lengths, positions, the caps) answer 400 naming the problem.

Caps: prompts of at most introspect_max_tokens (the context by default), and for patching
(layers + 1) x tokens^2 token-passes of at most patching_max_token_passes.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations as classes.

from fastapi import FastAPI, HTTPException
from litserve.server import RegularRequestHandler

from llm import attribution
from llm.model import ModelConfig
from llm.tokenizer import Tokenizer
from serving.introspection import IntrospectAPI, caps, check_step
from serving.options import Limits
from serving.schemas import (
    AttributionRequest,
    AttributionResponse,
    IntrospectRequest,
    PatchingRequest,
    PatchingResponse,
    PromptInput,
)
from serving.text import token_text

ATTRIBUTION_PATH = "/v1/attribution"
PATCHING_PATH = "/v1/patching"
FINAL_NORM_METHOD = ("The final norm's scale is frozen at its value for this position (as TransformerLens "
                     "does), which makes the read-out linear: each write c contributes "
                     "W_U[target] . (g * centre(c) / scale); the contributions sum to the logit minus "
                     "W_U[target] . b, the final norm's bias (bias_term).")


def _bad(message: str, status: int = 400):
    raise HTTPException(status, message)


def _ids(prompt: PromptInput, tokenizer: Tokenizer, max_tokens: int, name: str) -> list[int]:
    ids = tokenizer.encode(prompt.text) if prompt.text is not None else list(prompt.token_ids)
    if not ids:
        _bad(f"{name}: the text encodes to no tokens")
    outside = [t for t in ids if t >= tokenizer.vocab_size]
    if outside:
        _bad(f"{name}: token ids must be below the vocabulary size {tokenizer.vocab_size}; got {outside[:5]}")
    if len(ids) > max_tokens:
        _bad(f"{name}: {len(ids)} tokens; this server explains at most {max_tokens}")
    return ids


def _check_token(name: str, token: int | None, vocab_size: int) -> None:
    if token is not None and token >= vocab_size:
        _bad(f"{name} token {token} is out of range: the vocabulary has {vocab_size} tokens (0..{vocab_size - 1})")


def plan(request, config: ModelConfig, tokenizer: Tokenizer, limits: Limits, model_name: str,
         steps: list[int] = ()) -> dict:
    """Check an AttributionRequest or PatchingRequest against the model, its snapshots' `steps` and
    the caps (HTTPException 4xx); what `run` needs."""
    if request.model is not None and request.model != model_name:
        _bad(f"the model '{request.model}' does not exist here; this server serves '{model_name}'", 404)
    check_step(request.step, steps, model_name)
    max_tokens = caps(config, tokenizer, limits)["max_tokens"]
    if config.norm_placement != "pre" and isinstance(request, AttributionRequest):
        _bad("direct logit attribution needs a pre-norm model: this one is post-norm, whose blocks "
             "normalise the residual stream, so the parts' writes do not add up")
    if isinstance(request, AttributionRequest):
        ids = _ids(request, tokenizer, max_tokens, "text" if request.text is not None else "token_ids")
        if not -len(ids) <= request.position < len(ids):
            _bad(f"position {request.position} is outside the prompt's {len(ids)} tokens "
                 f"(0..{len(ids) - 1}, or -1 for the last)")
        _check_token("target", request.target, config.vocab_size)
        return {"explain": "attribution", "ids": ids, "position": request.position, "target": request.target,
                "top_k": request.top_k, "step": request.step}
    clean = _ids(request.clean, tokenizer, max_tokens, "clean")
    corrupted = _ids(request.corrupted, tokenizer, max_tokens, "corrupted")
    if len(clean) != len(corrupted):
        _bad(f"the clean prompt has {len(clean)} tokens and the corrupted one {len(corrupted)}: patching swaps "
             "activations position by position, so both need the same number of tokens")
    _check_token("target", request.target, config.vocab_size)
    _check_token("foil", request.foil, config.vocab_size)
    passes = (config.n_layer + 1) * len(clean) ** 2
    if passes > limits.patching_max_token_passes:
        _bad(f"patching {len(clean)} tokens at {config.n_layer + 1} layers is (layers + 1) x tokens^2 = {passes} "
             f"token-passes; this server allows {limits.patching_max_token_passes}: use shorter prompts")
    return {"explain": "patching", "clean": clean, "corrupted": corrupted, "target": request.target,
            "foil": request.foil, "step": request.step}


def run(model, tokenizer: Tokenizer, planned: dict, model_name: str) -> dict:
    decode = lambda i: token_text(tokenizer, i)  # noqa: E731
    if planned["explain"] == "attribution":
        result = attribution.direct_logit_attribution(model, planned["ids"], decode, position=planned["position"],
                                                      target=planned["target"], top_k=planned["top_k"])
        tokens = [{"id": i, "text": decode(i)} for i in planned["ids"]]
        return {"model": model_name, "step": planned["step"], "tokens": tokens, **result, "method": FINAL_NORM_METHOD}
    result = attribution.activation_patching(model, planned["clean"], planned["corrupted"], decode,
                                             target=planned["target"], foil=planned["foil"])
    return {"model": model_name, "step": planned["step"], **result}


class IntrospectAndExplainAPI(IntrospectAPI):
    """The introspection worker, answering /v1/attribution and /v1/patching too (same model copy)."""

    def decode_request(self, request: IntrospectRequest) -> dict:  # the annotation types /v1/introspect's body
        if isinstance(request, (AttributionRequest, PatchingRequest)):
            return plan(request, self.model.config, self.tokenizer, self.options.limits, self.options.model_name,
                        self.steps)
        return super().decode_request(request)

    def predict(self, planned: dict) -> dict:
        if "explain" in planned:
            return run(self.model_at(planned["step"]), self.tokenizer, planned, self.options.model_name)
        return super().predict(planned)


def add_explain_routes(app: FastAPI, server, introspection) -> None:
    """The two routes, feeding the introspection worker's queue (see the module docstring)."""
    handler = RegularRequestHandler(introspection, server)

    @app.post(ATTRIBUTION_PATH, summary="Direct logit attribution: what pushed a token's logit, per head and MLP")
    async def attribution_route(request: AttributionRequest) -> AttributionResponse:
        return await handler.handle_request(request, AttributionRequest)

    @app.post(PATCHING_PATH, summary="Activation patching: which layer and position restore the clean answer")
    async def patching_route(request: PatchingRequest) -> PatchingResponse:
        return await handler.handle_request(request, PatchingRequest)
