"""Job event streams for many clients over ONE blocking Redis connection per gateway process.

Before: every SSE client (and every `?wait=true`) held its own blocking XREAD on a shared pool, so
~100 concurrent streams exhausted it and new streams failed for everyone (issue 14 item 3).

Now a `StreamHub` runs one reader task: a single `XREAD BLOCK` over the event streams of every job
that has at least one subscriber, fanned out to the subscribers' bounded asyncio queues. A new job
wakes the blocked read at once (`CLIENT UNBLOCK` from the ordinary pool). Each subscriber first
catches up with short non-blocking XRANGE pages from its resume point, then follows the fan-out;
ids at or below what it already yielded are skipped, so the two sources never duplicate or gap.
A subscriber that falls `queue_size` events behind is not dropped: it re-reads from Redis.

Limits are explicit and checked before a response starts: `subscribe()` raises `HubFull`
(503 + Retry-After) at `max_subscribers`, and (429 streams_quota_exceeded + Retry-After) when the
subscription's `owner` (an API key's rate bucket) already holds `max_per_owner` of them: one key
opening 4,200 streams on its own job took every slot and refused everyone else (issue 30 item 6).
Redis connections: 1 blocking + the ordinary pool's
short commands, however many clients.

Resume (`check_resume`): Last-Event-ID must be a Redis stream id within range (400 otherwise, not a
Redis error mid-response); at or after the job's terminal event the stream is over (the gateway
answers 204, which also tells a browser EventSource to stop reconnecting); ahead of the newest event
it is not an id this job ever sent (400).

Used by the gateway (one hub per process, opened in service/api/deps.py): SSE responses through
service/sse.py (events route, streamed submit, OpenAI streaming) and `?wait=true` / non-streaming
chat completions through `wait_terminal`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service import metrics
from service.errors import ApiError
from service.jobs.events import Event, event_from_entry
from service.keys import events_key, job_key, job_of_events_key
from service.redis_conn import clone_client

log = logging.getLogger("sr3d.stream_hub")

_EVENT_ID = re.compile(r"^([0-9]{1,20})-([0-9]{1,20})$")  # ASCII digits only: int() would take "１"
_U64 = 2**64 - 1


def parse_event_id(raw: str) -> str:
    """A Last-Event-ID as a Redis stream id `ms-seq` with both parts in [0, 2^64): ApiError 400
    otherwise (Redis itself would answer a ResponseError after the 200 had already been sent)."""
    m = _EVENT_ID.match(raw.strip())
    if not m or int(m.group(1)) > _U64 or int(m.group(2)) > _U64:
        raise ApiError("bad_last_event_id", f"Last-Event-ID {raw[:64]!r} is not an event id like 1718000000000-0")
    return f"{int(m.group(1))}-{int(m.group(2))}"


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class HubFull(Exception):
    def __init__(self, limit: int, retry_after_s: int, per_owner: bool = False) -> None:
        where = "for this API key" if per_owner else ""
        super().__init__(f"{limit} event streams are open on this gateway{' ' + where if where else ''}")
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.per_owner = per_owner

    def api_error(self) -> ApiError:
        code = "streams_quota_exceeded" if self.per_owner else "too_many_streams"
        return ApiError(code, str(self), {"Retry-After": str(self.retry_after_s)})


class Subscription:
    """One client's view of one job's events. Iterate `events()` once; it ends after the terminal
    event, on job expiry, or with an `error` event when Redis stays unreachable."""

    def __init__(self, hub: StreamHub, job_id: str, after: str, queue_size: int, owner: str | None = None) -> None:
        self.hub = hub
        self.job_id = job_id
        self.owner = owner
        self.last = after
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=queue_size)
        self.resync = False  # set when the queue overflowed: re-read from Redis
        self.closed = False

    def push(self, ev: Event) -> None:
        if self.resync:
            return
        try:
            self.queue.put_nowait(ev)
        except asyncio.QueueFull:
            self.resync = True

    async def _catch_up(self) -> AsyncIterator[Event]:
        while True:
            async with self.hub.redis_slots:
                entries = await self.hub.redis.xrange(events_key(self.job_id), min=f"({self.last}", max="+", count=self.hub.page)
            for eid, fields in entries:
                yield event_from_entry(eid, fields)
            if len(entries) < self.hub.page:
                return

    async def events(self) -> AsyncIterator[Event]:
        try:
            async for ev in self._follow():
                yield ev
        finally:
            self.close()

    async def _follow(self) -> AsyncIterator[Event]:
        try:
            resync = True
            while True:
                if resync or self.resync:
                    while not self.queue.empty():
                        self.queue.get_nowait()
                    self.resync = False
                    async for ev in self._catch_up():
                        self.last = ev.id
                        yield ev
                        if ev.terminal:
                            return
                    resync = False
                try:
                    ev = await asyncio.wait_for(self.queue.get(), self.hub.idle_check_s)
                except asyncio.TimeoutError:
                    down = self.hub.down_for()
                    if down > self.hub.outage_grace_s:
                        yield self._error("redis_unavailable", f"the event store has been unreachable for {down:.0f} s; "
                                          "reconnect with Last-Event-ID to resume")
                        return
                    async with self.hub.redis_slots:
                        exists = down > 0 or await self.hub.redis.exists(job_key(self.job_id))
                    if not exists:
                        yield self._error("job_expired", "job no longer exists")
                        return
                    resync = down == 0  # cheap safety net: anything the fan-out could have missed
                    continue
                if _id(ev.id) <= _id(self.last):
                    continue
                self.last = ev.id
                yield ev
                if ev.terminal:
                    return
        except (RedisError, OSError) as e:  # catch-up or expiry check failed: tell the client, then end
            yield self._error("redis_unavailable", f"the event store is unreachable ({type(e).__name__}); "
                              "reconnect with Last-Event-ID to resume")

    def _error(self, code: str, message: str) -> Event:
        # No id: a client resuming must resume from the last real event, not from this one.
        return Event(id="", type="error", data={"code": code, "message": message})

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.hub._unsubscribe(self)


class _Job:
    __slots__ = ("last_id", "subs", "done")

    def __init__(self, last_id: str) -> None:
        self.last_id = last_id
        self.subs: set[Subscription] = set()
        self.done = False


class StreamHub:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        max_subscribers: int = 4096,
        max_per_owner: int | None = None,
        retry_after_s: int = 5,
        queue_size: int = 256,
        block_ms: int = 2000,
        idle_check_s: float = 15.0,
        outage_grace_s: float = 30.0,
        page: int = 200,
        max_redis_calls: int = 16,
        min_read_interval_s: float = 0.005,
    ) -> None:
        self.redis = redis  # ordinary pool: short commands only
        # Catch-up reads of many clients at once (a reconnect storm) must not take the ordinary
        # pool's every connection from the API's own commands: at most this many at a time.
        self.redis_slots = asyncio.Semaphore(max_redis_calls)
        # The one blocking connection: no socket timeout (the server holds XREAD up to block_ms);
        # a single-connection client, so its CLIENT ID names the connection the XREAD blocks on.
        pool = clone_client(redis, socket_timeout=None).connection_pool
        self._reader_redis = aioredis.Redis(connection_pool=pool, single_connection_client=True)
        self.max_subscribers = max_subscribers
        self.max_per_owner = max_per_owner
        self._owners: dict[str, int] = {}  # open subscriptions per owner (only owners with some)
        self.retry_after_s = retry_after_s
        self.queue_size = queue_size
        self.block_ms = block_ms
        self.idle_check_s = idle_check_s
        self.outage_grace_s = outage_grace_s
        self.page = page
        # An XREAD names every followed job's stream, so it costs O(jobs) on both sides, and a blocked
        # read returns on the first event anywhere: one read per event, O(jobs x events) in all. Reads
        # that found events are spaced this far apart, so each carries every event written meanwhile
        # (a few ms of delay against a worker's 30 ms token coalescing).
        self.min_read_interval_s = min_read_interval_s
        self._jobs: dict[str, _Job] = {}
        self._count = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reader_id: int | None = None
        self._blocked = False
        self._wakers: set[asyncio.Future[None]] = set()
        self._down_since: float | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._read_loop(), name="sr3d-stream-hub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._drop_conn()
        await self._reader_redis.aclose()

    @property
    def subscribers(self) -> int:
        return self._count

    def down_for(self) -> float:
        return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    # ---- subscribing -----------------------------------------------------------------------------
    async def check_resume(self, job_id: str, after: str) -> Literal["live", "ended"]:
        """'ended' when `after` is at or past the job's terminal event; 400 when it is past the
        newest event of an unfinished job (an id this job never sent)."""
        async with self.redis_slots:
            last = await self.redis.xrevrange(events_key(job_id), count=1)
        if not last:
            return "live"
        newest = event_from_entry(*last[0])
        if _id(after) >= _id(newest.id):
            if newest.terminal:
                return "ended"
            if _id(after) > _id(newest.id):
                raise ApiError("bad_last_event_id", f"Last-Event-ID {after} is after this job's newest event")
        return "live"

    def check_room(self, owner: str | None = None) -> None:
        """HubFull when one more stream would be over the limit, of the gateway or of `owner` (for a
        caller that must refuse before it does work, e.g. queue a job it then could not stream).
        The owner's quota is checked first: a key at its own limit is told so, not that the
        gateway is full."""
        if owner is not None and self.max_per_owner is not None and self._owners.get(owner, 0) >= self.max_per_owner:
            raise HubFull(self.max_per_owner, self.retry_after_s, per_owner=True)
        if self._count >= self.max_subscribers:
            raise HubFull(self.max_subscribers, self.retry_after_s)

    def owned(self, owner: str) -> int:
        return self._owners.get(owner, 0)

    def subscribe(self, job_id: str, after: str = "0-0", owner: str | None = None) -> Subscription:
        """Register a client now (so the 503/429 comes before any response byte). Raises HubFull."""
        self.check_room(owner)
        sub = Subscription(self, job_id, after, self.queue_size, owner)
        if owner is not None:
            self._owners[owner] = self._owners.get(owner, 0) + 1
        job = self._jobs.get(job_id)
        if job is None:
            # The reader starts at `after`; the subscriber's own catch-up covers the same range
            # again and duplicates are dropped by id, so nothing between the two can be missed.
            job = self._jobs[job_id] = _Job(after)
            self._wake()
        elif _id(after) < _id(job.last_id):
            pass  # the catch-up reads the older part; the reader carries on from where it is
        job.subs.add(sub)
        self._count += 1
        metrics.SSE_CLIENTS.inc()
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        job = self._jobs.get(sub.job_id)
        if job is None or sub not in job.subs:
            return
        job.subs.discard(sub)
        self._count -= 1
        if sub.owner is not None:
            left = self._owners.get(sub.owner, 1) - 1
            if left > 0:
                self._owners[sub.owner] = left
            else:
                self._owners.pop(sub.owner, None)
        metrics.SSE_CLIENTS.dec()
        if not job.subs:
            del self._jobs[sub.job_id]

    async def wait_terminal(self, job_id: str, timeout_s: float, owner: str | None = None) -> Event | None:
        """The job's terminal event, or None after timeout_s (for `?wait=true`)."""
        sub = self.subscribe(job_id, owner=owner)
        try:
            async with asyncio.timeout(timeout_s):
                async for ev in sub.events():
                    if ev.terminal:
                        return ev
        except TimeoutError:
            return None
        finally:
            sub.close()
        return None

    # ---- the reader ------------------------------------------------------------------------------
    def _wake(self) -> None:
        self._changed.set()
        if self._blocked and self._reader_id is not None:
            # An UNBLOCK that lands just before the XREAD reaches the server is lost; the read
            # then ends within block_ms anyway, and the new subscriber's catch-up covers the gap.
            task = asyncio.ensure_future(self._unblock(self._reader_id))
            self._wakers.add(task)
            task.add_done_callback(self._wakers.discard)

    async def _unblock(self, client_id: int) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.redis.client_unblock(client_id)

    async def _drop_conn(self) -> None:
        self._reader_id = None  # a reconnect gets a new client id; fetched before the next XREAD

    async def _xread(self, streams: dict[str, str]) -> Any:
        if self._reader_id is None:
            self._reader_id = int(await self._reader_redis.client_id())
        self._blocked = True
        try:
            return await self._reader_redis.xread(streams, count=self.page, block=self.block_ms)
        finally:
            self._blocked = False

    async def _read_loop(self) -> None:
        backoff = 0.05
        while True:
            live = {events_key(j): s.last_id for j, s in self._jobs.items() if not s.done}
            if not live:
                self._changed.clear()
                await self._changed.wait()
                continue
            self._changed.clear()
            t_read = time.monotonic()
            try:
                res = await self._xread(live)
                if self._down_since is not None:
                    log.info("event store reachable again; subscribers re-read what they missed")
                    for job in self._jobs.values():
                        for sub in job.subs:
                            sub.resync = True
                self._down_since = None
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, ValueError) as e:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("stream hub read failed (%s); retrying", e)
                await self._drop_conn()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            for key, entries in _pairs(res):
                job = self._jobs.get(job_of_events_key(key))
                if job is None:
                    continue
                for eid, fields in entries:
                    ev = event_from_entry(eid, fields)
                    job.last_id = eid
                    for sub in list(job.subs):
                        sub.push(ev)
                    if ev.terminal:
                        job.done = True
            if res:
                await asyncio.sleep(max(0.0, t_read + self.min_read_interval_s - time.monotonic()))


def _decode(x: Any) -> Any:
    return x.decode() if isinstance(x, bytes) else x


def _pairs(res: Any) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
    """XREAD reply (RESP2 list or RESP3 map, bytes or str) as [(key, [(id, fields)])]."""
    if not res:
        return []
    items = res.items() if isinstance(res, dict) else res
    out = []
    for key, entries in items:
        rows = []
        for eid, flat in entries:
            if isinstance(flat, dict):
                fields = {_decode(k): _decode(v) for k, v in flat.items()}
            else:
                flat = flat or []
                fields = {_decode(flat[i]): _decode(flat[i + 1]) for i in range(0, len(flat), 2)}
            rows.append((_decode(eid), fields))
        out.append((_decode(key), rows))
    return out

