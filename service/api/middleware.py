"""ASGI middleware of the gateway: the request-body cap (enforced while the body streams in) and the
HTTP request metrics."""
from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.api.errors import openai_error_body, status_for
from service.errors import ApiError


class BodySizeLimit:
    """Rejects an upload over the cap with 413 while it streams in: Content-Length is checked up
    front, and bytes are counted as they arrive (chunked uploads), before python-multipart
    buffers anything. Raising ApiError from `receive` reaches the app's ApiError handler."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = ApiError("upload_too_large", f"request body is over the {self.max_bytes} byte cap")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    metrics.JOBS_REJECTED.labels(reason=too_large.code).inc()
                    # OpenAI's shape, a superset of ours: the OpenAI-compatible routes are behind this cap too.
                    status = status_for(too_large.code)
                    return await _send_json(send, status, openai_error_body(too_large.code, too_large.message, status))
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    metrics.JOBS_REJECTED.labels(reason=too_large.code).inc()
                    raise too_large
            return message

        await self.app(scope, counting_receive, send)


class RequestMetrics:
    """sr3d_http_requests_total and sr3d_http_request_duration_seconds (until headers), by route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = scope.get("route")
                metrics.REQUEST_LATENCY.labels(route=getattr(route, "path", "unmatched")).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.REQUESTS.labels(route=route, method=scope["method"], status=str(status)).inc()


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
