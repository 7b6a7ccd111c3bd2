"""Access to the server: who may call it (bearer keys), how much a request may send (the body limit) and what
each request is counted as (per-request metrics), in one pure-ASGI middleware that every request passes.

A refusal is OpenAI's error object (openai_errors.py): 401 for a missing or wrong key, 413 for a body over the
limit, 400 for a Content-Length that is not a number.
"""

from __future__ import annotations

import hmac
import time

from fastapi.responses import JSONResponse

from .metrics import Metrics
from .openai_errors import ApiError, error_body


class AccessMiddleware:
    """Bearer keys, body size and request metrics, as pure ASGI so it also sees a streamed response end."""

    def __init__(self, app, *, keys: list[str], max_body: int, metrics: Metrics):
        self.app, self.keys, self.max_body, self.metrics = app, keys, max_body, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        headers = dict(scope.get("headers") or [])
        problem = self._refuse(headers)
        if problem is not None:
            await problem(scope, receive, send)
            self._count(scope, problem.status_code, start)
            return

        seen = [0]

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body:
                    raise ApiError(413, f"request body is larger than the server's limit of {self.max_body} "
                                        "bytes; send a shorter prompt")
            return message

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, counting_send)
        finally:
            self._count(scope, status[0], start)

    def _refuse(self, headers: dict) -> JSONResponse | None:
        if self.keys and not bearer_matches(headers.get(b"authorization", b""), self.keys):
            response = error_body(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                                  "authentication_error")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return error_body(400, f"Content-Length must be a number, got {length[:40]!r}")
        if int(length) > self.max_body:
            return error_body(413, f"request body of {int(length)} bytes is larger than the server's limit of "
                                   f"{self.max_body} bytes; send a shorter prompt")
        return None

    def _count(self, scope, status: int, start: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", "unmatched")
        self.metrics.requests.labels(path, str(status)).inc()
        self.metrics.latency.labels(path).observe(time.perf_counter() - start)


def bearer_matches(header: bytes, keys: list[str]) -> bool:
    """Whether the Authorization header's raw bytes are 'Bearer <one of keys>'. Compared as bytes (keys in UTF-8):
    hmac.compare_digest refuses str holding non-ASCII, so a header such as 'Bearer été' is just a wrong key."""
    scheme, _, token = header.partition(b" ")
    token = token.strip()
    # compare_digest against every key, so timing does not tell which key or how much of it matched
    return scheme.lower() == b"bearer" and sum(hmac.compare_digest(token, k.encode("utf-8")) for k in keys) > 0


__all__ = ["AccessMiddleware", "bearer_matches"]
