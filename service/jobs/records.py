"""The job record's life before its end: created with its `queued` event, work-queue entry and
Idempotency-Key (one script), read for GET, started by a worker (compare-and-set), its progress,
its cancel flag. Its end: `service.jobs.terminal`. Fields: `service.jobs.view`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from service.jobs.events import Event, entry_fields, event_from_entry
from service.jobs.view import view_and_spec, view_of
from service.jobs.work_queue import QueueFull
from service.keys import JOBS, OUTSTANDING, WAITING, events_key, idem_key, job_key
from service.schemas import JobSpec, JobView
from service.settings import StoreSettings


class IdempotencyKeyReused(Exception):
    """An Idempotency-Key sent again with a different request: the API answers 422
    `idempotency_key_reused` instead of replaying a job that answers another question."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"this Idempotency-Key was already used for another request (job {job_id}); "
                         "use a new key for a new request")
        self.job_id = job_id


# Store a new job atomically with its Idempotency-Key, so the key never names a job that was not
# stored (a crash between the two would leave a key to nothing), after checking the queue's room in
# the same script (two submits cannot both take the last place). KEYS: idem (or ""), job hash,
# events, jobs stream, outstanding, waiting (service/keys.py). ARGV: spec, created_at, queued-event
# data up to its position, job_max_age_s, jobs maxlen, job_id, idem value, queue_max, now, deadline.
# Returns {0, existing idem value} when the key is taken, {2, outstanding} when the queue is full,
# {1, entry id} when the job was stored. Room = jobs queued or running: the outstanding set, from
# which the terminal writer removes a job when it ends and whose entries lapse with the job's max age
# (a record that expired unfinished), so counting it is O(1) on any Redis version (6.2 has no
# XINFO GROUPS lag; counting the stream read every entry after the group's last delivered id).
# A script that fails half-way does not roll back: the key is written last, so an error leaves no
# key naming a job that was never queued (a retry with the same key then submits afresh).
_CREATE = """
if KEYS[1] ~= '' then
  local existing = redis.call('GET', KEYS[1])
  if existing then return {0, existing} end
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[9])
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', ARGV[9])
local outstanding = redis.call('ZCARD', KEYS[5])
if outstanding >= tonumber(ARGV[8]) then return {2, tostring(outstanding)} end
local position = redis.call('ZCARD', KEYS[6])
redis.call('HSET', KEYS[2], 'spec', ARGV[1], 'status', 'queued', 'created_at', ARGV[2], 'attempts', 0)
if KEYS[1] ~= '' then redis.call('HSET', KEYS[2], 'idem', KEYS[1]) end
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('XADD', KEYS[3], '*', 'type', 'queued', 'data', ARGV[3] .. position .. '}')
redis.call('EXPIRE', KEYS[3], ARGV[4])
local entry = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'job_id', ARGV[6])
redis.call('ZADD', KEYS[5], ARGV[10], KEYS[2])
redis.call('ZADD', KEYS[6], ARGV[10], KEYS[2])
if KEYS[1] ~= '' then redis.call('SET', KEYS[1], ARGV[7], 'EX', ARGV[4]) end
return {1, entry}
"""

# Compare-and-set queued|running -> running (running: taken over from a dead worker); a started job
# no longer waits (KEYS[3]: the waiting set, service/keys.py).
# Returns {"started", progress so far}, {"ended", terminal event id, type, data} when the job's log
# already ends (a redelivery after the answer), {"cancel"} when a cancel came first, {"gone"} when
# the record is missing or finished.
_START = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s or s == 'done' or s == 'failed' or s == 'cancelled' then return {'gone'} end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if last then
  local f = {}
  for i = 1, #last[2], 2 do f[last[2][i]] = last[2][i + 1] end
  if f['type'] == 'done' or f['type'] == 'error' then return {'ended', last[1], f['type'], f['data'] or ''} end
end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return {'cancel'} end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'consumer', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('ZREM', KEYS[3], KEYS[1])
return {'started', redis.call('HGET', KEYS[1], 'progress') or ''}
"""

# A progress event, and the job's progress for GET; never recreates an expired record (it would
# have no TTL). KEYS: job hash, events. ARGV: event data, progress JSON.
_PROGRESS = """
local id = redis.call('XADD', KEYS[2], '*', 'type', 'progress', 'data', ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'progress', ARGV[2]) end
return id
"""


@dataclass
class Start:
    started: bool
    progress: dict[str, Any]  # the record's progress so far (an earlier attempt's stages) when started
    ended: Event | None = None  # the terminal event already written (not started)
    cancel: bool = False  # a cancel came before the start (not started)


class JobRecords:
    def __init__(self, redis: aioredis.Redis, settings: StoreSettings) -> None:
        self.redis = redis
        self.settings = settings
        self._create = redis.register_script(_CREATE)
        self._start = redis.register_script(_START)
        self._progress = redis.register_script(_PROGRESS)

    async def lookup_idempotent(self, idempotency_key: str, api_key_id: str | None,
                                request_hash: str | None = None) -> str | None:
        """Job id already submitted under this key (by this API key), if any. Lets the gateway skip
        storing blobs for a repeat. With `request_hash`, raises IdempotencyKeyReused when the key
        was first sent with another request."""
        raw = await self.redis.get(idem_key(idempotency_key, api_key_id))
        return _idem_job(raw, request_hash) if raw else None

    async def create(self, job: JobSpec, idempotency_key: str | None,
                     request_hash: str | None) -> tuple[str, bool]:
        """Store the job, its `queued` event and its work-queue entry, then its Idempotency-Key (one
        script). (job_id, created); a key already taken returns its job (created False). Raises
        QueueFull when SR3D_QUEUE_MAX jobs are queued or running."""
        ikey = idem_key(idempotency_key, job.api_key_id) if idempotency_key else None
        # The first event names the job: a client that cannot read response headers (a browser
        # EventSource) learns the id to resume with from the stream itself. The script appends the
        # position (jobs not started yet, ahead of this one) and the closing brace.
        queued = json.dumps({"job_id": job.job_id})[:-1] + ', "position": '
        idem_value = json.dumps({"job_id": job.job_id, "request": request_hash})
        now = time.time()
        stored, value = await self._create(
            keys=[ikey or "", job_key(job.job_id), events_key(job.job_id), JOBS, OUTSTANDING, WAITING],
            args=[job.model_dump_json(), repr(job.created_at), queued, self.settings.job_max_age_s,
                  self.settings.jobs_maxlen, job.job_id, idem_value, self.settings.queue_max, repr(now),
                  repr(now + self.settings.job_max_age_s)])
        if int(stored) == 2:
            raise QueueFull(int(value), self.settings.queue_max, self.settings.retry_after_s)
        if not int(stored):  # lost a race for the key to a request that stored its job first
            return _idem_job(value, request_hash), False
        return job.job_id, True

    async def outstanding(self) -> int:
        """Jobs queued or running, as the queue cap counts them."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(OUTSTANDING, "-inf", repr(time.time()))
            pipe.zcard(OUTSTANDING)
            return int((await pipe.execute())[1])

    async def get(self, job_id: str) -> JobView | None:
        """The job as GET /v1/spatial-qa/{id} shows it; None if unknown or expired."""
        return view_of(job_id, await self.redis.hgetall(job_key(job_id)))

    async def get_with_spec(self, job_id: str) -> tuple[JobView | None, JobSpec | None]:
        """The record and the spec from one read (the spec is a field of the record's hash)."""
        return view_and_spec(job_id, await self.redis.hgetall(job_key(job_id)))

    async def start(self, job_id: str, consumer: str, now: float) -> Start:
        res = await self._start(keys=[job_key(job_id), events_key(job_id), WAITING], args=[repr(now), consumer])
        if res[0] == "started":
            return Start(True, json.loads(res[1]) if res[1] else {})
        if res[0] == "ended":
            return Start(False, {}, ended=event_from_entry(res[1], {"type": res[2], "data": res[3]}))
        return Start(False, {}, cancel=res[0] == "cancel")

    async def progress(self, job_id: str, data: dict[str, Any], progress: dict[str, Any]) -> str:
        """A `progress` event with `data` and the record's progress set to `progress`; its entry id."""
        return await self._progress(keys=[job_key(job_id), events_key(job_id)],
                                    args=[entry_fields("progress", data)["data"], json.dumps(progress)])

    async def cancel_requested(self, job_id: str) -> bool:
        """True once a cancel was requested (workers poll this while a job runs)."""
        return await self.redis.hget(job_key(job_id), "cancel") == "1"


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
