"""Read timeouts uvicorn does not have (issue 14 item 9): request headers and request bodies.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but any byte resets that, and it
has no deadline for a request's headers nor for its body: 300 connections trickling a header line
or an upload body were held forever (each stalled upload also holding a spooled temp file).

* Headers: `header_timeout_protocol(s)` subclasses uvicorn's HTTP protocol (httptools or h11,
  whichever `auto` picks) with one deadline per request: armed when the connection opens and again
  when a response completes (keep-alive); if no complete request head arrived by then, the
  connection is closed. Trickling bytes does not extend it.
* Header bytes (issue 30 item 5): the same protocol counts the bytes of a request head while it is
  incomplete; a read whose bytes pass `max_head_bytes` without the head's end among those allowed is
  answered 431 before the parser sees it, and the connection is closed (checked after parsing, a
  head past the limit that arrived whole in one read used to pass). httptools keeps every
  header in memory with no limit of its own (a 32 MiB header got a 200; 20 connections x 50 MiB of
  unfinished header added 750 MB RSS); h11 gets the same bound through h11_max_incomplete_event_size.
* Bodies: `BodyTimeouts` (ASGI middleware) bounds every wait for the next body chunk (`idle_s`) and
  the whole body (`total_s`) while the body is incomplete; then it answers 408
  `{"error": {"code": "request_timeout"}}` with `Connection: close` and tells the app the client
  left. A client that hangs up mid-body (starlette's ClientDisconnect) ends its request with one
  log line: no one is left to answer. Once the body is complete, `receive()` waits are not bounded:
  SSE responses legitimately wait on it for the client's disconnect for as long as the stream lasts.

`uvicorn_config(app, settings, host, port, **kw)` applies both plus the keep-alive timeout; the
`sr3d serve` and `sr3d gateway` commands build their servers with it.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import uvicorn
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.settings import Settings

log = logging.getLogger("sr3d.http")


DEFAULT_MAX_HEAD_BYTES = 64 * 1024


def _ends_head(data: bytes) -> bool:
    """Whether `data` holds the blank line that ends a request head (CRLF CRLF, or bare LFs)."""
    return b"\n\r\n" in data or b"\n\n" in data


def _head_too_large(max_head_bytes: int) -> bytes:
    body = json.dumps({"error": {"code": "request_header_too_large",
                                 "message": f"the request line and headers are over {max_head_bytes} bytes"}}).encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def header_timeout_protocol(timeout_s: float, base: type[asyncio.Protocol] | None = None,
                            max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with a request-head deadline of `timeout_s` and a head size
    limit of `max_head_bytes`."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    HEAD_TOO_LARGE = _head_too_large(max_head_bytes)

    class HeaderDeadlineProtocol(base):  # type: ignore[misc, valid-type]
        _header_deadline: asyncio.TimerHandle | None = None
        _head_cycle: Any = None  # the cycle current when the deadline was armed: unchanged = head incomplete
        _head_bytes = 0
        _head_tail = b""  # the last bytes of the head so far: a blank line may straddle two reads

        def _arm_header_deadline(self) -> None:
            self._head_cycle, self._head_bytes, self._head_tail = self.cycle, 0, b""
            if self._header_deadline is not None:
                self._header_deadline.cancel()
            # `cycle` is the protocol's current request; a new one means a full head was parsed.
            self._header_deadline = self.loop.call_later(timeout_s, self._header_deadline_hit, self.cycle)

        def _header_deadline_hit(self, armed_cycle: Any) -> None:
            self._header_deadline = None
            if self.cycle is armed_cycle and not self.transport.is_closing():
                log.info("closing a connection that sent no complete request head in %.0f s", timeout_s)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def data_received(self, data: bytes) -> None:
            # `cycle` unchanged since the deadline was armed: this request's head is still incomplete.
            if self.cycle is self._head_cycle and not self.transport.is_closing():
                room = max_head_bytes - self._head_bytes
                # Decided before the parser sees the chunk, so a head that arrives whole in one read cannot
                # pass the limit: one that does not end within the room left is refused unparsed. The blank
                # line that ends a head (CRLF or bare LF) may straddle the previous chunk: its last bytes
                # are searched with this one.
                if len(data) > room and not _ends_head(self._head_tail + data[:max(room, 0)]):
                    self._refuse_head()
                    return
                self._head_bytes += len(data)
                self._head_tail = data[-2:]
            super().data_received(data)

        def _refuse_head(self) -> None:
            log.info("closing a connection whose request head is over %d bytes", max_head_bytes)
            self.transport.write(HEAD_TOO_LARGE)
            self.transport.close()

        def on_response_complete(self) -> None:
            self._arm_header_deadline()  # before super(): a pipelined request it starts counts
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None
            super().connection_lost(exc)

    HeaderDeadlineProtocol.__name__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadlineProtocol


class BodyTimeouts:
    def __init__(self, app: ASGIApp, idle_s: float, total_s: float) -> None:
        self.app = app
        self.idle_s = idle_s
        self.total_s = total_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_s
        body_done = False
        timed_out = False
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if timed_out:
                return  # the 408 already went out
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def guarded_receive() -> Message:
            nonlocal body_done, timed_out
            if body_done or timed_out:
                return await receive() if not timed_out else {"type": "http.disconnect"}
            wait = min(self.idle_s, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.001))
            except asyncio.TimeoutError:
                if not started:
                    await _send_408(send, self.idle_s if wait >= self.idle_s else self.total_s)
                timed_out = True
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except ClientDisconnect:
            # The client hung up before its body was complete: nobody is left to answer. Without
            # this, uvicorn logged each as "Exception in ASGI application" with a formatted
            # traceback, milliseconds of the event loop per hang-up that a client can repeat at will.
            log.info("the client disconnected before its request body was complete")
        except Exception:
            if not timed_out:
                raise  # the app's own failure; the client's stall is not one


async def _send_408(send: Send, seconds: float) -> None:
    body = json.dumps({"error": {"code": "request_timeout",
                                 "message": f"the request body stalled (no complete body within the {seconds:g} s limit)"}}).encode()
    await send({"type": "http.response.start", "status": 408,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def uvicorn_config(app: Any, settings: Settings, host: str, port: int, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn.Config with the service's read timeouts and proxy-header policy applied."""
    wrapped = BodyTimeouts(app, settings.http_body_idle_s, settings.http_body_timeout_s)
    trusted = ",".join(settings.trusted_proxies)
    return uvicorn.Config(
        wrapped,
        host=host,
        port=port,
        http=header_timeout_protocol(settings.http_header_timeout_s, max_head_bytes=settings.max_head_kb * 1024),
        h11_max_incomplete_event_size=settings.max_head_kb * 1024,
        timeout_keep_alive=settings.http_keepalive_s,
        # X-Forwarded-For rewrites the client address (the rate-limit bucket when keys are off):
        # only from proxies the operator named. uvicorn's own default trusts 127.0.0.1.
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
        **kwargs,
    )
