"""Reading an SSE response as a browser's EventSource would: httpx-sse's parser plus the one WHATWG
rule it misses. Used by `sr3d ask` and the load/test client (loadtests/client.py).

httpx-sse 0.4 dispatches an event at every blank line once an `id:` has been seen, because the
last event id is sticky. The server's keep-alive pings are comments (`: ping ...` + blank line),
so every ping after the first real event came out as an empty `message` event carrying the
previous event's id: the load client counted that id twice ("duplicate event ids" whenever a job
stayed quiet for `sse_ping_s`, i.e. under load) and `sr3d ask` failed to parse its empty data.
The WHATWG algorithm does not dispatch when the data buffer is empty (upstream: httpx-sse #35).
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
from httpx_sse import EventSource, ServerSentEvent


def _dispatched(sse: ServerSentEvent) -> bool:
    # Our server sends JSON in every event, so an empty data buffer is always a comment-only block.
    return sse.data != ""


def iter_events(response: httpx.Response) -> Iterator[ServerSentEvent]:
    """The events of a streaming httpx response, keep-alive comments skipped."""
    return (sse for sse in EventSource(response).iter_sse() if _dispatched(sse))


async def aiter_events(response: httpx.Response) -> AsyncIterator[ServerSentEvent]:
    """Async twin of iter_events."""
    async for sse in EventSource(response).aiter_sse():
        if _dispatched(sse):
            yield sse
