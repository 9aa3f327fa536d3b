"""The small routes the HTTP process answers itself: the web page (`/`, `/web/...`), `/v1`,
`/health`, `/v1/models`, `/v1/tokenize`, and the training snapshots' records and loss curves
(`/v1/snapshots`, `/v1/snapshots/{step}`: files the pretrain or instruct stage wrote, read without a model)."""

from __future__ import annotations

import dataclasses
import time
from functools import lru_cache
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

from llm import snapshots
from llm.chat import encode_prompt
from serving.errors import ApiError
from serving.introspection import byte_spans
from serving.loading import snapshot_steps, snapshots_dir, step_problem
from serving.schemas import (
    Curve,
    ModelCard,
    ModelList,
    SnapshotList,
    SnapshotRecord,
    TokenizeRequest,
    TokenizeResponse,
    TokenSpan,
)
from serving.text import token_text

STARTED = int(time.time())
WEB = Path(__file__).parent / "web"
# The page may load and call nothing but this server: a browser enforces it.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; frame-ancestors 'none'")


def add_routes(app: FastAPI, spec) -> None:
    """spec: the GenerationSpec (its tokenizer, model config and options)."""
    options = spec.options
    steps = snapshot_steps(options.model_dir)
    folder = snapshots_dir(options.model_dir)

    def card() -> ModelCard:
        return ModelCard(id=options.model_name, created=STARTED, owned_by="llm-from-scratch",
                         context_length=spec.config.context_length,
                         max_tokens=min(options.limits.max_tokens, spec.config.context_length),
                         source=options.model_source or str(options.model_dir),
                         config=dataclasses.asdict(spec.config), snapshots=steps)

    @app.get("/", summary="The web page: generation, token probabilities, attention, logit lens",
             response_class=FileResponse, responses={200: {"content": {"text/html": {}}}})
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    app.mount("/web", StaticFiles(directory=WEB), name="web")

    @app.get("/v1", summary="What this server serves")
    async def index() -> dict:
        return {"model": options.model_name, "openai_base_url": "/v1", "docs": "/docs", "page": "/",
                "endpoints": ["POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models",
                              "POST /v1/introspect", "POST /v1/tokenize", "GET /v1/snapshots",
                              "GET /v1/snapshots/{step}", "GET /v1/architecture",
                              "POST /v1/attribution", "POST /v1/patching", "POST /v1/tokenizers/compare",
                              "GET /health"]}

    @app.get("/v1/models", summary="The served model (one)")
    async def models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}", summary="One model")
    async def model(model_id: str) -> ModelCard:
        if model_id != options.model_name:
            raise ApiError(404, f"the model '{model_id}' does not exist here; this server serves "
                                f"'{options.model_name}'", param="model", code="model_not_found")
        return card()

    def check_step(step: int | None) -> None:
        problem = step_problem(step, steps, options.model_name)
        if problem:
            raise ApiError(404, problem, param="step", code="snapshot_not_found")

    @lru_cache(maxsize=32)
    def record(step: int) -> dict:
        return snapshots.read_record(folder, step)

    @app.get("/v1/snapshots", summary="The training snapshots of the model: their steps and the run's loss curves")
    async def snapshot_list() -> SnapshotList:
        check_step(None)
        curves = snapshots.read_curves(folder)
        curve = {name: Curve(steps=[s for s, _ in points], loss=[loss for _, loss in points])
                 for name, points in curves.items()}
        return SnapshotList(model=options.model_name, steps=steps, probes=[p["name"] for p in record(steps[0])["probes"]],
                            **curve)

    @app.get("/v1/snapshots/{step}", summary="What the model did with the probe texts at a training step: token "
                                             "probabilities, top-k candidates, every layer's and head's attention")
    async def snapshot_record(step: int) -> SnapshotRecord:
        check_step(step)
        return SnapshotRecord(model=options.model_name, **record(step))

    @app.post("/v1/tokenize", summary="Token ids, texts and byte spans of a text or a chat prompt")
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        if request.model is not None and request.model != options.model_name:
            raise ApiError(404, f"the model '{request.model}' does not exist here; this server serves "
                                f"'{options.model_name}'", param="model", code="model_not_found")
        tokenizer = spec.tokenizer
        if request.text is not None:
            ids = tokenizer.encode(request.text)
        else:
            ids = encode_prompt(tokenizer, [{"role": m.role, "content": m.text()} for m in request.messages])
        spans = [TokenSpan(id=i, text=token_text(tokenizer, i), byte_start=start, byte_end=end)
                 for i, (start, end) in zip(ids, byte_spans(tokenizer, ids))]
        return TokenizeResponse(model=options.model_name, count=len(ids), tokens=spans,
                                max_context=spec.config.context_length)


def replace_litserve_routes(app: FastAPI) -> None:
    """LitServe owns `GET /` ("litserve running") and answers /health without a content type.
    Drop its index (ours is added after) and re-serve its health check as text/plain,
    keeping its logic (every worker ready) and its auth dependency."""
    health = next(r for r in app.router.routes if getattr(r, "path", None) == "/health")
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in ("/", "/health")]

    async def checked(request: Request) -> PlainTextResponse:
        answer = await health.endpoint(request)
        return PlainTextResponse(answer.body.decode(), status_code=answer.status_code)

    app.add_api_route("/health", checked, methods=["GET"], dependencies=health.dependencies,
                      summary="200 'ok' once every worker has loaded the model, else 503",
                      response_class=PlainTextResponse,
                      responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
                                 503: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
