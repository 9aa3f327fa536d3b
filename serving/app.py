"""The server, assembled: one LitServer, two LitAPIs, our routes, guards and error shapes.

    client ──HTTP──> LitServer's HTTP process (uvicorn + FastAPI)
                       BodySizeLimit, InFlightLimit (413 / 429 + Retry-After)
                       GenerationSpec: /v1/chat/completions, /v1/completions   (serving/openai_spec.py)
                           validate, apply the chat template, put a job on LitServe's queue
                       /, /health, /v1/models, /v1/tokenize                      (serving/routes.py)
                       /v1/architecture, /v1/tokenizers/compare          (serving/inspect_routes.py)
                       IntrospectAPI's LitServe route: /v1/introspect
                       /v1/attribution, /v1/patching: to the same worker       (serving/explain.py)
                           │ LitServe request queues / response transport
                           v
                     generation worker(s): GenerationAPI + EngineLoop            (serving/worker.py)
                           continuous batching engine (llm/generate.py), text (serving/text.py)
                     introspection worker: IntrospectAPI, a forward pass        (serving/introspection.py)
                       and attribution, patching (IntrospectAndExplainAPI, serving/explain.py)

Why not LitServe's OpenAISpec: it leaves gaps an OpenAI client notices (a new id per chunk,
finish_reason always "stop", max_tokens and logprobs ignored, usage summed over chunks, errors
inside a 200 stream, 500 on malformed input). Why not its batching loops: static batches make a
newcomer wait for the running batch, and its continuous loop spins when idle. So generation keeps
LitServe's server, processes, queues and transport, and brings its own spec (the protocol) and
loop (the batching). Introspection is a plain LitAPI on LitServe's usual path.

Validation happens before any work: strict pydantic models (no coercion, no unknown fields),
then the route's checks against the model and the limits, all as OpenAI-shaped 4xx errors
(serving/errors.py). The OpenAPI schema at /openapi.json documents those answers, the stream
content type, the served model's name and the max_tokens limit.
"""

from __future__ import annotations

import multiprocessing as mp

import litserve as ls
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from serving import errors
from serving.explain import ATTRIBUTION_PATH, PATCHING_PATH, IntrospectAndExplainAPI, add_explain_routes
from serving.inspect_routes import add_inspect_routes
from serving.introspection import INTROSPECT_PATH
from serving.middleware import BodySizeLimit, InFlightLimit
from serving.openai_spec import CHAT_PATH, TEXT_PATH, GenerationSpec
from serving.options import ServeOptions
from serving.routes import add_routes, replace_litserve_routes
from serving.schemas import ChatCompletionChunk, CompletionChunk, ErrorResponse
from serving.worker import GenerationAPI

SHUTDOWN_GRACE_S = 2  # LitServe waits 30 s for open connections on shutdown: too long for Ctrl-C


def build_server(options: ServeOptions) -> ls.LitServer:
    spec = GenerationSpec(options)
    generation = GenerationAPI(options, spec, cancel_queues=[])
    introspection = IntrospectAndExplainAPI(options)  # /v1/introspect, and /v1/attribution, /v1/patching
    server = ls.LitServer(
        [generation, introspection], accelerator=options.accelerator,
        workers_per_device={CHAT_PATH: options.workers, INTROSPECT_PATH: 1},
        timeout=60,  # introspection: seconds a request may wait in LitServe's queue (504 after)
    )
    server.uvicorn_graceful_timeout = SHUTDOWN_GRACE_S
    # One cancellation queue per generation worker, created before the workers are spawned.
    context = mp.get_context("spawn")
    queues = [context.Queue() for _ in range(len(server.devices) * options.workers)]
    generation.cancel_queues = spec.cancel_queues = queues

    app = server.app
    replace_litserve_routes(app)
    add_routes(app, spec)
    add_inspect_routes(app, spec)
    add_explain_routes(app, server, introspection)
    errors.install(app)
    limits = options.limits
    generation_capacity = len(queues) * limits.max_batch_size + limits.max_queue
    app.add_middleware(InFlightLimit, limits={
        CHAT_PATH: ("generation", generation_capacity),
        TEXT_PATH: ("generation", generation_capacity),
        INTROSPECT_PATH: ("introspection", limits.introspect_queue),
        ATTRIBUTION_PATH: ("introspection", limits.introspect_queue),
        PATCHING_PATH: ("introspection", limits.introspect_queue),
    })
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.openapi = lambda: _openapi(app, spec)
    return server


def _openapi(app: FastAPI, spec: GenerationSpec) -> dict:
    """FastAPI's schema, plus what the routes really answer (see the module docstring)."""
    if app.openapi_schema:
        return app.openapi_schema
    options = spec.options
    schema = get_openapi(title="llm-from-scratch server", version="1.0",
                         description=f"Serving **{options.model_name}**: OpenAI-compatible generation, "
                                     "introspection and tokenization.", routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error = {"content": {"application/json": {"schema": _component(components, ErrorResponse)}}}
    events = {CHAT_PATH: _events_schema(components, ChatCompletionChunk),
              TEXT_PATH: _events_schema(components, CompletionChunk)}
    busy = {**error, "headers": {"Retry-After": {"schema": {"type": "string"}}}}
    introspecting = {INTROSPECT_PATH, ATTRIBUTION_PATH, PATCHING_PATH}   # one worker answers these
    limited = {CHAT_PATH, TEXT_PATH, *introspecting}
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)  # validation errors are 400 here, as at OpenAI
            if method == "post":
                responses["400"] = {"description": "Invalid request", **error}
                responses["404"] = {"description": "Unknown model", **error}
                responses["413"] = {"description": "Request body too large", **error}
            if path == "/v1/models/{model_id}":
                responses["404"] = {"description": "Unknown model", **error}
            if path.startswith("/v1/snapshots"):
                responses["400"] = {"description": "Invalid step", **error}
                responses["404"] = {"description": "No such snapshot, or the model has none", **error}
            if path in limited:
                responses["429"] = {"description": "Too many requests in flight; retry after Retry-After", **busy}
            if path == INTROSPECT_PATH:
                responses["404"] = {"description": "Unknown model or snapshot step", **error}
            if path in introspecting:
                responses["503"] = {"description": "The introspection worker failed", **error}
                responses["504"] = {"description": "Waited too long in the queue", **error}
            if path in (CHAT_PATH, TEXT_PATH):
                responses["503"] = {"description": "The generation worker failed", **error}
                responses["200"].setdefault("content", {})["text/event-stream"] = {"schema": events[path]}
    # What only the running server knows: the model's name and the generation limit.
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        properties = components.get(name, {}).get("properties", {})
        if "model" in properties:
            properties["model"] = {**properties["model"], "enum": [options.model_name]}
        for field in ("max_tokens", "max_completion_tokens"):
            for variant in properties.get(field, {}).get("anyOf", []):
                if variant.get("type") == "integer":
                    variant["maximum"] = min(options.limits.max_tokens, spec.config.context_length - 1)
    app.openapi_schema = schema
    return schema


def _component(components: dict, model) -> dict:
    """Add a pydantic model's schema (and the ones it uses) to the components; its $ref."""
    model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(model_schema.pop("$defs", {}))
    components[model.__name__] = model_schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _events_schema(components: dict, chunk_model) -> dict:
    """A stream's events (OpenAPI before 3.2: `schema` describes one event): JSON chunks, an
    error object if the worker fails mid-stream, and the closing `[DONE]`."""
    payload = {"anyOf": [_component(components, chunk_model), {"$ref": "#/components/schemas/ErrorResponse"}]}
    return {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"},
        "data": {"type": "string", "anyOf": [
            {"const": "[DONE]"},
            {"contentMediaType": "application/json", "contentSchema": payload},
        ]},
    }}
