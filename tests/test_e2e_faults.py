"""Faults end to end, with every part a separate OS process: redis-server (AOF, fsync always),
`sr3d gateway`, two `sr3d worker`s (tiny real checkpoint). One scenario, in order, because each
process start costs seconds on a 2-core box:

1. no worker running: two jobs are accepted, the third gets 429 + Retry-After (SR3D_QUEUE_MAX=2);
2. Redis is SIGKILLed and restarted from its AOF between submit and pickup;
3. two workers start: both queued jobs complete (nothing lost);
4. a worker is SIGKILLed mid-generation: the job is reclaimed by the other worker process
   (short SR3D_CLAIM_IDLE_MS) and the client, still on its one SSE stream, sees exactly one
   `done` whose answer equals the concatenated tokens.
"""
from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from service.client import SR3DClient, iter_sse
from service.local_stack import Stack
from tests.e2e_helpers import bottle_request, follow, wait_terminal

pytestmark = pytest.mark.timeout(400)

ENV = {
    "SR3D_NUM_FRAMES": "4",
    "SR3D_MAX_TOKENS": "4096",
    "SR3D_DEVICE": "cpu",
    "SR3D_QUEUE_MAX": "2",
    "SR3D_WORKER_CONCURRENCY": "1",
    "SR3D_CLAIM_IDLE_MS": "2500",
    "SR3D_HEARTBEAT_S": "0.5",
    "SR3D_LOG_LEVEL": "WARNING",
}


def test_queue_cap_redis_restart_and_worker_kill(tmp_path: Path) -> None:
    with Stack(tmp_path, dict(ENV)) as st:
        redis_proc = st.start_redis(fsync="always")
        gw, url = st.start_gateway()
        st.wait_ready(url, gw, timeout=120)

        async def phase1() -> list[str]:
            async with SR3DClient(url) as c:
                ids = []
                for _ in range(2):
                    r = await c.submit(bottle_request(max_tokens=4))
                    assert r.status_code == 202, r.text
                    ids.append(r.json()["job_id"])
                r = await c.submit(bottle_request(max_tokens=4))
                assert r.status_code == 429, r.text
                assert r.json()["error"]["code"] and int(r.headers["retry-after"]) >= 1
                return ids

        queued = asyncio.run(phase1())

        # Redis dies hard and comes back from its AOF before any worker saw the jobs.
        st.stop(redis_proc, signal.SIGKILL, timeout=10)
        st.start_redis(fsync="always")

        workers = [st.start_worker() for _ in range(2)]
        for proc, murl in workers:
            st.wait_ready(murl, proc, timeout=240)
            metrics = httpx.get(f"{murl}/metrics", timeout=5).text
            assert "sr3d_worker_ready 1.0" in metrics

        async def phase2() -> None:
            async with SR3DClient(url) as c:
                for jid in queued:
                    view = await wait_terminal(c, jid, timeout=120)
                    assert view["status"] == "done", view
                    events = await follow(c, jid)
                    assert [e.type for e in events].count("done") == 1

        asyncio.run(phase2())

        async def phase3() -> None:
            async with SR3DClient(url) as c:
                # A client retries 503 (Retry-After) with the same Idempotency-Key: one job.
                headers = {"Accept": "text/event-stream", "Idempotency-Key": "e2e-kill-1"}
                data, files = bottle_request(max_tokens=1000, ignore_eos=True).multipart()  # long whatever the weights say
                events = []
                killed_pid = None
                refused_until = asyncio.get_running_loop().time() + 60.0
                while True:  # retried while 503, for up to 60 s (was 20 tries, 4 s: short on a loaded box)
                    async with c._http.stream("POST", "/v1/spatial-qa", data=data, files=files, headers=headers) as r:
                        if r.status_code == 503:
                            body = await r.aread()
                            assert asyncio.get_running_loop().time() < refused_until, f"still 503 after 60 s: {body[:300]!r}"
                            await asyncio.sleep(0.2)  # a client's retry pause, inside a loop bounded above
                            continue
                        assert r.status_code == 200, (r.status_code, await r.aread())
                        async for ev in iter_sse(r):
                            events.append(ev)
                            if killed_pid is None and ev.type == "token":
                                started = [e for e in events if e.type == "progress" and e.data.get("stage") == "started"]
                                consumer = started[-1].data["worker"]
                                victim = next(p for p, _ in workers if consumer.endswith(f"-{p.pid}"))
                                killed_pid = victim.pid
                                st.stop(victim, signal.SIGKILL, timeout=10)
                            if ev.type in ("done", "error"):
                                break
                    break
                assert killed_pid is not None, "job finished before a token arrived"
                types = [e.type for e in events]
                assert types.count("done") == 1 and types[-1] == "done", types
                starts = [e.data for e in events if e.type == "progress" and e.data.get("stage") == "started"]
                assert len(starts) == 2 and not starts[1]["worker"].endswith(f"-{killed_pid}"), starts
                assert starts[1]["attempt"] >= 2
                answer = events[-1].data["answer"]
                tokens = "".join(e.data["text"] for e in events if e.type == "token")
                assert answer == tokens
                assert events[-1].data["usage"]["completion_tokens"] >= 1

        asyncio.run(phase3())
