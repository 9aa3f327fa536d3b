"""Two guards in front of every route, as plain ASGI middleware.

BodySizeLimit reads a request body up to the limit before the route sees it, and answers 413
past it. (LitServe's own MaxSizeMiddleware raises inside `receive`, which a route can turn
into a 500.)

InFlightLimit counts requests being served per group of paths and answers 429 with
Retry-After once a group is full. A request counts until its response has been sent, streams
included, so the count is exactly what the engine still owes: running rows plus waiting ones.
Nothing else bounds LitServe's request queue, which would otherwise grow without limit.
The server runs one HTTP process, so one counter in it sees every request.
"""

from __future__ import annotations

import json

from serving.errors import error_body


async def _send_error(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = f"request body over this server's limit of {self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(send, 413, too_big)
        # Read the whole body (at most max_bytes) before the route runs, then replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_error(send, 413, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as a server would

        return await self.app(scope, replay, send)


class InFlightLimit:
    """limits: {path: (group name, capacity)}; paths in one group share one counter."""

    def __init__(self, app, limits: dict[str, tuple[str, int]], retry_after_s: int = 1):
        self.app, self.limits, self.retry_after = app, limits, str(retry_after_s)
        self.counts = {group: 0 for group, _ in limits.values()}

    async def __call__(self, scope, receive, send):
        limit = self.limits.get(scope.get("path")) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if limit is None:
            return await self.app(scope, receive, send)
        group, capacity = limit
        if self.counts[group] >= capacity:
            return await _send_error(send, 429, f"the server is busy: {capacity} {group} requests are already "
                                                f"running or queued; retry shortly", {"Retry-After": self.retry_after})
        self.counts[group] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.counts[group] -= 1
