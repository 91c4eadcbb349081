"""The gateway under stream load and faults: 200 concurrent SSE clients, a slow reader, and a gateway
process killed while a client streams (the client resumes with Last-Event-ID on a new process).

One stack for the module (redis-server, `sr3d gateway` on a fixed port, one `sr3d worker`); the
gateway restart runs last. Verdicts are the client's view: exactly one terminal event per stream,
ids strictly increasing, no duplicates, `done.answer` == the concatenated tokens.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.client import JobResult, SR3DClient, SSEEvent, stream_id_key
from service.local_stack import Stack, free_port
from tests.faultkit import FAULT_ENV, mixed_requests, verdict, wait_until

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    env = {**FAULT_ENV, "SR3D_DATA_DIR": str(tmp_path_factory.getbasetemp() / "sr3d-faults-data")}
    with Stack(tmp_path_factory.mktemp("faults-gateway"), env) as st:
        st.start_redis()
        port = free_port()
        gw, url = st.start_gateway(port)
        w, w_url = st.start_worker()
        st.wait_ready(url, gw)
        st.wait_ready(w_url, w)
        state = {"st": st, "gw": gw, "url": url, "port": port, "worker": w}
        yield state
    assert st.leaked == [], [p.log_tail(1500) for p in st.procs]


def _sse_clients_gauge(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    m = re.search(r"^sr3d_sse_clients(?:\{[^}]*\})? ([0-9.e+-]+)$", text, re.M)
    assert m, "sr3d_sse_clients not exported"
    return float(m.group(1))


def test_200_concurrent_sse_clients_on_four_jobs(stack: dict[str, Any]) -> None:
    url = stack["url"]
    per_job = 50

    async def scenario() -> dict[str, list[JobResult]]:
        async with SR3DClient(url, max_connections=4 * per_job + 16) as c:
            ids = []
            for req in mixed_requests(4, max_tokens=24, seed=4):
                r = await c.submit(req)
                assert r.status_code == 202, r.text
                ids.append(r.json()["job_id"])
            # all 200 streams open at once, most before their job has even started
            streams = [c.follow(jid, resume_timeout_s=120) for jid in ids for _ in range(per_job)]
            results = await asyncio.gather(*streams)
            return {jid: [res for res in results if res.job_id == jid] for jid in ids}

    by_job = asyncio.run(scenario())
    for jid, results in by_job.items():
        assert len(results) == per_job
        assert verdict(results) == [], jid
        ref = [(e.id, e.type) for e in results[0].events]
        assert all([(e.id, e.type) for e in r.events] == ref for r in results), f"clients of {jid} saw different streams"
    # every stream closed server-side once its terminal event went out
    wait_until(lambda: _sse_clients_gauge(url) == 0, 30, "sr3d_sse_clients back to 0")


def test_slow_reader_gets_everything_and_does_not_hold_back_the_worker(stack: dict[str, Any]) -> None:
    url = stack["url"]
    wall_at_terminal: dict[str, float] = {}

    def on_event(res: JobResult, ev: SSEEvent) -> None:
        if ev.type in ("done", "error"):
            wall_at_terminal["t"] = time.time()

    async def scenario() -> tuple[JobResult, JobResult, dict[str, Any]]:
        async with SR3DClient(url) as c:
            slow_req, fast_req = mixed_requests(2, max_tokens=48, seed=5)
            slow_req.options["max_tokens"] = 400  # ~30 coalesced token events: the reader falls seconds behind
            slow = asyncio.create_task(c.run(slow_req, read_delay=0.5, on_event=on_event))
            fast = await c.run(fast_req)
            slow_res = await slow
            view = (await c.get(str(slow_res.job_id))).json()
            return slow_res, fast, view

    slow, fast, view = asyncio.run(scenario())
    assert verdict([slow, fast]) == []
    assert fast.terminal is not None and slow.terminal is not None
    assert fast.terminal.t < slow.terminal.t  # the fast client was not queued behind the slow one
    assert view["status"] == "done" and view["finished_at"] < wall_at_terminal["t"]  # worker finished first


def test_gateway_killed_mid_stream_client_resumes_on_new_process(stack: dict[str, Any]) -> None:
    st: Stack = stack["st"]
    old = stack["gw"]
    killed: dict[str, Any] = {}

    def on_event(res: JobResult, ev: SSEEvent) -> None:
        if "at" not in killed and ev.type == "token":  # 400 fixed-length tokens: most of them still to come
            os.kill(old.pid, signal.SIGKILL)
            killed["at"] = ev.id

    async def scenario() -> JobResult:
        async with SR3DClient(stack["url"]) as c:
            req = mixed_requests(1, max_tokens=400, seed=6)[0]
            task = asyncio.create_task(c.run(req, on_event=on_event, resume_timeout_s=120))
            while "at" not in killed and not task.done():
                await asyncio.sleep(0.02)
            if "at" not in killed:  # say how the job ended instead of failing on the gateway still being alive
                r = await task
                raise AssertionError(f"the job ended before a token was streamed: HTTP {r.http_status} "
                                     f"{r.error_body or r.client_error}; last events {[(e.type, e.data) for e in r.events[-3:]]}")
            assert await asyncio.to_thread(old.wait, 10) is not None, f"the SIGKILLed gateway {old.pid} did not exit in 10 s"
            new, url = st.start_gateway(stack["port"])  # same address, new process
            killed["new"] = new
            await asyncio.to_thread(st.wait_ready, url, new)
            return await task

    res = asyncio.run(scenario())
    assert verdict([res]) == []
    assert res.resumes >= 1
    after = [e for e in res.events if e.id and stream_id_key(e.id) > stream_id_key(killed["at"])]
    assert after and after[-1].type == "done"  # the remainder came from the new gateway process
    assert after[-1].data["usage"]["completion_tokens"] == 400  # ignore_eos held: nothing cut short
    assert len(res.started_by) == 1  # the worker never noticed: no rerun
    assert killed["new"].alive() and stack["worker"].alive()
