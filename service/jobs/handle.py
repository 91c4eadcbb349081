"""One delivery of one job, as the worker that claimed it drives it: start, progress, tokens, the
cancel flag, the scene, and its end (done / fail / cancelled, each one call that writes the terminal
event and the final state and acks the entry). The worker never touches the queue, the record or
the event log itself.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.jobs.terminal import Finished, cancelled_data, done_data, failed_data
from service.jobs.work_queue import Delivery
from service.schemas import JobSpec

if TYPE_CHECKING:
    from service.jobs.store import Jobs


@dataclass
class JobHandle:
    jobs: Jobs
    delivery: Delivery
    consumer: str
    # Heartbeat membership: False once the job failed for a retryable reason, so its entry goes idle
    # and another worker reclaims it.
    keep_alive: bool = True
    _progress: dict[str, Any] = field(default_factory=dict)

    @property
    def job(self) -> JobSpec:
        return self.delivery.job

    @property
    def job_id(self) -> str:
        return self.delivery.job.job_id

    @property
    def entry_id(self) -> str:
        return self.delivery.entry_id

    async def start(self) -> bool:
        """Compare-and-set queued|running -> running. False (and the entry acked) when the job has
        ended already (a redelivery after the answer: a record left unfinished is repaired from its
        terminal event), is gone, or a cancel came first (it then ends cancelled here)."""
        jobs = self.jobs
        started = await jobs.records.start(self.job_id, self.consumer, time.time())
        if started.started:
            self._progress = started.progress
            return True
        if started.cancel:
            await jobs.terminal.finish(self.job_id, "error", cancelled_data(), entry_id=self.entry_id)
        elif started.ended is not None:
            await jobs.terminal.repair(self.job_id, started.ended, entry_id=self.entry_id)
        else:
            await jobs.queue.ack(self.entry_id)
        return False

    async def progress(self, stage: str, info: dict[str, Any]) -> str:
        """A `progress` event {stage, **info}, and the stage merged into the job's progress for GET:
        {"stage": latest, "stages": {stage: info}}. Only the owner of the job writes it."""
        self._progress = {"stage": stage, "stages": {**self._progress.get("stages", {}), stage: info}}
        return await self.jobs.records.progress(self.job_id, {"stage": stage, **info}, self._progress)

    async def tokens(self, text: str) -> str:
        return await self.jobs.events.append(self.job_id, "token", {"text": text})

    async def restream(self) -> str:
        """Tell clients to drop the tokens so far (a rerun diverged from what an earlier attempt sent)."""
        return await self.jobs.events.append(self.job_id, "progress", {"stage": "restream", "discard": True})

    async def text_streamed(self) -> str:
        """Token text an earlier (crashed) attempt already streamed to clients."""
        if self.delivery.deliveries == 1:
            # A first delivery had no earlier attempt (reading a consumer's own pending entries
            # again counts a delivery, as reclaiming does): nothing to read.
            return ""
        return await self.jobs.events.text_streamed(self.job_id)

    async def cancel_requested(self) -> bool:
        return await self.jobs.records.cancel_requested(self.job_id)

    async def put_scene(self, data: bytes) -> None:
        await self.jobs.scenes.put(self.job_id, data)

    async def done(self, answer: str, **fields: Any) -> Finished:
        """End with the answer (usage, timings, finish_reason, region_mode, answer_mode, measurements)."""
        return await self._end("done", done_data(answer, **fields))

    async def fail(self, code: str, message: str, **fields: Any) -> Finished:
        """End failed: bad input that no retry can fix."""
        return await self._end("error", failed_data(code, message, **fields))

    async def cancelled(self, **fields: Any) -> Finished:
        """End cancelled (the partial answer, usage, timings, finish_reason "abort")."""
        return await self._end("error", cancelled_data(**fields))

    async def _end(self, type_: str, data: dict[str, Any]) -> Finished:
        return await self.jobs.terminal.finish(self.job_id, type_, data, entry_id=self.entry_id)
