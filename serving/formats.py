"""OpenAI's response shapes, built from what the engine reports.

The worker sends each request a few updates, each a dict

    {"text": str, "tokens": [entry, ...], "finish_reason": None | "stop" | "length",
     "usage": None | {"prompt_tokens", "completion_tokens", "total_tokens"}}

(`tokens` holds log-probability entries, see serving/text.py; the last update has the finish
reason and the usage). Here they become chat or text completions, whole or as stream chunks,
with one id and one `created` per request.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field


@dataclass
class Reply:
    """The fixed parts of one answer."""
    kind: str                       # "chat" or "text"
    model: str
    logprobs: bool = False          # the client asked for log probabilities
    top_logprobs: int = 0
    prompt_chars: int = 0           # text completions: offsets count from the prompt's start
    include_usage: bool = False     # stream_options.include_usage
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        if not self.id:
            prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
            self.id = f"{prefix}-{uuid.uuid4().hex}"


def _top_list(entry: dict) -> list[dict]:
    return [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]} for t in entry["top"]]


def chat_logprobs(reply: Reply, entries: list[dict]) -> dict | None:
    if not reply.logprobs:
        return None
    return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
                         "top_logprobs": _top_list(e)} for e in entries], "refusal": None}


def text_logprobs(reply: Reply, entries: list[dict]) -> dict | None:
    if not reply.logprobs:
        return None
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        # Legacy format: a {token: logprob} dict per position (equal token texts collapse).
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top"]} for e in entries] if reply.top_logprobs else None,
        "text_offset": [reply.prompt_chars + e["offset"] for e in entries],
    }


def whole(reply: Reply, text: str, entries: list[dict], finish_reason: str, usage: dict) -> dict:
    """The non-streamed answer."""
    if reply.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": chat_logprobs(reply, entries), "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": text_logprobs(reply, entries), "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": reply.id, "object": obj, "created": reply.created, "model": reply.model,
            "choices": [choice], "usage": usage}


def chunk(reply: Reply, text: str | None, entries: list[dict], finish_reason: str | None,
          usage: dict | None = None, role: bool = False) -> dict:
    """One stream chunk. role=True: the chat stream's opening chunk."""
    if reply.kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": chat_logprobs(reply, entries) if entries else None,
                  "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": text_logprobs(reply, entries) if entries else None,
                  "finish_reason": finish_reason}
        obj = "text_completion"
    out = {"id": reply.id, "object": obj, "created": reply.created, "model": reply.model, "choices": [choice]}
    if reply.include_usage:
        out["usage"] = None  # OpenAI: null on every chunk but the extra last one
    elif usage is not None:
        out["usage"] = usage  # without include_usage, the finishing chunk carries the totals once
    return out


def usage_chunk(reply: Reply, usage: dict) -> dict:
    """stream_options.include_usage: one extra chunk, no choices, the totals."""
    obj = "chat.completion.chunk" if reply.kind == "chat" else "text_completion"
    return {"id": reply.id, "object": obj, "created": reply.created, "model": reply.model,
            "choices": [], "usage": usage}


def sse(data: dict | str) -> bytes:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


DONE = sse("[DONE]")
