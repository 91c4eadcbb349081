"""The Python client of the SR-3D API, the one client the project has: `sr3d ask`, `sr3d eval`, the
benchmarks (loadtests/) and the tests all use it.

It sees the service exactly as a user does: multipart upload, SSE with `id:` lines, resume with
`Last-Event-ID` on any gateway replica, DELETE to cancel. asyncio + httpx, so one process can hold
hundreds of streams; every event is stamped with `time.perf_counter()` when its blank line arrives.

`SR3DClient.run` / `follow` record a whole job into a `JobResult` (every event with its arrival time:
TTFT, inter-token latency; the client-view invariants), and `run` can misbehave on purpose (drop the
connection, read slowly, cancel mid-answer) for load and fault tests.

Why asyncio + httpx and not Locust: one process has to hold hundreds of concurrent SSE streams open
and stamp every token event with its own arrival time on a 2-core box. Locust's request model is one
request -> one response time, and its gevent monkey-patching fights with asyncio code (the pytest
fault tests use this client and must not patch the interpreter).
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import EventSource

TERMINAL = frozenset({"done", "error"})
# Transport failures after which a stream is resumed (gateway restarting, network drop).
RESUMABLE = (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout, httpx.ConnectError, httpx.WriteError)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_CONTENT_TYPES = {".mp4": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm", ".mkv": "video/x-matroska",
                  ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


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
        guessed = "image" if suffix in IMAGE_SUFFIXES else "video"
        return cls(kind or guessed, p.name, p.read_bytes(), _CONTENT_TYPES.get(suffix, "application/octet-stream"))


@dataclass
class JobRequest:
    media: Media
    question: str
    regions: list[list[dict[str, Any]]] = field(default_factory=list)  # [[{"frame":0,"box":[..]}], ...]
    masks: dict[str, bytes] = field(default_factory=dict)  # multipart part name -> PNG bytes
    options: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    scene: Media | None = None  # an RGB-D .npz (exact depth, intrinsics, poses), sent as the `scene` part

    def multipart(self) -> tuple[dict[str, str], list[tuple[str, tuple[str, bytes, str]]]]:
        data = {"question": self.question, "regions": json.dumps(self.regions)}
        if self.options:
            data["options"] = json.dumps(self.options)
        files = [(self.media.kind, (self.media.filename, self.media.content, self.media.content_type))]
        files += [(name, (f"{name}.png", png, "image/png")) for name, png in self.masks.items()]
        if self.scene is not None:
            files.append(("scene", (self.scene.filename, self.scene.content, self.scene.content_type)))
        return data, files

    def headers(self) -> dict[str, str]:
        return {"Idempotency-Key": self.idempotency_key} if self.idempotency_key else {}


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

    @property
    def started_by(self) -> list[str]:
        """Consumer names of the workers that started this job, in order (one per delivery attempt)."""
        return [e.data.get("worker", "") for e in self.events
                if e.type == "progress" and isinstance(e.data, dict) and e.data.get("stage") == "started"]


class StreamLost(Exception):
    """The job's events could not be read to the end (resumes kept failing, or the job is unknown)."""


def stream_id_key(entry_id: str) -> tuple[int, int]:
    """Redis stream ids compare as (ms, seq) pairs, not as strings."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def iter_sse(response: httpx.Response) -> AsyncIterator[SSEEvent]:
    """The stream's events (httpx-sse parses the WHATWG framing), data decoded as JSON where it is JSON."""
    async for sse in EventSource(response).aiter_sse():
        if sse.event == "message" and not sse.data:
            # A keep-alive comment: httpx-sse dispatches it as an empty event carrying the last id
            # (the WHATWG parser dispatches nothing when the data buffer is empty).
            continue
        try:
            payload: Any = json.loads(sse.data)
        except ValueError:
            payload = sse.data
        yield SSEEvent(sse.id or None, sse.event, payload, time.perf_counter())


def box_regions(boxes: Sequence[tuple[int, Sequence[float]]]) -> list[list[dict[str, Any]]]:
    """[(frame, [x0,y0,x1,y1]), ...] -> one single-annotation region per box."""
    return [[{"frame": f, "box": [float(v) for v in b]}] for f, b in boxes]


def json_or_text(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text


def job_id_from_location(loc: str | None) -> str | None:
    if not loc:
        return None
    return loc.rstrip("/").split("/")[-1] or None


class SR3DClient:
    """Async client over one pooled httpx connection set. Use as `async with SR3DClient(url) as c:`.

    `submit`/`events` are the protocol; `run`/`follow` record a whole job into a JobResult."""

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
        return await self._http.post("/v1/spatial-qa", data=data, files=files, headers=req.headers(), params=params)

    async def get(self, job_id: str) -> httpx.Response:
        return await self._http.get(f"/v1/spatial-qa/{job_id}")

    async def cancel(self, job_id: str) -> httpx.Response:
        return await self._http.delete(f"/v1/spatial-qa/{job_id}")

    async def get_json(self, path: str) -> httpx.Response:
        return await self._http.get(path)

    def open_submit_stream(self, req: JobRequest) -> AbstractAsyncContextManager[httpx.Response]:
        """POST with `Accept: text/event-stream`: the response is the job's event stream."""
        data, files = req.multipart()
        headers = {**req.headers(), "Accept": "text/event-stream"}
        return self._http.stream("POST", "/v1/spatial-qa", data=data, files=files, headers=headers)

    def open_events(self, job_id: str, last_event_id: str | None = None) -> AbstractAsyncContextManager[httpx.Response]:
        headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_event_id} if last_event_id else {})}
        return self._http.stream("GET", f"/v1/spatial-qa/{job_id}/events", headers=headers)

    def events(self, req: JobRequest | None = None, *, job_id: str | None = None, last_event_id: str | None = None,
               resume_timeout_s: float = 60.0) -> EventStream:
        """A job's events to its terminal one: submit `req` as a streamed POST, or attach to `job_id`
        (after `last_event_id`); dropped connections are resumed with Last-Event-ID."""
        return EventStream(self, req, job_id, last_event_id, resume_timeout_s)


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


class EventStream:
    """`async for ev in client.events(...)`: one job's events, each once, in order, to the terminal one.

    After a streamed POST, `submit_status`/`submit_error` say how the POST was answered (the iteration
    ends at once when it was refused). A POST that got no response at all raises the transport error;
    resuming that keeps failing for `resume_timeout_s` (the clock restarts on every event) raises
    StreamLost. `drop()` closes the current connection after the event being handled, as a network
    drop would; the stream then resumes.
    """

    def __init__(self, client: SR3DClient, req: JobRequest | None, job_id: str | None, last_event_id: str | None,
                 resume_timeout_s: float) -> None:
        self.client, self.req, self.job_id, self.last_event_id = client, req, job_id, last_event_id
        self.resume_timeout_s = resume_timeout_s
        self.submit_status: int | None = None
        self.submit_error: Any = None
        self.submit_headers: Mapping[str, str] = {}  # of a refused POST (Retry-After)
        self.t_accepted: float | None = None
        self.resumes = 0  # connections opened after the first one
        self._drop = False

    def drop(self) -> None:
        self._drop = True

    def __aiter__(self) -> AsyncIterator[SSEEvent]:
        return self._events()

    async def _read(self, r: httpx.Response) -> AsyncIterator[SSEEvent]:
        self._drop = False
        async for ev in iter_sse(r):
            if self.job_id is None and isinstance(ev.data, dict) and ev.data.get("job_id"):
                self.job_id = str(ev.data["job_id"])  # the first event names the job
            self.last_event_id = ev.id or self.last_event_id
            yield ev
            if ev.type in TERMINAL or self._drop:
                return

    async def _events(self) -> AsyncIterator[SSEEvent]:
        connections = 0
        if self.req is not None:
            connections = 1
            try:
                async with self.client.open_submit_stream(self.req) as r:
                    self.submit_status, self.t_accepted = r.status_code, time.perf_counter()
                    if r.status_code != 200:
                        await r.aread()
                        self.submit_error, self.submit_headers = json_or_text(r), r.headers
                        return
                    self.job_id = r.headers.get("x-job-id") or job_id_from_location(r.headers.get("location"))
                    async for ev in self._read(r):
                        yield ev
                        if ev.type in TERMINAL:
                            return
            except RESUMABLE:
                if self.submit_status is None:  # never got a response: the submit itself failed
                    raise
        give_up = time.perf_counter() + self.resume_timeout_s
        while True:
            if self.job_id is None:
                raise StreamLost("stream ended before the job id was known")
            if time.perf_counter() > give_up:
                raise StreamLost(f"gave up after {self.resumes} resumes in {self.resume_timeout_s} s")
            self.resumes += connections > 0
            connections += 1
            try:
                async with self.client.open_events(self.job_id, self.last_event_id) as r:
                    if r.status_code != 200:
                        await r.aread()
                        if r.status_code in (502, 503, 504):
                            await asyncio.sleep(0.2)  # gateway restarting or Redis away: retry
                            continue
                        raise StreamLost(f"resume: HTTP {r.status_code} {r.text[:200]}")
                    async for ev in self._read(r):
                        give_up = time.perf_counter() + self.resume_timeout_s  # progress: the clock restarts
                        yield ev
                        if ev.type in TERMINAL:
                            return
            except RESUMABLE:
                await asyncio.sleep(0.2)  # gateway down: retry until resume_timeout_s
