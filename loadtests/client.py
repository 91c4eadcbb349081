"""SSE-aware asyncio client for the SR-3D service: the load generator's engine and the tests' client.

Why asyncio + httpx and not Locust: one process has to hold hundreds of concurrent SSE streams open
and stamp every token event with its own arrival time (TTFT, inter-token latency) on a 2-core box.
Locust's request model is one request -> one response time; streaming needs its own timing hooks,
and its gevent monkey-patching fights with asyncio code (the same client is reused by the pytest
fault tests, which must not patch the interpreter). Plain coroutines on one event loop cost a few
kB per stream, and the timestamps come from `time.perf_counter()` at the moment the blank line that
ends an SSE event is read.

The client sees the service exactly as a user does: multipart upload, SSE with `id:` lines, resume
with `Last-Event-ID` on any gateway, DELETE to cancel. `JobResult` keeps every event it received so
callers can check "exactly one terminal event, nothing lost, nothing duplicated".
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from service.sse_client import aiter_events

TERMINAL = frozenset({"done", "error"})
_RESUMABLE = (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout, httpx.ConnectError, httpx.WriteError)


@dataclass
class SSEEvent:
    id: str | None
    type: str
    data: Any  # parsed JSON when the payload is JSON, else the raw string
    t: float  # perf_counter() when the event's terminating blank line arrived


@dataclass
class Media:
    """One upload: the multipart part name is `kind` ("video" or "image")."""

    kind: str
    filename: str
    content: bytes
    content_type: str = "application/octet-stream"

    @classmethod
    def from_path(cls, path: str | Path, kind: str | None = None) -> Media:
        p = Path(path)
        suffix = p.suffix.lower()
        guessed = "image" if suffix in {".png", ".jpg", ".jpeg", ".webp"} else "video"
        types = {".mp4": "video/mp4", ".webm": "video/webm", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
        return cls(kind or guessed, p.name, p.read_bytes(), types.get(suffix, "application/octet-stream"))


@dataclass
class JobRequest:
    media: Media
    question: str
    regions: list[list[dict[str, Any]]] = field(default_factory=list)  # [[{"frame":0,"box":[..]}], ...]
    masks: dict[str, bytes] = field(default_factory=dict)  # multipart part name -> PNG bytes
    options: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None

    def multipart(self) -> tuple[dict[str, str], list[tuple[str, tuple[str, bytes, str]]]]:
        data = {"question": self.question, "regions": json.dumps(self.regions)}
        if self.options:
            data["options"] = json.dumps(self.options)
        files = [(self.media.kind, (self.media.filename, self.media.content, self.media.content_type))]
        files += [(name, (f"{name}.png", png, "image/png")) for name, png in self.masks.items()]
        return data, files


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


def stream_id_key(entry_id: str) -> tuple[int, int]:
    """Redis stream ids compare as (ms, seq) pairs, not as strings."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def iter_sse(response: httpx.Response) -> AsyncIterator[SSEEvent]:
    """The stream's events (WHATWG framing, keep-alive pings skipped), data decoded as JSON where it is JSON."""
    async for sse in aiter_events(response):
        try:
            payload: Any = json.loads(sse.data)
        except ValueError:
            payload = sse.data
        yield SSEEvent(sse.id or None, sse.event, payload, time.perf_counter())


class SR3DClient:
    """Thin async client over one pooled httpx connection set. Use as `async with SR3DClient(url) as c:`."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 120.0, max_connections: int = 1000) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        # read timeout must exceed the server's keep-alive ping interval (15 s) so idle streams survive
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                       timeout=httpx.Timeout(timeout, connect=10.0))

    async def __aenter__(self) -> SR3DClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        """The underlying httpx client (base URL and auth headers set), for requests this class lacks."""
        return self._http

    async def submit(self, req: JobRequest, *, params: Mapping[str, str] | None = None) -> httpx.Response:
        """POST without streaming: 202 + SubmitResponse, or a 4xx error body."""
        data, files = req.multipart()
        headers = {"Idempotency-Key": req.idempotency_key} if req.idempotency_key else {}
        return await self._http.post("/v1/spatial-qa", data=data, files=files, headers=headers, params=params)

    async def get(self, job_id: str) -> httpx.Response:
        return await self._http.get(f"/v1/spatial-qa/{job_id}")

    async def cancel(self, job_id: str) -> httpx.Response:
        return await self._http.delete(f"/v1/spatial-qa/{job_id}")

    async def get_json(self, path: str) -> httpx.Response:
        return await self._http.get(path)

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
        data, files = req.multipart()
        headers = {"Idempotency-Key": req.idempotency_key} if req.idempotency_key else {}
        state = _Follow(res, drop_after, read_delay, cancel_after_tokens, self, on_event)
        try:
            if stream_submit:
                headers["Accept"] = "text/event-stream"
                async with self._http.stream("POST", "/v1/spatial-qa", data=data, files=files, headers=headers) as r:
                    res.http_status, res.t_accepted = r.status_code, time.perf_counter()
                    if r.status_code != 200:
                        await r.aread()
                        res.error_body = _json_or_text(r)
                        return res
                    res.job_id = r.headers.get("x-job-id") or _job_id_from_location(r.headers.get("location"))
                    await state.consume(r)
            else:
                r = await self._http.post("/v1/spatial-qa", data=data, files=files, headers=headers)
                res.http_status, res.t_accepted = r.status_code, time.perf_counter()
                if r.status_code not in (200, 201, 202):
                    res.error_body = _json_or_text(r)
                    return res
                res.job_id = r.json()["job_id"]
        except _RESUMABLE as e:
            if res.http_status is None:  # never got a response: the submit itself failed
                res.client_error = f"submit: {type(e).__name__}: {e}"
                return res
        await self._follow_to_end(res, state, resume_timeout_s)
        return res

    async def follow(self, job_id: str, *, last_event_id: str | None = None, read_delay: float = 0.0,
                     on_event: Callable[[JobResult, SSEEvent], None] | None = None,
                     resume_timeout_s: float = 60.0) -> JobResult:
        """Read an existing job's events (after `last_event_id`) to the terminal one, resuming as needed."""
        res = JobResult(job_id=job_id, http_status=200, t_submit=time.perf_counter())
        if last_event_id:  # a synthetic marker so the first request already carries Last-Event-ID
            res.events.append(SSEEvent(last_event_id, "_resume_marker", None, res.t_submit))
        await self._follow_to_end(res, _Follow(res, None, read_delay, None, self, on_event), resume_timeout_s)
        res.events = [e for e in res.events if e.type != "_resume_marker"]
        res.resumes = max(0, res.resumes - 1)  # the first read is not a resume
        return res

    async def _follow_to_end(self, res: JobResult, state: _Follow, resume_timeout_s: float) -> None:
        give_up = time.perf_counter() + resume_timeout_s
        while res.terminal is None and res.client_error is None:
            if res.job_id is None:
                res.client_error = "stream ended before the job id was known"
                break
            if time.perf_counter() > give_up:
                res.client_error = f"gave up after {res.resumes} resumes in {resume_timeout_s} s"
                break
            res.resumes += 1
            n_before = len(res.events)
            await self._resume(res, state)
            if len(res.events) > n_before:
                give_up = time.perf_counter() + resume_timeout_s  # progress: the clock restarts

    async def _resume(self, res: JobResult, state: _Follow) -> None:
        last = next((e.id for e in reversed(res.events) if e.id), None)
        headers = {"Accept": "text/event-stream"}
        if last:
            headers["Last-Event-ID"] = last
        try:
            async with self._http.stream("GET", f"/v1/spatial-qa/{res.job_id}/events", headers=headers) as r:
                if r.status_code != 200:
                    await r.aread()
                    if r.status_code in (502, 503, 504):
                        await asyncio.sleep(0.2)  # gateway restarting or Redis away: retry
                        return
                    res.client_error = f"resume: HTTP {r.status_code} {r.text[:200]}"
                    return
                await state.consume(r)
        except _RESUMABLE:
            await asyncio.sleep(0.2)  # gateway down: the caller's loop retries within max_resumes


class _Follow:
    """Per-job reading state shared between the first stream and its resumes."""

    def __init__(self, res: JobResult, drop_after: int | None, read_delay: float, cancel_after_tokens: int | None,
                 client: SR3DClient, on_event: Callable[[JobResult, SSEEvent], None] | None = None) -> None:
        self.res, self.drop_after, self.read_delay = res, drop_after, read_delay
        self.cancel_after_tokens, self.client, self.on_event = cancel_after_tokens, client, on_event
        self.cancelled = False

    async def consume(self, r: httpx.Response) -> None:
        async for ev in iter_sse(r):
            if self.res.job_id is None and isinstance(ev.data, dict) and ev.data.get("job_id"):
                self.res.job_id = str(ev.data["job_id"])
            self.res.events.append(ev)
            if self.on_event is not None:
                self.on_event(self.res, ev)
            if ev.type in TERMINAL:
                return
            n_tokens = sum(1 for e in self.res.events if e.type == "token")
            if (self.cancel_after_tokens is not None and not self.cancelled and self.res.job_id
                    and n_tokens >= self.cancel_after_tokens):
                self.cancelled = True
                await self.client.cancel(self.res.job_id)
            if self.drop_after is not None and len(self.res.events) >= self.drop_after:
                self.drop_after = None  # drop once; the resume reads to the end
                return  # leaving the `async with` closes the connection mid-stream
            if self.read_delay:
                await asyncio.sleep(self.read_delay)


def _json_or_text(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text


def _job_id_from_location(loc: str | None) -> str | None:
    if not loc:
        return None
    return loc.rstrip("/").split("/")[-1] or None


def box_regions(boxes: Sequence[tuple[int, Sequence[float]]]) -> list[list[dict[str, Any]]]:
    """[(frame, [x0,y0,x1,y1]), ...] -> one single-annotation region per box."""
    return [[{"frame": f, "box": [float(v) for v in b]}] for f, b in boxes]
