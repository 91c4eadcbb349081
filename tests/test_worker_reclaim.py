"""A worker whose heartbeat stalls must not reclaim (XAUTOCLAIM) and rerun a job it is still running.

Checked for issue 19: with the heartbeat late (an event loop blocked under load), the job's entry goes
idle past claim_idle_ms and the worker's own next `claim()` handed it back to the same consumer: a
second task ran the same job beside the first (two `started`, the tokens streamed twice, two terminal
events). Another worker reclaiming it is the designed takeover (the loser stops at its next heartbeat);
the same worker reclaiming it is never useful. Real Redis, real pipeline, EchoEngine standing in for a
slow model.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from service.engines.echo import EchoEngine
from service.pipeline import make_pointmap_backend
from service.settings import Settings
from tests.test_worker_loop import Harness, data_dir  # noqa: F401 - fixture
from tests.waiting import await_until

pytestmark = pytest.mark.timeout(240)


def test_a_stalled_heartbeat_does_not_make_a_worker_rerun_its_own_job(data_dir: Path, redis_url: str) -> None:  # noqa: F811
    settings = Settings(redis_url=redis_url, data_dir=data_dir, device="cpu", worker_concurrency=2, claim_idle_ms=200)

    async def go() -> None:
        engine = EchoEngine(token_delay_s=0.1)  # 8 tokens: 0.8 s, four idle windows
        await engine.start()
        backend = await asyncio.to_thread(make_pointmap_backend, settings)
        h = Harness(settings, engine, backend)  # type: ignore[arg-type]
        h.worker.config.heartbeat_s = 1000.0  # the heartbeat never comes in time
        await h.jobs.ensure_group()
        try:
            h.start()
            spec = await h.submit(max_tokens=8)
            await h.wait_terminal(spec.job_id)

            async def every_copy_ended() -> bool:
                # The worker runs each delivery as a task named job-<id> on this loop: once none is left
                # and the entry is acked, no copy of the job is writing and none can start any more.
                alive = [t for t in asyncio.all_tasks() if t.get_name() == f"job-{spec.job_id}" and not t.done()]
                return not alive and await h.pending() == 0

            await await_until(every_copy_ended, f"every run of job {spec.job_id} on the worker finished and acked", 60)
            events: list[Any] = await h.jobs.events.range(spec.job_id)
            starts = [e.data for e in events if e.type == "progress" and e.data.get("stage") == "started"]
            assert len(starts) == 1, starts
            assert [e.type for e in events].count("done") == 1
            assert [e.type for e in events][-1] == "done"
            tokens = "".join(e.data["text"] for e in events if e.type == "token")
            assert tokens == events[-1].data["answer"]
            assert await h.pending_after_ack() == 0
        finally:
            await h.stop()
            await engine.close()
            await h.jobs.aclose()
            await h.redis.aclose()

    asyncio.run(go())
