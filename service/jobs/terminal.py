"""The one place a job ends: its terminal event and its final state, written together.

Every outcome goes through `TerminalWriter.finish` (or `cancel`, the same script): done; failed (bad
input, an unreadable spec, a dead letter); cancelled (a queued job at the gateway, a running job by
its worker, a job whose cancel came before its start). One Lua script, atomically:

  1. unless the job already has a terminal event or a terminal status (the first outcome wins;
     a second writer changes nothing and is told which event won),
  2. XADD the terminal event (it carries `job_id`),
  3. set the record's final state from that event (`view.final_state`: the same mapping every
     reader of the record relies on), finished_at, and start the job's TTL (job_ttl_s) on the
     record, its events, its scene (scene_ttl_s at most) and its Idempotency-Key,
  4. XACK the job's work-queue entry when the caller holds one (acked only with the outcome stored,
     so a redelivery never reruns a finished job and never finds it unfinished),
  5. take the job out of the queue's outstanding and waiting sets (the queue cap, records.py).
Then the job's uploads are deleted (nothing reads them again) and sr3d_jobs_finished_total counts it.

A missing record (expired past job_max_age_s) gets nothing written: the stream would be recreated
without a TTL and GET already says 404.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis

from service import metrics
from service.blobs import BlobStore
from service.jobs.events import Event, entry_fields, event_from_entry
from service.jobs.view import encode, final_state, spec_or_none
from service.keys import GROUP, JOBS, OUTSTANDING, WAITING, events_key, job_key, scene_key
from service.schemas import TERMINAL_EVENTS
from service.settings import StoreSettings

log = logging.getLogger("sr3d.jobs")

# The one message of a client's cancel, whoever writes it (gateway, or the worker running the job).
CANCELLED = {"code": "cancelled", "message": "cancelled by the client"}

# KEYS: job hash, events, scene, jobs stream ("" when there is no entry to ack), outstanding, waiting.
# ARGV: mode, event type, event data, job_ttl_s, scene ttl, group, entry id, then field/value pairs.
# mode "finish": write the event and the final state unless the job has ended already.
# mode "cancel": a client's cancel. Sets the cancel flag; a queued job then ends here (a running
#   one is ended by its worker, which polls the flag).
# mode "repair": the event exists already (an older version wrote it, then died before the record);
#   write the final state only.
# Returns {outcome, event id, a, b}: "written" (a = the spec, for deleting the uploads), "ended"
# (the terminal event that won: a = its type, b = its data; "" when only the status says so),
# "stale" (like "ended", and the record is not finished yet: repair it from that event), "missing",
# or for cancel "flagged" (running: the worker ends it).
_FINISH = """
local job, events = KEYS[1], KEYS[2]
local mode = ARGV[1]
if KEYS[4] ~= '' then redis.call('XACK', KEYS[4], ARGV[6], ARGV[7]) end
local status = redis.call('HGET', job, 'status')
local finished = status == 'done' or status == 'failed' or status == 'cancelled'
if not status then
  redis.call('ZREM', KEYS[5], job)
  redis.call('ZREM', KEYS[6], job)
  return {'missing', '', '', ''}
end
if mode == 'cancel' and not finished then
  redis.call('HSET', job, 'cancel', '1')
  if status ~= 'queued' then return {'flagged', '', '', ''} end
end
local last = redis.call('XREVRANGE', events, '+', '-', 'COUNT', 1)[1]
local ended = {}
if last then
  local f = {}
  for i = 1, #last[2], 2 do f[last[2][i]] = last[2][i + 1] end
  if f['type'] == 'done' or f['type'] == 'error' then ended = {'ended', last[1], f['type'], f['data'] or ''} end
end
local eid
if mode == 'repair' then
  if finished or not ended[1] then return {'ended', '', '', ''} end
  eid = ended[2]
else
  if ended[1] then
    if not finished then ended[1] = 'stale' end
    return ended
  end
  if finished then return {'ended', '', '', ''} end
  eid = redis.call('XADD', events, '*', 'type', ARGV[2], 'data', ARGV[3])
end
redis.call('HSET', job, 'finished_at', ARGV[8], unpack(ARGV, 9))
local ttl = tonumber(ARGV[4])
redis.call('EXPIRE', job, ttl)
redis.call('EXPIRE', events, ttl)
redis.call('EXPIRE', KEYS[3], math.min(ttl, tonumber(ARGV[5])))
local idem = redis.call('HGET', job, 'idem')
if idem then redis.call('EXPIRE', idem, ttl) end
redis.call('ZREM', KEYS[5], job)
redis.call('ZREM', KEYS[6], job)
return {'written', eid, redis.call('HGET', job, 'spec') or '', ''}
"""

Outcome = Literal["written", "ended", "missing", "flagged"]  # "stale" is repaired into "ended"


@dataclass
class Finished:
    outcome: Outcome
    event: Event | None  # the terminal event written ("written") or the one that won before ("ended")

    @property
    def written(self) -> bool:
        return self.outcome == "written"


def done_data(answer: str, **fields: Any) -> dict[str, Any]:
    """A `done` event: answer, usage, timings, finish_reason, region_mode, answer_mode, measurements."""
    return {"answer": answer, **fields}


def failed_data(code: str, message: str, **fields: Any) -> dict[str, Any]:
    """An `error` event of a failed job (code names the reason: a media code, dead_lettered, ...)."""
    return {"code": code, "message": message, **fields}


def cancelled_data(**fields: Any) -> dict[str, Any]:
    """An `error` event of a cancelled job; a worker adds the partial answer, usage, timings and
    finish_reason "abort"."""
    return {**CANCELLED, **fields}


class TerminalWriter:
    def __init__(self, redis: aioredis.Redis, settings: StoreSettings, blobs: BlobStore) -> None:
        self.redis = redis
        self.settings = settings
        self.blobs = blobs
        self._script = redis.register_script(_FINISH)

    async def finish(self, job_id: str, type_: str, data: dict[str, Any], entry_id: str | None = None) -> Finished:
        """End the job with this terminal event (see the module docstring), and ack `entry_id`
        (its work-queue entry) whatever the outcome: the job has ended either way."""
        if type_ not in TERMINAL_EVENTS:
            raise ValueError(f"{type_!r} is not a terminal event")
        event = Event("", type_, {**data, "job_id": job_id})
        return await self._run("finish", job_id, event, entry_id)

    async def cancel(self, job_id: str) -> Outcome:
        """A client's cancel: "written" (a queued job, cancelled now), "flagged" (running: its worker
        polls the flag and ends it), "ended" (already over) or "missing"."""
        event = Event("", "error", cancelled_data(job_id=job_id))
        return (await self._run("cancel", job_id, event, None)).outcome

    async def repair(self, job_id: str, event: Event, entry_id: str | None = None) -> bool:
        """Give an unfinished record the final state of its existing terminal `event`. True if it did."""
        return (await self._run("repair", job_id, event, entry_id)).written

    async def _run(self, mode: str, job_id: str, event: Event, entry_id: str | None) -> Finished:
        fields = encode(final_state(event))
        ttl = self.settings.job_ttl_s
        args: list[Any] = [mode, *entry_fields(event.type, event.data).values(), ttl, self.settings.scene_ttl_s,
                           GROUP, entry_id or "", repr(time.time())]
        for name, value in fields.items():
            args += [name, value]
        outcome, eid, a, b = await self._script(
            keys=[job_key(job_id), events_key(job_id), scene_key(job_id), JOBS if entry_id else "", OUTSTANDING, WAITING],
            args=args)
        if outcome == "written":
            metrics.JOBS_FINISHED.labels(status=fields["status"]).inc()
            await self._delete_blobs(job_id, a)
            return Finished("written", Event(eid, event.type, event.data))
        if outcome in ("ended", "stale") and eid:
            won = event_from_entry(eid, {"type": a, "data": b})
            if outcome == "stale":
                await self._run("repair", job_id, won, None)
            return Finished("ended", won)
        return Finished(outcome, None)

    async def _delete_blobs(self, job_id: str, raw_spec: str) -> None:
        """Uploads are only inputs: once the job is terminal nothing reads them again (a redelivery
        of a terminal job is acked without running), so they go now instead of living job_ttl_s in
        Redis memory and its AOF. An unreadable spec's blobs keep their job_max_age_s safety TTL."""
        spec = spec_or_none(raw_spec)
        for key in spec.blob_keys() if spec else []:
            try:
                await self.blobs.delete(key)
            except Exception:  # the job's outcome stands; the safety TTL still removes the blob
                log.warning("could not delete blob", extra={"job_id": job_id, "blob": key}, exc_info=True)
