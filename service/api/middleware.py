"""ASGI middleware of the gateway: the request-body cap (enforced while the body streams in), a key's
request bodies read at most at its rate, closing the connection after an answer to an unread body, the
API-key gate of /metrics and the API reference, and the HTTP request metrics."""
from __future__ import annotations

import json
import time
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.api.deps import caller_of
from service.api.errors import error_body, openai_error_body, status_for
from service.errors import ApiError
from service.quotas import BodyPacer
from service.settings import Settings


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
                    raise too_large  # answered (and counted) by the app's error handlers
            return message

        await self.app(scope, counting_receive, send)


class CloseAfterUnreadBody:
    """A response that starts before its request's body was read to the end (a refusal from the head,
    e.g. a quota 429 from Content-Length) says `Connection: close`, and the server closes after it.
    Kept alive, the connection would have the server read and discard the rest of the body to reach the
    next request: 21 ms of the event loop for a refused 8 MiB upload, per refusal, at the client's pace."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            return await self.app(scope, receive, send)
        read_all = False

        async def noting_receive() -> Message:
            nonlocal read_all
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                read_all = True
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not read_all:
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, noting_receive, closing_send)


class PaceBodies:
    """Hands a request's body to the app at most at its key's rate (`service.quotas.BodyPacer`,
    SR3D_QUOTA_UPLOAD_MIB_S). The key is read here from the same headers as the routes read it; a
    request without a valid key goes on unpaced and the route refuses it before reading its body."""

    def __init__(self, app: ASGIApp, mib_per_s: float) -> None:
        self.app = app
        self.pacer = BodyPacer(mib_per_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.pacer.rate <= 0 or not _has_body(scope):
            return await self.app(scope, receive, send)
        try:
            tenant = caller_of(Request(scope)).tenant
        except ApiError:
            tenant = None
        if tenant is None:
            return await self.app(scope, receive, send)

        async def paced_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                await self.pacer.take(tenant, len(message.get("body", b"")))
            return message

        await self.app(scope, paced_receive, send)


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if (name == b"content-length" and value.strip() not in (b"", b"0")) or \
                (name == b"transfer-encoding" and b"chunked" in value.lower()):
            return True
    return False


class KeyGate:
    """With API keys on, the operational and reference routes answer only to a key unless the
    operator opened them: /metrics (SR3D_METRICS_PUBLIC, default closed: request counts, queue depth
    and error codes are not for anyone who can reach the port) and /docs + /openapi.json
    (SR3D_DOCS_PUBLIC, default open: they describe the public API and nothing of its state).
    Issue 30 item 11. /healthz and /readyz stay open (probes carry no key)."""

    DOCS = ("/docs", "/openapi.json", "/redoc")

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def _gated(self, path: str) -> bool:
        if not self.settings.api_keys:
            return False
        if path == "/metrics":
            return not self.settings.metrics_public
        if path in self.DOCS or path.startswith("/docs/"):
            return not self.settings.docs_public
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._gated(scope.get("path", "")):
            try:
                caller_of(Request(scope))
            except ApiError as e:
                payload = json.dumps(error_body(e.code, e.message)).encode()
                await send({"type": "http.response.start", "status": status_for(e.code), "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                    (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": payload})
                return
        await self.app(scope, receive, send)


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
