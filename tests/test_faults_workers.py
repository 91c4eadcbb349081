"""Worker faults under load, judged from the clients' side (every part a real OS process).

* SIGKILL one of two workers while several jobs stream: every accepted job still reaches exactly one
  `done`, no event is lost or duplicated on any client's stream, the killed worker's jobs are
  redelivered to the other worker, the queue ends with nothing pending or dead-lettered, and the
  killed worker leaves no orphan processes behind.
* SIGTERM a worker mid-job: it drains (the in-flight jobs finish on it, no redelivery), stops claiming
  (the rest stay queued), exits 0; a second worker finishes the rest.
(tests/test_e2e_faults.py covers the single-job basics; these are about many jobs and leaks.)
"""
from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.client import JobResult, SR3DClient, SSEEvent
from service.consumer_name import consumer_is
from service.local_stack import Stack, pids_alive, queue_state
from tests.faultkit import FAULT_ENV, mixed_requests, verdict, wait_until
from tests.waiting import await_until

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # one data dir for the session: the tiny checkpoint is built once (flock-protected)
    return {**FAULT_ENV, "SR3D_DATA_DIR": str(tmp_path_factory.getbasetemp() / "sr3d-faults-data")}


def test_sigkill_one_of_two_workers_under_load(tmp_path: Path, env: dict[str, str]) -> None:
    with Stack(tmp_path, env) as st:
        st.start_redis()
        gw, url = st.start_gateway()
        (a, a_url), (b, b_url) = st.start_worker(), st.start_worker()
        st.wait_ready(url, gw)
        st.wait_ready(a_url, a)
        st.wait_ready(b_url, b)
        killed: dict[str, Any] = {}

        def on_event(res: JobResult, ev: SSEEvent) -> None:
            starts = res.started_by
            if "pid" not in killed and ev.type == "token" and starts and consumer_is(starts[-1], a.pid):
                killed["children"] = a.descendants()
                killed["job"] = res.job_id
                os.kill(a.pid, signal.SIGKILL)
                killed["pid"] = a.pid

        async def load() -> list[JobResult]:
            async with SR3DClient(url) as c:
                reqs = mixed_requests(8, max_tokens=400, seed=1)  # long answers: the kill lands mid-generation
                return list(await asyncio.gather(*(c.run(r, on_event=on_event, resume_timeout_s=180) for r in reqs)))

        results = asyncio.run(load())
        assert "pid" in killed, "worker A never streamed a token (it got no job?)"
        assert verdict(results) == []
        redelivered = [r for r in results if len(r.started_by) > 1]
        assert any(r.job_id == killed["job"] for r in redelivered)
        for r in redelivered:
            starts = r.started_by
            assert consumer_is(starts[0], a.pid) and consumer_is(starts[-1], b.pid), starts
        for r in results:  # jobs never touched by A ran once
            if not any(consumer_is(s, a.pid) for s in r.started_by):
                assert len(r.started_by) == 1
        wait_until(lambda: queue_state(st.redis_url)["pending"] == 0, 30, "acks of all jobs")
        assert queue_state(st.redis_url) == {"lag": 0, "pending": 0, "dlq": 0}
        # the killed worker's helpers (decode process pool, ...) must not outlive it
        wait_until(lambda: not pids_alive(killed["children"]), 15, f"orphans of the killed worker {killed['children']}")
        assert b.alive() and gw.alive()
    assert st.leaked == [], [p.log_tail(1500) for p in st.procs]


def test_sigterm_worker_drains_and_exits_zero(tmp_path: Path, env: dict[str, str]) -> None:
    with Stack(tmp_path, env) as st:
        st.start_redis()
        gw, url = st.start_gateway()
        a, a_url = st.start_worker()
        st.wait_ready(url, gw)
        st.wait_ready(a_url, a)
        term: dict[str, Any] = {}
        clients: dict[int, JobResult] = {}

        def on_event(res: JobResult, ev: SSEEvent) -> None:
            clients[id(res)] = res
            if "sent" not in term and ev.type == "token":
                os.kill(a.pid, signal.SIGTERM)
                term["sent"] = True

        async def scenario() -> list[JobResult]:
            async with SR3DClient(url) as c:
                reqs = mixed_requests(6, max_tokens=64, seed=2)
                tasks = [asyncio.create_task(c.run(r, on_event=on_event, resume_timeout_s=240)) for r in reqs]
                async def sigterm_sent_and_all_streaming() -> bool:
                    ended = [t.result() for t in tasks if t.done()]
                    assert not ended, f"a client ended before the SIGTERM went out to a streaming worker: {ended}"
                    return "sent" in term and len(clients) == len(reqs)

                await await_until(sigterm_sent_and_all_streaming, "a token (then SIGTERM) and every client streaming", 240)
                term["rc"] = await asyncio.to_thread(a.wait, 120)
                # A is gone: every job is either finished by A (drained) or still queued (never claimed)
                term["after_a"] = {r.job_id: (await c.get(str(r.job_id))).json()["status"] for r in clients.values()}
                b, b_url = st.start_worker()
                term["b"] = b
                await asyncio.to_thread(st.wait_ready, b_url, b)
                return list(await asyncio.gather(*tasks))

        results = asyncio.run(scenario())
        assert term["rc"] == 0, a.log_tail()
        statuses = sorted(term["after_a"].values())
        assert set(statuses) <= {"done", "queued"}, statuses
        assert "done" in statuses and "queued" in statuses, statuses  # drained some, left the rest queued
        assert verdict(results) == []
        for r in results:
            starts = r.started_by
            assert len(starts) == 1, starts  # a drain never causes a redelivery
            drained = term["after_a"][r.job_id] == "done"
            assert consumer_is(starts[0], a.pid if drained else term["b"].pid), (starts, drained)
        assert queue_state(st.redis_url)["dlq"] == 0
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    assert st.leaked == [], [p.log_tail(1500) for p in st.procs]
