"""A job's event stream as Server-Sent Events. Each SSE `id:` is the Redis entry id, so a client
that reconnects with `Last-Event-ID` (to any gateway replica) gets exactly the remainder. The
stream ends after the terminal `done`/`error` event.
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message

from service import metrics
from service.queue import JobQueue

log = logging.getLogger("sr3d.sse")

# Headers for proxies: nginx must not buffer, nobody may cache.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def job_events(queue: JobQueue, job_id: str, after: str = "0-0", block_ms: int = 15000) -> AsyncIterator[ServerSentEvent]:
    """SSE events of one job after entry id `after`, until its terminal event."""
    metrics.SSE_CLIENTS.inc()
    try:
        last = after
        while True:
            events = await queue.read_events(job_id, after=last, block_ms=block_ms)
            if not events:
                # Nothing new for block_ms: make sure the job still exists (TTL) rather than wait forever.
                if await queue.get(job_id) is None:
                    yield ServerSentEvent(event="error", data=json.dumps({"code": "job_expired", "message": "job no longer exists",
                                                                         "job_id": job_id}))
                    return
                continue
            for ev in events:
                yield ServerSentEvent(id=ev.id, event=ev.type, data=json.dumps(ev.data))
                last = ev.id
                if ev.terminal:
                    return
    finally:
        metrics.SSE_CLIENTS.dec()


def sse_response(
    queue: JobQueue,
    job_id: str,
    *,
    after: str = "0-0",
    ping_s: float = 15.0,
    cancel_on_disconnect: bool = False,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> EventSourceResponse:
    """EventSourceResponse with keep-alive pings; a client disconnect cancels the job only when the
    job asked for it (cancel_on_disconnect), otherwise the job runs on and can be resumed."""

    async def on_close(_: Message) -> None:
        if cancel_on_disconnect and await queue.request_cancel(job_id):
            log.info("client went away: job cancelled", extra={"job_id": job_id})

    return EventSourceResponse(
        job_events(queue, job_id, after),
        status_code=status_code,
        ping=ping_s,
        headers={**SSE_HEADERS, **(headers or {})},
        client_close_handler_callable=on_close,
    )
