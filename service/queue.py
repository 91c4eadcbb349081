"""The Redis-streams job queue shared by the gateway (submit, read events, cancel) and the workers
(claim, heartbeat, start, publish events, finish, ack).

Redis layout (key names: service/keys.py; deploy/ and KEDA read some of them):
  sr3d:jobs                 stream of {job_id}; consumer group sr3d-workers; MAXLEN ~ jobs_maxlen
  sr3d:job:{id}             hash: spec (JobSpec JSON), status, created_at, started_at, finished_at,
                            consumer, attempts, cancel, progress, answer, finish_reason, error,
                            usage, timings (JSON where structured)
  sr3d:job:{id}:events      stream of {type, data(JSON)}: the client's single source of truth
  sr3d:job:{id}:scene       bytes: the compact 3D scene for the page (model/geometry/scene_export.py)
  sr3d:dlq                  stream of dead-lettered jobs {job_id, entry_id, deliveries, reason, spec}
  sr3d:idem:{hash}          {"job_id", "request"}: an Idempotency-Key's job and the hash of the
                            request it was first sent with; scoped by API key, written in the same
                            script that stores the job, and it expires with the job
Job hash and events get a TTL of job_ttl_s once terminal (job_max_age_s before that, as a safety net).

Delivery is at-least-once. The terminal `done`/`error` event is written before `finish()` and
before `ack()`; a worker handed a redelivered job calls `try_start`, which refuses a job whose
event stream already ends in a terminal event (and repairs its status), so a client never sees two.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.exceptions import ResponseError

from service import metrics
from service.blobs import BlobStore, check_redis_room, make_blob_store
from service.keys import DLQ, GROUP, JOBS, events_key, idem_key, job_key, scene_key
from service.consumer_name import is_dead_local_consumer
from service.redis_conn import clone_client
from service.schemas import ErrorInfo, JobSpec, JobStatus, JobView, Usage, TERMINAL_EVENTS
from service.settings import Settings

log = logging.getLogger("sr3d.queue")

# Scenes may fill the blob store up to this share of the uploads' high-water mark (put_scene).
SCENE_SHARE = 0.5

DLQ_MAXLEN = 10000
ENTRY_ID = re.compile(r"^\d+-\d+$")


class IdempotencyKeyReused(Exception):
    """An Idempotency-Key sent again with a different request: the API answers 422
    `idempotency_key_reused` instead of replaying a job that answers another question."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"this Idempotency-Key was already used for another request (job {job_id}); "
                         "use a new key for a new request")
        self.job_id = job_id


class QueueFull(Exception):
    """Outstanding jobs (lag + pending) reached SR3D_QUEUE_MAX; the API answers 429 + Retry-After."""

    def __init__(self, outstanding: int, cap: int, retry_after_s: int) -> None:
        super().__init__(f"queue is full ({outstanding} outstanding jobs, cap {cap})")
        self.outstanding = outstanding
        self.cap = cap
        self.retry_after_s = retry_after_s


@dataclass
class Delivery:
    entry_id: str  # id in sr3d:jobs; pass to heartbeat() and ack()
    job: JobSpec
    deliveries: int  # 1 on first delivery; >1 after a reclaim or a restart of the same consumer


@dataclass
class Event:
    id: str  # Redis entry id in the job's events stream (the SSE `id:`)
    type: str  # queued | progress | token | done | error
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


# Store a new job atomically with its Idempotency-Key, so the key never names a job that was not
# stored (a crash between the two would leave a key to nothing). KEYS: idem (or ""), job hash, events,
# jobs stream. ARGV: spec, created_at, queued-event data, job_max_age_s, jobs maxlen, job_id, idem value.
# Returns {0, existing idem value} when the key is taken, {1, entry id} when the job was stored.
# A script that fails half-way does not roll back: the key is written last, so an error leaves no
# key naming a job that was never queued (a retry with the same key then submits afresh).
_SUBMIT = """
if KEYS[1] ~= '' then
  local existing = redis.call('GET', KEYS[1])
  if existing then return {0, existing} end
end
redis.call('HSET', KEYS[2], 'spec', ARGV[1], 'status', 'queued', 'created_at', ARGV[2], 'attempts', 0)
if KEYS[1] ~= '' then redis.call('HSET', KEYS[2], 'idem', KEYS[1]) end
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('XADD', KEYS[3], '*', 'type', 'queued', 'data', ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[4])
local entry = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'job_id', ARGV[6])
if KEYS[1] ~= '' then redis.call('SET', KEYS[1], ARGV[7], 'EX', ARGV[4]) end
return {1, entry}
"""

# compare-and-set queued|running -> running. 1 started, 0 terminal or missing, 2 cancel requested.
_TRY_START = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s or s == 'done' or s == 'failed' or s == 'cancelled' then return 0 end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 2 end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'consumer', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return 1
"""

# -1 missing, 0 already terminal, 1 flag set (running: the worker aborts), 2 queued job cancelled here.
_CANCEL = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return -1 end
if s == 'done' or s == 'failed' or s == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'cancel', '1')
if s ~= 'queued' then return 1 end
redis.call('XADD', KEYS[2], '*', 'type', 'error', 'data', ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1], 'error', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
-- the job's Idempotency-Key (if any) expires with the job
local idem = redis.call('HGET', KEYS[1], 'idem')
if idem then redis.call('EXPIRE', idem, ARGV[4]) end
return 2
"""

# Refresh idle time of entries this consumer still owns; returns the ids it no longer owns.
_HEARTBEAT = """
local lost = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
  else
    table.insert(lost, id)
  end
end
return lost
"""


def _loads(value: str | None) -> Any:
    return json.loads(value) if value else None


class JobQueue:
    def __init__(self, redis: aioredis.Redis, settings: Settings, blobs: BlobStore | None = None) -> None:
        """`redis`: redis.asyncio.Redis(decode_responses=True). Blocking reads (XREAD/XREADGROUP
        BLOCK) go through a second pool without a socket timeout. `blobs` defaults to the store
        the settings name (used to expire a finished job's uploads)."""
        self.redis = redis
        self.settings = settings
        self._blocking = clone_client(redis, socket_timeout=None)
        self.blobs = blobs if blobs is not None else make_blob_store(settings, redis)
        self._submit = redis.register_script(_SUBMIT)
        self._try_start = redis.register_script(_TRY_START)
        self._cancel = redis.register_script(_CANCEL)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._recover_cursor: dict[str, str | None] = {}  # consumer -> PEL cursor; None once recovered

    async def aclose(self) -> None:
        await self._blocking.aclose()

    # ------------------------------------------------------------------------------------------
    # Setup and capacity

    async def ensure_group(self) -> None:
        """Create the jobs stream and consumer group if missing (id 0: jobs queued before the
        group existed are still delivered)."""
        try:
            await self.redis.xgroup_create(JOBS, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _lag_pending(self) -> tuple[int, int]:
        try:
            groups = await self.redis.xinfo_groups(JOBS)
        except ResponseError:  # no stream yet
            await self.ensure_group()
            groups = await self.redis.xinfo_groups(JOBS)
        group = next((g for g in groups if g["name"] == GROUP), None)
        if group is None:
            await self.ensure_group()
            return await self._lag_pending()
        pending = int(group["pending"])
        lag = group.get("lag")  # Redis >= 7
        if lag is None:
            # Redis 6.2: count entries after the group's last delivered id (entries are tiny: a job id).
            limit = max(self.settings.queue_max + 1, 1024)
            lag = len(await self.redis.xrange(JOBS, min=f"({group['last-delivered-id']}", max="+", count=limit))
        return int(lag), pending

    async def stats(self) -> dict[str, int]:
        """{"lag": undelivered jobs, "pending": delivered not acked, "dlq": dead letters}; also
        sets the queue gauges of this process."""
        lag, pending = await self._lag_pending()
        dlq = int(await self.redis.xlen(DLQ))
        metrics.QUEUE_LENGTH.set(lag)
        metrics.QUEUE_PENDING.set(pending)
        metrics.DLQ_LENGTH.set(dlq)
        return {"lag": lag, "pending": pending, "dlq": dlq}

    # ------------------------------------------------------------------------------------------
    # Gateway side

    async def lookup_idempotent(self, idempotency_key: str, api_key_id: str | None,
                                request_hash: str | None = None) -> str | None:
        """Job id already submitted under this key (by this API key), if any. Lets the gateway skip
        storing blobs for a repeat. With `request_hash`, raises IdempotencyKeyReused when the key
        was first sent with another request."""
        raw = await self.redis.get(idem_key(idempotency_key, api_key_id))
        return _idem_job(raw, request_hash) if raw else None

    async def submit(self, job: JobSpec, idempotency_key: str | None = None,
                     request_hash: str | None = None) -> tuple[str, bool]:
        """Queue a job (its blobs must already be stored). Returns (job_id, created): a repeated
        Idempotency-Key returns the first job's id and created=False; the key is bound to
        `request_hash` (IdempotencyKeyReused when a repeat's hash differs). The key is written in
        the same script that stores the job and expires with it. Raises QueueFull when lag +
        pending >= SR3D_QUEUE_MAX (a repeat of an accepted job is answered even then)."""
        ikey = idem_key(idempotency_key, job.api_key_id) if idempotency_key else None
        if ikey and (existing := await self.redis.get(ikey)):
            return _idem_job(existing, request_hash), False
        lag, pending = await self._lag_pending()
        if lag + pending >= self.settings.queue_max:
            raise QueueFull(lag + pending, self.settings.queue_max, self.settings.retry_after_s)
        # The first event names the job: a client that cannot read response headers (a browser
        # EventSource) learns the id to resume with from the stream itself.
        queued = json.dumps({"job_id": job.job_id, "position": lag})
        idem_value = json.dumps({"job_id": job.job_id, "request": request_hash})
        stored, value = await self._submit(
            keys=[ikey or "", job_key(job.job_id), events_key(job.job_id), JOBS],
            args=[job.model_dump_json(), repr(job.created_at), queued, self.settings.job_max_age_s,
                  self.settings.jobs_maxlen, job.job_id, idem_value])
        if not int(stored):  # lost a race for the key to a request that stored its job first
            return _idem_job(value, request_hash), False
        metrics.JOBS_SUBMITTED.inc()
        return job.job_id, True

    async def get(self, job_id: str) -> JobView | None:
        """The job as GET /v1/spatial-qa/{id} shows it; None if unknown or expired."""
        h = await self.redis.hgetall(job_key(job_id))
        if not h or "status" not in h:
            return None
        spec = _spec_or_none(h.get("spec"))
        return JobView(
            job_id=job_id,
            id=job_id,
            status=JobStatus(h["status"]),
            question=spec.question if spec else None,
            media_kind=spec.media_kind if spec else None,
            answer=h.get("answer"),
            finish_reason=h.get("finish_reason"),
            region_mode=h.get("region_mode"),
            answer_mode=h.get("answer_mode"),
            measurements=_loads(h.get("measurements")),
            error=ErrorInfo(**_loads(h["error"])) if h.get("error") else None,
            usage=Usage(**_loads(h["usage"])) if h.get("usage") else None,
            timings=_loads(h.get("timings")) or {},
            progress=_loads(h.get("progress")) or {},
            created_at=float(h.get("created_at", 0)),
            started_at=float(h["started_at"]) if h.get("started_at") else None,
            finished_at=float(h["finished_at"]) if h.get("finished_at") else None,
            attempts=int(h.get("attempts", 0)),
            cancel_requested=h.get("cancel") == "1",
        )

    async def get_spec(self, job_id: str) -> JobSpec | None:
        """The job's spec; None when unknown, expired or unreadable (see `fail_unreadable`)."""
        return _spec_or_none(await self.redis.hget(job_key(job_id), "spec"))

    async def request_cancel(self, job_id: str) -> bool:
        """Ask for a job to stop. A queued job is cancelled at once (terminal `error` event with
        code "cancelled", status cancelled); a running one gets the cancel flag, which its worker polls
        (cancel_poll_s), and aborts it. False when the job is unknown or already terminal."""
        now = time.time()
        err = {"code": "cancelled", "message": "cancelled by the client"}
        res = int(await self._cancel(
            keys=[job_key(job_id), events_key(job_id)],
            args=[repr(now), json.dumps({**err, "job_id": job_id}), json.dumps(err), self.settings.job_ttl_s],
        ))
        if res <= 0:
            return False
        if res == 2:
            metrics.JOBS_FINISHED.labels(status=JobStatus.cancelled.value).inc()
            await self._delete_blobs(job_id)
        return True

    async def is_cancelled(self, job_id: str) -> bool:
        """True once a cancel was requested (workers poll this between token batches)."""
        return await self.redis.hget(job_key(job_id), "cancel") == "1"

    # ------------------------------------------------------------------------------------------
    # Events

    async def append_event(self, job_id: str, type: str, data: dict[str, Any]) -> str:
        """XADD one event ({type, data JSON}) to the job's events stream; returns its entry id.
        A terminal event always carries `job_id` (like `queued`), whoever writes it."""
        if type in TERMINAL_EVENTS:
            data = {**data, "job_id": job_id}
        return await self.redis.xadd(events_key(job_id), {"type": type, "data": json.dumps(data)})

    async def read_events(self, job_id: str, after: str = "0-0", block_ms: int = 15000, count: int = 100) -> list[Event]:
        """Events after entry id `after` (exclusive), waiting up to block_ms for the first one
        (block_ms <= 0: do not wait). Empty list on timeout."""
        if not ENTRY_ID.match(after):
            raise ValueError(f"invalid event id {after!r}")
        res = await self._blocking.xread({events_key(job_id): after}, count=count,
                                         block=block_ms if block_ms > 0 else None)
        return [_event(eid, fields) for _, entries in (res or []) for eid, fields in entries if fields]

    async def events_range(self, job_id: str) -> list[Event]:
        """All events of a job so far (tests, debugging)."""
        return [_event(eid, f) for eid, f in await self.redis.xrange(events_key(job_id))]

    async def terminal_event(self, job_id: str) -> Event | None:
        """The job's terminal `done`/`error` event if one was written (it is always the last)."""
        last = await self.redis.xrevrange(events_key(job_id), count=1)
        if not last:
            return None
        event = _event(*last[0])
        return event if event.terminal else None

    # ------------------------------------------------------------------------------------------
    # Worker side

    async def claim(self, consumer: str, count: int, block_ms: int, running: Collection[str] = ()) -> list[Delivery]:
        """Up to `count` jobs for `consumer`, in this order:
        1. the first calls after a (re)start return this consumer's own pending entries (jobs it had
           when it died); 2. XAUTOCLAIM entries idle > claim_idle_ms from dead/stalled consumers;
        3. XREADGROUP new entries, blocking up to block_ms only when 1 and 2 gave nothing.
        Entries delivered more than max_deliveries times are dead-lettered (DLQ entry, `error`
        event code "dead_lettered", status failed, acked) and not returned.
        `running`: entry ids this consumer is still working on. When its heartbeat came late they are
        idle too; step 2 then only refreshes them (no delivery-count bump, not returned), instead of
        handing the consumer a second copy of its own job or dead-lettering it while it runs."""
        out: list[Delivery] = []
        if consumer not in self._recover_cursor:  # first claim of this consumer in this process
            await self._adopt_dead_local(consumer)
        cursor = self._recover_cursor.get(consumer, "0")
        if cursor is not None:
            res = await self.redis.xreadgroup(GROUP, consumer, {JOBS: cursor}, count=count)
            entries = [e for _, es in (res or []) for e in es]
            self._recover_cursor[consumer] = entries[-1][0] if len(entries) == count else None
            out += await self._deliveries(entries, reclaimed=False)
        if len(out) < count:
            out += await self._reclaim(consumer, count - len(out), set(running))
        if len(out) < count:
            block = block_ms if (not out and block_ms > 0) else None
            res = await self._blocking.xreadgroup(GROUP, consumer, {JOBS: ">"}, count=count - len(out), block=block)
            out += await self._deliveries([e for _, es in (res or []) for e in es], reclaimed=False, fresh=True)
        return out

    async def _reclaim(self, consumer: str, count: int, running: set[str]) -> list[Delivery]:
        # JUSTID takes the idle entries without counting a delivery; only the ones that are not
        # already running here are then claimed for real (XCLAIM counts the delivery, returns fields).
        res = await self.redis.xautoclaim(JOBS, GROUP, consumer, min_idle_time=self.settings.claim_idle_ms,
                                          start_id="0-0", count=count + len(running), justid=True)
        ids = [i for i in res or [] if i not in running][:count]  # redis-py returns just the ids with JUSTID
        if not ids:
            return []
        entries = [e for e in await self.redis.xclaim(JOBS, GROUP, consumer, 0, ids) if e]
        got = {eid for eid, _ in entries}
        for eid in ids:  # deleted from the stream while pending: nothing left to run
            if eid not in got:
                await self.ack(eid)
        return await self._deliveries(entries, reclaimed=True)

    async def _adopt_dead_local(self, consumer: str) -> None:
        """Move the pending entries of crashed predecessors on this host (consumers named
        `{host}-{pid}` whose pid is gone, see service.consumer_name) to `consumer`, so the own-pending
        step below runs them now instead of after claim_idle_ms; then drop those consumers from the
        group. JUSTID: the own-pending read counts the redelivery, not this move."""
        try:
            consumers = await self.redis.xinfo_consumers(JOBS, GROUP)
        except ResponseError:  # no group yet
            return
        for c in consumers:
            name = c["name"]
            if name == consumer or not is_dead_local_consumer(name):
                continue
            while True:
                pending = await self.redis.xpending_range(JOBS, GROUP, min="-", max="+", count=100, consumername=name)
                if not pending:
                    break
                ids = [p["message_id"] for p in pending]
                await self.redis.xclaim(JOBS, GROUP, consumer, min_idle_time=0, message_ids=ids, justid=True)
                log.warning("adopted pending jobs of a dead local worker", extra={"from": name, "to": consumer, "entries": len(ids)})
            await self.redis.xgroup_delconsumer(JOBS, GROUP, name)

    async def _deliveries(self, entries: list[Any], *, reclaimed: bool, fresh: bool = False) -> list[Delivery]:
        if not entries:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for eid, _ in entries:
                pipe.xpending_range(JOBS, GROUP, min=eid, max=eid, count=1)
            pending = await pipe.execute()
        out: list[Delivery] = []
        for (eid, fields), p in zip(entries, pending):
            job_id = (fields or {}).get("job_id")
            if not job_id:  # entry trimmed or deleted while pending: nothing left to run
                await self.ack(eid)
                continue
            deliveries = int(p[0]["times_delivered"]) if p else 1
            if reclaimed:
                metrics.REDELIVERIES.inc()
            raw = await self.redis.hget(job_key(job_id), "spec")
            if raw is None:  # job hash expired (job_max_age_s): drop it
                log.warning("job hash gone, dropping entry", extra={"job_id": job_id, "entry_id": eid})
                await self.ack(eid)
                continue
            try:
                spec = JobSpec.model_validate_json(raw)
            except ValueError as e:  # pydantic's ValidationError is a ValueError
                # A spec no worker can read (an older gateway stored `Infinity` as null, a hand-edited
                # hash) fails the same way on every delivery: fail it now with a code and ack, so it
                # neither blocks this claim batch nor sits in the pending list until dead-lettered.
                await self.fail_unreadable(eid, job_id, e)
                continue
            if deliveries > self.settings.max_deliveries:
                await self.dead_letter(eid, job_id, deliveries)
                continue
            if fresh:
                metrics.QUEUE_WAIT.observe(max(0.0, time.time() - spec.created_at))
            out.append(Delivery(entry_id=eid, job=spec, deliveries=deliveries))
        return out

    async def fail_unreadable(self, entry_id: str, job_id: str, error: Exception) -> None:
        """Terminal `error` event {code: "invalid_job_spec"}, status failed, ack."""
        if await self.terminal_event(job_id) is None:
            err = {"code": "invalid_job_spec", "message": f"the stored job spec is invalid: {str(error)[:500]}"}
            await self.append_event(job_id, "error", err)
            await self.finish(job_id, JobStatus.failed, error=err)
        await self.ack(entry_id)
        log.warning("job spec unreadable; failed", extra={"job_id": job_id, "entry_id": entry_id})

    async def dead_letter(self, entry_id: str, job_id: str, deliveries: int, reason: str = "too many deliveries") -> None:
        """Move a job to sr3d:dlq: DLQ entry, terminal `error` event (unless one exists), status
        failed, ack. Also usable by a worker for a job it knows it can never run."""
        spec = await self.redis.hget(job_key(job_id), "spec") or ""
        await self.redis.xadd(DLQ, {"job_id": job_id, "entry_id": entry_id, "deliveries": deliveries,
                                    "reason": reason, "at": repr(time.time()), "spec": spec},
                              maxlen=DLQ_MAXLEN, approximate=True)
        if await self.terminal_event(job_id) is None:
            err = {"code": "dead_lettered", "message": f"job gave up after {deliveries} deliveries: {reason}"}
            await self.append_event(job_id, "error", err)
            await self.finish(job_id, JobStatus.failed, error=err)
        await self.ack(entry_id)
        metrics.DEAD_LETTERED.inc()
        log.warning("job dead-lettered", extra={"job_id": job_id, "entry_id": entry_id, "deliveries": deliveries})

    async def heartbeat(self, consumer: str, entry_ids: list[str]) -> list[str]:
        """Reset the idle time of in-flight entries (XCLAIM JUSTID, no delivery-count bump) so a
        long job is not reclaimed; call every heartbeat_s. Returns ids this consumer no longer owns
        (another worker reclaimed them: stop working on those)."""
        if not entry_ids:
            return []
        return list(await self._heartbeat(keys=[JOBS], args=[GROUP, consumer, *entry_ids]))

    async def try_start(self, job_id: str, consumer: str) -> bool:
        """Compare-and-set queued|running -> running (running = taken over from a dead worker).
        False when the job is terminal, unknown, or already has a terminal event (a redelivery
        after the answer was written: its status is repaired here); also False, after writing
        the terminal `cancelled` event, when a cancel was requested meanwhile. On False: ack."""
        term = await self.terminal_event(job_id)
        if term is not None:
            await self._finish_from_event(job_id, term)
            return False
        res = int(await self._try_start(keys=[job_key(job_id)], args=[repr(time.time()), consumer]))
        if res == 2:
            err = {"code": "cancelled", "message": "cancelled by the client"}
            await self.append_event(job_id, "error", err)
            await self.finish(job_id, JobStatus.cancelled, error=err)
        return res == 1

    async def record_progress(self, job_id: str, stage: str, info: dict[str, Any]) -> str:
        """A `progress` event {stage, **info}, and the same stage merged into the job hash so
        GET /v1/spatial-qa/{id} shows it: progress = {"stage": latest, "stages": {stage: info}}.
        Only the worker that owns the job writes it, so read-merge-write does not race."""
        status, raw = await self.redis.hmget(job_key(job_id), ["status", "progress"])
        progress = {"stage": stage, "stages": {**(_loads(raw) or {}).get("stages", {}), stage: info}}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(events_key(job_id), {"type": "progress", "data": json.dumps({"stage": stage, **info})})
            if status is not None:  # never recreate an expired job's hash (it would have no TTL)
                pipe.hset(job_key(job_id), "progress", json.dumps(progress))
            entry_id = (await pipe.execute())[0]
        return entry_id

    async def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        answer: str | None = None,
        error: dict[str, str] | ErrorInfo | None = None,
        usage: dict[str, int] | Usage | None = None,
        timings: dict[str, float] | None = None,
        finish_reason: str | None = None,
        region_mode: str | None = None,
        answer_mode: str | None = None,
        measurements: dict[str, Any] | None = None,
    ) -> None:
        """Record the terminal state for GET (after the terminal event is written), start the TTL
        (job_ttl_s) on the job hash and its events, and delete its blobs. Counts sr3d_jobs_finished_total."""
        if not status.terminal:
            raise ValueError(f"finish() needs a terminal status, not {status}")
        mapping: dict[str, str] = {"status": status.value, "finished_at": repr(time.time())}
        if answer is not None:
            mapping["answer"] = answer
        if finish_reason is not None:
            mapping["finish_reason"] = finish_reason
        if region_mode is not None:
            mapping["region_mode"] = region_mode
        if answer_mode is not None:
            mapping["answer_mode"] = answer_mode
        if measurements is not None:
            mapping["measurements"] = json.dumps(measurements)
        if error is not None:
            mapping["error"] = json.dumps(error.model_dump() if isinstance(error, ErrorInfo) else error)
        if usage is not None:
            mapping["usage"] = json.dumps(usage.model_dump() if isinstance(usage, Usage) else usage)
        if timings is not None:
            mapping["timings"] = json.dumps(timings)
        ttl = self.settings.job_ttl_s
        idem = await self.redis.hget(job_key(job_id), "idem")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job_id), mapping=mapping)
            pipe.expire(job_key(job_id), ttl)
            pipe.expire(events_key(job_id), ttl)
            pipe.expire(scene_key(job_id), min(ttl, self.settings.scene_ttl_s))  # settings.py says why sooner
            if idem:  # the Idempotency-Key expires with the job: a replay never names a vanished job
                pipe.expire(idem, ttl)
            await pipe.execute()
        await self._delete_blobs(job_id)
        metrics.JOBS_FINISHED.labels(status=status.value).inc()

    async def ack(self, entry_id: str) -> None:
        """XACK the jobs-stream entry: only after the terminal event and finish()."""
        await self.redis.xack(JOBS, GROUP, entry_id)

    async def put_scene(self, job_id: str, data: bytes) -> None:
        """Store the job's 3D scene; it expires job_max_age_s from now, and scene_ttl_s (<= job_ttl_s)
        from finish(). Only below the blob store's high-water mark (BlobStoreFull otherwise: the
        pipeline logs it and the job goes on without a scene): a scene is ~1 MB, and 60 of them kept
        for the job TTL filled a 40 MB store past the mark (issue 30 item 1). Scenes stop at half the
        uploads' mark (SCENE_SHARE): they are a convenience for the page, uploads are the service, and
        at the same mark a burst of a few hundred jobs filled the store with scenes until uploads got
        503 upload_store_full (sr3d eval's 382-item run)."""
        await check_redis_room(self.redis, len(data), self.settings.blob_redis_high_water * SCENE_SHARE)
        await self.redis.set(scene_key(job_id), data, ex=self.settings.job_max_age_s)

    async def get_scene(self, job_id: str) -> bytes | None:
        """The job's 3D scene bytes, or None before the point maps exist (or after expiry)."""
        # The shared client decodes replies to str; this one reply stays bytes.
        return await self.redis.execute_command("GET", scene_key(job_id), **{NEVER_DECODE: True})

    # ------------------------------------------------------------------------------------------

    async def _delete_blobs(self, job_id: str) -> None:
        """Uploads are only inputs: once the job is terminal nothing reads them again (a redelivery
        of a terminal job is acked without running), so they go now instead of living job_ttl_s in
        Redis memory and its AOF. An unreadable spec's blobs keep their job_max_age_s safety TTL."""
        spec = await self.get_spec(job_id)
        for key in spec.blob_keys() if spec else []:
            try:
                await self.blobs.delete(key)
            except Exception:  # the job's outcome stands; the safety TTL still removes the blob
                log.warning("could not delete blob", extra={"job_id": job_id, "blob": key}, exc_info=True)

    async def _finish_from_event(self, job_id: str, event: Event) -> None:
        status = await self.redis.hget(job_key(job_id), "status")
        if status is None or JobStatus(status).terminal:
            return
        if event.type == "done":
            await self.finish(job_id, JobStatus.done, answer=event.data.get("answer"), usage=event.data.get("usage"),
                              timings=event.data.get("timings"), finish_reason=event.data.get("finish_reason"))
        else:
            cancelled = event.data.get("code") == "cancelled"
            await self.finish(job_id, JobStatus.cancelled if cancelled else JobStatus.failed,
                              error={"code": str(event.data.get("code")), "message": str(event.data.get("message"))})


def _idem_job(raw: str, request_hash: str | None) -> str:
    """The job id an Idempotency-Key names; IdempotencyKeyReused when the key was bound to another
    request than `request_hash` (None: the caller does not check, as the queue-level tests)."""
    try:
        value = json.loads(raw)
    except ValueError:  # written before keys were bound to a request: a bare job id
        return raw
    if not isinstance(value, dict):
        return raw
    bound = value.get("request")
    if request_hash is not None and bound is not None and bound != request_hash:
        raise IdempotencyKeyReused(str(value["job_id"]))
    return str(value["job_id"])


def _spec_or_none(raw: str | None) -> JobSpec | None:
    if not raw:
        return None
    try:
        return JobSpec.model_validate_json(raw)
    except ValueError:
        return None


def _event(entry_id: str, fields: dict[str, str]) -> Event:
    return Event(id=entry_id, type=fields.get("type", ""), data=_loads(fields.get("data")) or {})
