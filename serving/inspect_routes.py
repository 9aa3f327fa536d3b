"""Routes the HTTP process answers itself for the page's inspect views:

    GET  /v1/architecture         the served model drawn from its config: each part with its
                                  equation, parameters and FLOPs per token (llm.architecture)
    POST /v1/tokenizers/compare   a text split by the served model's tokenizer and by each
                                  tokenizer of the tokenizer stage's comparison, with counts

The architecture needs no weights: the model is built on PyTorch's meta device (shapes only, no
memory) and its modules are counted, so the numbers are the model's own, not a formula's.

Comparison tokenizers are the tokenizer stage's (flows/tokenizer.py saves each one in a subfolder
of data/tokenizer/comparison/): the server reads them from --tokenizers, else from the pipeline's
layout next to the model folder (data/<stage>/model -> data/tokenizer/comparison). When neither
exists the answer still holds the served model's tokenizer, with a message saying what to run.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations as classes.

import asyncio
from pathlib import Path

import torch
from fastapi import FastAPI

from llm.architecture import describe
from llm.model import GPT
from llm.tokenizer import Tokenizer, load_tokenizers
from serving.introspection import byte_spans
from serving.options import ServeOptions
from serving.schemas import (
    ArchitectureResponse,
    CompareTokenizersRequest,
    CompareTokenizersResponse,
    TokenSpan,
)
from serving.text import token_text

ARCHITECTURE_PATH = "/v1/architecture"
COMPARE_PATH = "/v1/tokenizers/compare"
SERVED = "served model"


def architecture(config, model_name: str) -> dict:
    with torch.device("meta"):
        model = GPT(config)
    return {"model": model_name, **describe(model)}


def comparison_folders(options: ServeOptions) -> list[Path]:
    """Where comparison tokenizers are looked for, in order."""
    beside_model = options.model_dir.parent.parent / "tokenizer" / "comparison"
    return list(dict.fromkeys([options.tokenizers_dir, beside_model]))


_loaded: dict[Path, dict[str, Tokenizer]] = {}   # a folder's tokenizers, once found (not while missing)


def _comparison(folders: tuple[Path, ...]) -> tuple[Path | None, dict[str, Tokenizer]]:
    for folder in folders:
        if folder.is_dir():
            if folder not in _loaded:
                _loaded[folder] = load_tokenizers(folder)
            return folder, _loaded[folder]
    return None, {}


def split(name: str, tokenizer: Tokenizer, text: str) -> dict:
    ids = tokenizer.encode(text)
    spans = [TokenSpan(id=i, text=token_text(tokenizer, i), byte_start=start, byte_end=end)
             for i, (start, end) in zip(ids, byte_spans(tokenizer, ids))]
    return {"name": name, "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "count": len(ids),
            "chars_per_token": round(len(text) / max(len(ids), 1), 4), "tokens": spans}


def compare(text: str, served: Tokenizer, options: ServeOptions) -> dict:
    folders = tuple(comparison_folders(options))
    folder, others = _comparison(folders)
    message = None
    if folder is None:
        message = (f"no comparison tokenizers at {' or '.join(str(f) for f in folders)}: run the tokenizer stage "
                   "(`dvc repro tokenizer`, with tokenizer.compare: true) or start the server with "
                   "--tokenizers DIR. Showing the served model's tokenizer only.")
    elif not others:
        message = f"{folder} holds no saved tokenizers (one subfolder with a tokenizer.json each)"
    splits = [split(SERVED, served, text)] + [split(name, t, text) for name, t in others.items()]
    return {"chars": len(text), "bytes": len(text.encode()), "tokenizers": splits,
            "folder": str(folder or folders[0]), "message": message}


def add_inspect_routes(app: FastAPI, spec) -> None:
    """spec: the GenerationSpec (its tokenizer, model config and options)."""
    options = spec.options
    diagram = architecture(spec.config, options.model_name)

    @app.get(ARCHITECTURE_PATH, summary="The served model's parts: equations, parameters and FLOPs per token")
    async def architecture_route() -> ArchitectureResponse:
        return diagram

    @app.post(COMPARE_PATH, summary="A text split by the served tokenizer and the tokenizer stage's comparison")
    async def compare_route(request: CompareTokenizersRequest) -> CompareTokenizersResponse:
        # Loading the comparison (cl100k: ~100k ranks) and encoding take a while: off the event loop.
        return await asyncio.to_thread(compare, request.text, spec.tokenizer, options)
