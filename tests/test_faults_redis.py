"""Redis dies hard (SIGKILL) and restarts from its AOF while jobs are queued and clients are streaming.

Load angle on top of tests/test_e2e_faults.py: several clients hold SSE streams open across the
restart; each must resume on its own (Last-Event-ID) and see exactly one `done`, nothing lost or
duplicated; the gateway survives the outage (it becomes ready again without a restart) and no
process is left behind.
"""
from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from service.client import JobResult, SR3DClient, SSEEvent
from service.local_stack import Stack, queue_state
from tests.faultkit import FAULT_ENV, mixed_requests, verdict, wait_until
from tests.waiting import await_until

pytestmark = pytest.mark.timeout(300)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_redis_restart_with_jobs_queued_and_clients_streaming(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    env = {**FAULT_ENV, "SR3D_DATA_DIR": str(tmp_path_factory.getbasetemp() / "sr3d-faults-data")}
    with Stack(tmp_path, env) as st:
        redis = st.start_redis(fsync="always")  # acknowledged writes survive SIGKILL
        gw, url = st.start_gateway()
        st.wait_ready(url, gw)
        queued: dict[int, JobResult] = {}

        def on_event(res: JobResult, ev: SSEEvent) -> None:
            if ev.type == "queued":
                queued[id(res)] = res

        async def scenario() -> tuple[list[JobResult], bool]:
            async with SR3DClient(url) as c:
                reqs = mixed_requests(6, max_tokens=12, seed=3)
                tasks = [asyncio.create_task(c.run(r, on_event=on_event, resume_timeout_s=180)) for r in reqs]
                async def all_streaming() -> bool:
                    ended = [t.result() for t in tasks if t.done()]
                    assert not ended, f"a client ended before every job was queued: {ended}"
                    return len(queued) == len(reqs)

                await await_until(all_streaming, "every job accepted and its client streaming", 120)
                await asyncio.to_thread(st.stop, redis, signal.SIGKILL, 10)
                readyz_down = not await asyncio.to_thread(_ready, url)
                await asyncio.to_thread(st.start_redis, "always")
                await asyncio.to_thread(wait_until, lambda: _ready(url), 60, "gateway ready after the Redis restart")
                w, w_url = st.start_worker()
                await asyncio.to_thread(st.wait_ready, w_url, w)
                return list(await asyncio.gather(*tasks)), readyz_down

        results, readyz_down = asyncio.run(scenario())
        assert readyz_down, "/readyz stayed 200 while Redis was down"
        assert verdict(results) == []
        assert all(len(r.started_by) == 1 for r in results)  # queued jobs survived; each ran once
        wait_until(lambda: queue_state(st.redis_url)["pending"] == 0, 30, "acks")
        assert queue_state(st.redis_url) == {"lag": 0, "pending": 0, "dlq": 0}
        assert gw.alive(), gw.log_tail()
    assert st.leaked == [], [p.log_tail(1500) for p in st.procs]
