"""A job's event stream as Server-Sent Events, read through the gateway's one StreamHub
(service/stream_hub.py: one blocking Redis connection per process, however many clients).

Each SSE `id:` is the Redis entry id, so a client that reconnects with `Last-Event-ID` (to any
gateway replica) gets exactly the remainder. The stream ends after the terminal `done`/`error`
event, or with an `error` event when the job expired or Redis stayed unreachable.
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Receive, Scope, Send

from service.jobs import Jobs
from service.stream_hub import HubFull, StreamHub, Subscription

log = logging.getLogger("sr3d.sse")

# Headers for proxies: nginx must not buffer, nobody may cache.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def subscribe(hub: StreamHub, job_id: str, after: str = "0-0", owner: str | None = None) -> Subscription:
    """A subscription registered now, before any response byte: ApiError too_many_streams (503 +
    Retry-After) when this gateway already serves its limit of streams, streams_quota_exceeded (429)
    when `owner` (the caller's rate bucket) holds its own limit (SR3D_QUOTA_STREAMS)."""
    try:
        return hub.subscribe(job_id, after, owner)
    except HubFull as e:
        raise e.api_error() from None


def check_stream_room(hub: StreamHub, owner: str | None = None) -> None:
    """The same 503, before a job that is to be streamed or waited for is queued: a client told to
    retry must not leave a job behind."""
    try:
        hub.check_room(owner)
    except HubFull as e:
        raise e.api_error() from None


class SubscriptionResponse(EventSourceResponse):
    """An SSE response that gives its hub subscription back however it ends (done, client gone,
    error, or never started), so the hub's client count cannot drift."""

    def __init__(self, sub: Subscription, content: AsyncIterator[Any], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.sub = sub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.sub.close()


async def job_sse(sub: Subscription) -> AsyncIterator[ServerSentEvent]:
    """A subscription as SSE events (id = Redis entry id, so Last-Event-ID resumes)."""
    async for ev in sub.events():
        yield ServerSentEvent(id=ev.id or None, event=ev.type, data=json.dumps(ev.data))


def sse_response(
    jobs: Jobs,
    sub: Subscription,
    *,
    ping_s: float = 15.0,
    cancel_on_disconnect: bool = False,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> EventSourceResponse:
    """EventSourceResponse with keep-alive pings; a client disconnect cancels the job only when the
    job asked for it (cancel_on_disconnect), otherwise the job runs on and can be resumed."""

    async def on_close(_: Message) -> None:
        if cancel_on_disconnect and await jobs.request_cancel(sub.job_id):
            log.info("client went away: job cancelled", extra={"job_id": sub.job_id})

    return SubscriptionResponse(
        sub,
        job_sse(sub),
        status_code=status_code,
        ping=ping_s,
        headers={**SSE_HEADERS, **(headers or {})},
        client_close_handler_callable=on_close,
    )
