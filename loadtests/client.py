"""The load generator's and the fault tests' view of the API: what one client saw for one job.

The protocol (multipart submit, SSE, resume with Last-Event-ID, cancel) is service/client.py, the same
client `sr3d ask` uses. This module adds what load and fault tests need on top: `JobResult` keeps every
event with its arrival time (TTFT, inter-token latency) and checks the client-view invariants, and
`SR3DClient.run` can misbehave on purpose (drop the connection, read slowly, cancel mid-answer).

Why asyncio + httpx and not Locust: one process has to hold hundreds of concurrent SSE streams open
and stamp every token event with its own arrival time on a 2-core box. Locust's request model is one
request -> one response time, and its gevent monkey-patching fights with asyncio code (the same client
is reused by the pytest fault tests, which must not patch the interpreter).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.client import (
    RESUMABLE,
    TERMINAL,
    EventStream,
    JobRequest,
    Media,
    SSEEvent,
    StreamLost,
    iter_sse,
    json_or_text,
    stream_id_key,
)
from service.client import SR3DClient as _ApiClient

__all__ = ["JobRequest", "JobResult", "Media", "SR3DClient", "SSEEvent", "box_regions", "iter_sse", "stream_id_key"]


@dataclass
class JobResult:
    """What one client saw for one job, with its own clock."""

    job_id: str | None = None
    http_status: int | None = None  # status of the submit request
    error_body: Any = None  # JSON body of a rejected submit
    t_submit: float = 0.0
    t_accepted: float | None = None  # response headers of the submit arrived
    events: list[SSEEvent] = field(default_factory=list)
    resumes: int = 0
    client_error: str | None = None  # transport failure the client could not recover from

    @property
    def terminal(self) -> SSEEvent | None:
        ends = [e for e in self.events if e.type in TERMINAL]
        return ends[-1] if ends else None

    @property
    def ok(self) -> bool:
        t = self.terminal
        return t is not None and t.type == "done"

    @property
    def token_times(self) -> list[float]:
        return [e.t for e in self.events if e.type == "token"]

    @property
    def ttft(self) -> float | None:
        tt = self.token_times
        return tt[0] - self.t_submit if tt else None

    @property
    def itls(self) -> list[float]:
        tt = self.token_times
        return [b - a for a, b in zip(tt, tt[1:])]

    @property
    def e2e(self) -> float | None:
        t = self.terminal
        return t.t - self.t_submit if t else None

    @property
    def answer_from_tokens(self) -> str:
        """Concatenated `token` texts; a `progress` {stage: "restream"} tells the client to start over."""
        parts: list[str] = []
        for e in self.events:
            if e.type == "token" and isinstance(e.data, dict):
                parts.append(str(e.data.get("text", "")))
            elif e.type == "progress" and isinstance(e.data, dict) and e.data.get("stage") == "restream":
                parts.clear()
        return "".join(parts)

    @property
    def completion_tokens(self) -> int:
        t = self.terminal
        if t is not None and t.type == "done" and isinstance(t.data, dict):
            return int((t.data.get("usage") or {}).get("completion_tokens", 0))
        return 0

    def consistency_problems(self) -> list[str]:
        """Client-view invariants: one terminal event, last; ids unique and increasing; done == tokens."""
        problems: list[str] = []
        ends = [e for e in self.events if e.type in TERMINAL]
        if len(ends) != 1:
            problems.append(f"{len(ends)} terminal events")
        elif self.events[-1] is not ends[0]:
            problems.append("events after the terminal event")
        ids = [e.id for e in self.events if e.id]
        if len(set(ids)) != len(ids):
            problems.append("duplicate event ids")
        keys = [stream_id_key(i) for i in ids]
        if keys != sorted(keys):
            problems.append("event ids not increasing")
        t = self.terminal
        if t is not None and t.type == "done" and isinstance(t.data, dict) and "answer" in t.data:
            if t.data["answer"] != self.answer_from_tokens:
                problems.append("done.answer differs from the concatenated tokens")
        return problems


class SR3DClient(_ApiClient):
    """The API client plus `run`/`follow`, which record a whole job into a JobResult."""

    async def run(self, req: JobRequest, *, stream_submit: bool = True, drop_after: int | None = None,
                  read_delay: float = 0.0, cancel_after_tokens: int | None = None,
                  on_event: Callable[[JobResult, SSEEvent], None] | None = None,
                  resume_timeout_s: float = 60.0) -> JobResult:
        """Submit a job and follow its events to the terminal one, resuming after any disconnect.

        drop_after: close the connection after this many events (a simulated network drop), then resume.
        read_delay: sleep between events (a slow reader; the server must not drop or reorder anything).
        cancel_after_tokens: DELETE the job once this many token events arrived.
        on_event: called with each event as it arrives (fault tests use it to time their faults).
        resume_timeout_s: keep retrying resumes (gateway restarting, Redis away) for this long.
        """
        res = JobResult(t_submit=time.perf_counter())
        if stream_submit:
            stream = self.events(req, resume_timeout_s=resume_timeout_s)
        else:
            try:
                r = await self.submit(req)
            except RESUMABLE as e:
                res.client_error = f"submit: {type(e).__name__}: {e}"
                return res
            res.http_status, res.t_accepted = r.status_code, time.perf_counter()
            if r.status_code not in (200, 201, 202):
                res.error_body = json_or_text(r)
                return res
            stream = self.events(job_id=r.json()["job_id"], resume_timeout_s=resume_timeout_s)
        await self._record(res, stream, drop_after, read_delay, cancel_after_tokens, on_event)
        if stream_submit:
            res.http_status, res.t_accepted, res.error_body = stream.submit_status, stream.t_accepted, stream.submit_error
        return res

    async def follow(self, job_id: str, *, last_event_id: str | None = None, read_delay: float = 0.0,
                     on_event: Callable[[JobResult, SSEEvent], None] | None = None,
                     resume_timeout_s: float = 60.0) -> JobResult:
        """Read an existing job's events (after `last_event_id`) to the terminal one, resuming as needed."""
        res = JobResult(job_id=job_id, http_status=200, t_submit=time.perf_counter())
        stream = self.events(job_id=job_id, last_event_id=last_event_id, resume_timeout_s=resume_timeout_s)
        await self._record(res, stream, None, read_delay, None, on_event)
        return res

    async def _record(self, res: JobResult, stream: EventStream, drop_after: int | None, read_delay: float,
                      cancel_after_tokens: int | None, on_event: Callable[[JobResult, SSEEvent], None] | None) -> None:
        cancelled = False
        try:
            async for ev in stream:
                if res.http_status is None:  # the streamed POST was answered
                    res.http_status, res.t_accepted = stream.submit_status, stream.t_accepted
                res.job_id = stream.job_id
                res.events.append(ev)
                if on_event is not None:
                    on_event(res, ev)
                if ev.type in TERMINAL:
                    break
                n_tokens = sum(1 for e in res.events if e.type == "token")
                if cancel_after_tokens is not None and not cancelled and res.job_id and n_tokens >= cancel_after_tokens:
                    cancelled = True
                    await self.cancel(res.job_id)
                if drop_after is not None and len(res.events) >= drop_after:
                    drop_after = None  # drop once; the resume reads to the end
                    stream.drop()
                if read_delay:
                    await asyncio.sleep(read_delay)
        except RESUMABLE as e:  # the streamed POST itself got no response
            res.client_error = f"submit: {type(e).__name__}: {e}"
        except StreamLost as e:
            res.client_error = str(e)
        res.job_id = res.job_id or stream.job_id
        res.resumes = stream.resumes


def box_regions(boxes: Sequence[tuple[int, Sequence[float]]]) -> list[list[dict[str, Any]]]:
    """[(frame, [x0,y0,x1,y1]), ...] -> one single-annotation region per box."""
    return [[{"frame": f, "box": [float(v) for v in b]}] for f, b in boxes]
