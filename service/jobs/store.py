"""`Jobs`: a job's life in Redis, for the gateway (submit, read, cancel) and the workers (claim
handles). The parts, each its own module: the record (records.py, view.py), the event log
(events.py), the work queue (work_queue.py), the one terminal writer (terminal.py), the scene
(scenes.py) and the worker's per-job handle (handle.py).
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

import redis.asyncio as aioredis

from service import metrics
from service.blobs import BlobStore, make_blob_store
from service.jobs.events import Event, EventLog, EventType
from service.jobs.handle import JobHandle
from service.jobs.records import JobRecords
from service.jobs.scenes import SceneStore
from service.jobs.terminal import Finished, TerminalWriter
from service.jobs.work_queue import WorkQueue
from service.redis_conn import clone_client
from service.schemas import TERMINAL_EVENTS, JobSpec, JobView
from service.settings import StoreSettings


class Jobs:
    def __init__(self, redis: aioredis.Redis, settings: StoreSettings, blobs: BlobStore | None = None) -> None:
        """`redis`: redis.asyncio.Redis(decode_responses=True). Blocking reads (XREAD/XREADGROUP
        BLOCK) go through a second pool without a socket timeout. `blobs` defaults to the store
        the settings name (a finished job's uploads are deleted)."""
        self.redis = redis
        self.settings = settings
        self._blocking = clone_client(redis, socket_timeout=None)
        self.blobs = blobs if blobs is not None else make_blob_store(settings, redis)
        self.records = JobRecords(redis, settings)
        self.events = EventLog(redis, self._blocking)
        self.terminal = TerminalWriter(redis, settings, self.blobs)
        self.queue = WorkQueue(redis, self._blocking, settings, self.terminal)
        self.scenes = SceneStore(redis, settings)

    async def aclose(self) -> None:
        await self._blocking.aclose()

    async def ensure_group(self) -> None:
        await self.queue.ensure_group()

    async def stats(self) -> dict[str, int]:
        return await self.queue.stats()

    # ---- gateway ---------------------------------------------------------------------------------
    async def lookup_idempotent(self, idempotency_key: str, api_key_id: str | None,
                                request_hash: str | None = None) -> str | None:
        return await self.records.lookup_idempotent(idempotency_key, api_key_id, request_hash)

    async def submit(self, job: JobSpec, idempotency_key: str | None = None,
                     request_hash: str | None = None) -> tuple[str, bool]:
        """Queue a job (its blobs must already be stored). Returns (job_id, created): a repeated
        Idempotency-Key returns the first job's id and created=False; the key is bound to
        `request_hash` (IdempotencyKeyReused when a repeat's hash differs). The key is written in
        the same script that stores the job and expires with it. Raises QueueFull when
        SR3D_QUEUE_MAX jobs are queued or running, checked in that script (a repeat of an accepted
        job is answered even then)."""
        if idempotency_key and (known := await self.records.lookup_idempotent(
                idempotency_key, job.api_key_id, request_hash)):
            return known, False
        job_id, created = await self.records.create(job, idempotency_key, request_hash)
        if created:
            metrics.JOBS_SUBMITTED.inc()
        return job_id, created

    async def get(self, job_id: str) -> JobView | None:
        """The job as GET /v1/spatial-qa/{id} shows it; None if unknown or expired."""
        return await self.records.get(job_id)

    async def get_with_spec(self, job_id: str) -> tuple[JobView | None, JobSpec | None]:
        """`get` and the job's spec (None when unreadable) in one Redis round trip."""
        return await self.records.get_with_spec(job_id)

    async def view_at(self, job_id: str, terminal: Event) -> JobView | None:
        """The job once `terminal` (its terminal event, e.g. from `?wait=true`) is known: what GET
        shows. The record is finished in the same script as the event; one left unfinished by an
        older version is repaired from the event first, so both answers agree."""
        view = await self.records.get(job_id)
        if view is not None and not view.status.terminal:
            await self.terminal.repair(job_id, terminal)
            view = await self.records.get(job_id)
        return view

    async def request_cancel(self, job_id: str) -> bool:
        """Ask for a job to stop. A queued job is cancelled at once (terminal `error` event with
        code "cancelled", status cancelled); a running one gets the cancel flag, which its worker
        polls (cancel_poll_s), and ends it. False when the job is unknown or already terminal."""
        return await self.terminal.cancel(job_id) in ("written", "flagged")

    # ---- events (the worker's handle writes them in production; tests and tools use these) --------
    async def append_event(self, job_id: str, type_: EventType, data: dict[str, Any]) -> str:
        """Append an event; a terminal one goes through the terminal writer (it also finishes the
        record, and a job that has ended already keeps its first outcome). Returns the entry id
        ("" when a terminal event was refused)."""
        if type_ in TERMINAL_EVENTS:
            done: Finished = await self.terminal.finish(job_id, type_, data)
            return done.event.id if done.written and done.event else ""
        return await self.events.append(job_id, type_, data)

    # ---- workers ---------------------------------------------------------------------------------
    async def claim(self, consumer: str, count: int, block_ms: int, running: Collection[str] = ()) -> list[JobHandle]:
        """Up to `count` jobs for `consumer` (WorkQueue.claim), each as the handle its run goes through."""
        return [JobHandle(self, d, consumer) for d in await self.queue.claim(consumer, count, block_ms, running)]
