"""The work queue: `keys.JOBS`, a stream of {job_id} read by the consumer group `keys.GROUP`
(deploy/ and KEDA read both). Delivery is at-least-once: a worker's entry stays pending until the
terminal writer acks it with the job's outcome; a worker that dies leaves it to be reclaimed after
claim_idle_ms, and one delivered more than max_deliveries times is dead-lettered (`keys.DLQ`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from service import metrics
from service.consumer_name import is_dead_local_consumer
from service.jobs.terminal import Finished, TerminalWriter, failed_data
from service.keys import DLQ, GROUP, JOBS, job_key
from service.schemas import JobSpec
from service.settings import StoreSettings

log = logging.getLogger("sr3d.jobs")

DLQ_MAXLEN = 10000

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


class QueueFull(Exception):
    """SR3D_QUEUE_MAX jobs are queued or running (records.py counts them when a job is created); the API
    answers 429 + Retry-After."""

    def __init__(self, outstanding: int, cap: int, retry_after_s: int) -> None:
        super().__init__(f"queue is full ({outstanding} outstanding jobs, cap {cap})")
        self.outstanding = outstanding
        self.cap = cap
        self.retry_after_s = retry_after_s


@dataclass
class Delivery:
    entry_id: str  # id in the jobs stream; heartbeat and ack name it
    job: JobSpec
    deliveries: int  # 1 on first delivery; >1 after a reclaim or a restart of the same consumer


class WorkQueue:
    def __init__(self, redis: aioredis.Redis, blocking: aioredis.Redis, settings: StoreSettings,
                 terminal: TerminalWriter) -> None:
        """`blocking`: a client without a socket timeout, for XREADGROUP BLOCK."""
        self.redis = redis
        self.settings = settings
        self._blocking = blocking
        self._terminal = terminal
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._recover_cursor: dict[str, str | None] = {}  # consumer -> PEL cursor; None once recovered

    # ---- setup and capacity ----------------------------------------------------------------------
    async def ensure_group(self) -> None:
        """Create the jobs stream and consumer group if missing (id 0: jobs queued before the
        group existed are still delivered)."""
        try:
            await self.redis.xgroup_create(JOBS, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def lag_pending(self) -> tuple[int, int]:
        """(undelivered entries, delivered but not acked), for the queue gauges. On Redis 6.2 the lag
        is counted from the stream (O(entries after the last delivered one)); the submit path does
        not call this (the queue cap counts jobs in records.py)."""
        try:
            groups = await self.redis.xinfo_groups(JOBS)
        except ResponseError:  # no stream yet
            await self.ensure_group()
            groups = await self.redis.xinfo_groups(JOBS)
        group = next((g for g in groups if g["name"] == GROUP), None)
        if group is None:
            await self.ensure_group()
            return await self.lag_pending()
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
        lag, pending = await self.lag_pending()
        dlq = int(await self.redis.xlen(DLQ))
        metrics.QUEUE_LENGTH.set(lag)
        metrics.QUEUE_PENDING.set(pending)
        metrics.DLQ_LENGTH.set(dlq)
        return {"lag": lag, "pending": pending, "dlq": dlq}

    # ---- worker side -----------------------------------------------------------------------------
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
        step runs them now instead of after claim_idle_ms; then drop those consumers from the
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
        # Each entry's delivery count and its job's spec, in one round trip for the batch.
        async with self.redis.pipeline(transaction=False) as pipe:
            for eid, fields in entries:
                pipe.xpending_range(JOBS, GROUP, min=eid, max=eid, count=1)
                pipe.hget(job_key((fields or {}).get("job_id") or "-"), "spec")
            replies = await pipe.execute()
        out: list[Delivery] = []
        for (eid, fields), p, raw in zip(entries, replies[::2], replies[1::2]):
            job_id = (fields or {}).get("job_id")
            if not job_id:  # entry trimmed or deleted while pending: nothing left to run
                await self.ack(eid)
                continue
            deliveries = int(p[0]["times_delivered"]) if p else 1
            if reclaimed:
                metrics.REDELIVERIES.inc()
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
                await self._terminal.finish(job_id, "error", failed_data(
                    "invalid_job_spec", f"the stored job spec is invalid: {str(e)[:500]}"), entry_id=eid)
                log.warning("job spec unreadable; failed", extra={"job_id": job_id, "entry_id": eid})
                continue
            if deliveries > self.settings.max_deliveries:
                await self.dead_letter(eid, job_id, deliveries, raw_spec=raw)
                continue
            if fresh:
                metrics.QUEUE_WAIT.observe(max(0.0, time.time() - spec.created_at))
            out.append(Delivery(entry_id=eid, job=spec, deliveries=deliveries))
        return out

    async def dead_letter(self, entry_id: str, job_id: str, deliveries: int, reason: str = "too many deliveries",
                          raw_spec: str | None = None) -> Finished:
        """Move a job to the DLQ: DLQ entry, then the job ends failed {code: "dead_lettered"} (unless
        it has ended already) and its entry is acked. Also usable for a job that can never run."""
        spec = raw_spec if raw_spec is not None else await self.redis.hget(job_key(job_id), "spec") or ""
        await self.redis.xadd(DLQ, {"job_id": job_id, "entry_id": entry_id, "deliveries": deliveries,
                                    "reason": reason, "at": repr(time.time()), "spec": spec},
                              maxlen=DLQ_MAXLEN, approximate=True)
        ended = await self._terminal.finish(job_id, "error", failed_data(
            "dead_lettered", f"job gave up after {deliveries} deliveries: {reason}"), entry_id=entry_id)
        metrics.DEAD_LETTERED.inc()
        log.warning("job dead-lettered", extra={"job_id": job_id, "entry_id": entry_id, "deliveries": deliveries})
        return ended

    async def heartbeat(self, consumer: str, entry_ids: list[str]) -> list[str]:
        """Reset the idle time of in-flight entries (XCLAIM JUSTID, no delivery-count bump) so a
        long job is not reclaimed; call every heartbeat_s. Returns ids this consumer no longer owns
        (another worker reclaimed them: stop working on those)."""
        if not entry_ids:
            return []
        return list(await self._heartbeat(keys=[JOBS], args=[GROUP, consumer, *entry_ids]))

    async def ack(self, entry_id: str) -> None:
        """XACK an entry whose job is not to be run (ended, gone). A job's outcome acks its own entry."""
        await self.redis.xack(JOBS, GROUP, entry_id)
