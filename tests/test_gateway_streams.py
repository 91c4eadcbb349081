"""Issue 14 on the gateway: every event stream reads through the process's one StreamHub.

Real Redis, real HTTP on loopback; the load and outage tests run `sr3d gateway` as its own process.
Covered: 300 concurrent SSE clients on one job (no 5xx, every stream reaches `done`, a handful of
Redis connections), the stream limit (503 too_many_streams + Retry-After, counted once per stream),
Last-Event-ID at/after the terminal event (204: a browser EventSource stops), out-of-range and
never-sent ids (400 before any byte of a stream), an SSE stream cut by a Redis outage (an `error`
event, then the end), cancel-on-disconnect, and a job whose stored spec is unreadable (no API key
sees it).
"""
from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync

from service.keys import job_key
from service.local_stack import Stack
from service.redis_conn import POOL_MAX
from tests.conftest import run_gateway
from tests.sse_clients import drive
from tests.test_gateway_api import image_form, jobs_in_queue, post
from tests.test_gateway_sse import Driver, answer, read_all, sse_events
from tests.test_openai_api import IMG_URL, REGION, image_msg

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def env(redis_url: str) -> Iterator[tuple[str, Driver]]:
    driver = Driver(redis_url)
    with run_gateway(redis_url, wait_timeout_s=1.0, sse_max_clients=2, sse_ping_s=1) as base:
        yield base, driver
    driver.close()


def sse_gauge(base: str) -> float:
    m = re.search(r"^sr3d_sse_clients ([0-9.e+-]+)$", httpx.get(f"{base}/metrics", timeout=10).text, re.M)
    assert m, "sr3d_sse_clients not exported"
    return float(m.group(1))


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_300_concurrent_sse_clients_on_one_job_through_the_gateway_process(tmp_path: Path) -> None:
    """Before the hub, 300 clients on one job got 100 OK, 129 x 503 and 71 cut streams."""
    with Stack(tmp_path, {"SR3D_LOG_LEVEL": "WARNING"}) as st:
        st.start_redis()
        gw, url = st.start_gateway()
        st.wait_ready(url, gw, timeout=60)
        res = asyncio.run(drive(int(url.rsplit(":", 1)[1]), st.redis_url, gw.pid, n=300, ramp=100, hold_s=1.0))
        assert gw.alive(), gw.log_tail()
        assert res["http_status"] == {"200": 300}, res
        assert res["got_done"] == 300 and res["errors"] == {}, res
        # Not one per stream: the hub's one blocking reader + the bounded pool for short commands
        # (requests arriving 100 at a time) + this script's own.
        assert res["redis_connected_clients_max"] <= POOL_MAX + 6, res
        wait_for(lambda: sse_gauge(url) == 0, 20, "sr3d_sse_clients back to 0")
    assert st.leaked == []


def test_stream_limit_is_a_503_with_retry_after_and_each_stream_counts_once(env: tuple[str, Driver], redis_url: str) -> None:
    base, driver = env
    job_id = post(base, **image_form()).json()["job_id"]
    url = f"{base}/v1/spatial-qa/{job_id}/events"
    before = sse_gauge(base)
    with httpx.stream("GET", url, timeout=30) as a, httpx.stream("POST", f"{base}/v1/spatial-qa?stream=true",
                                                                 timeout=30, **image_form()) as b:
        assert a.status_code == b.status_code == 200
        # Keep the readers: an abandoned httpx line iterator closes its response (a disconnect).
        ra, rb = sse_events(a), sse_events(b)
        assert next(ra)["event"] == next(rb)["event"] == "queued"
        assert sse_gauge(base) == before + 2
        queued_before = jobs_in_queue(redis_url)
        chat = {"model": "sr3d", "messages": image_msg(IMG_URL), "regions": REGION}
        for refused in (httpx.get(url, timeout=10),
                        httpx.post(f"{base}/v1/spatial-qa?wait=true", timeout=10, **image_form()),
                        httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=10),
                        httpx.post(f"{base}/v1/chat/completions", json={**chat, "stream": True}, timeout=10)):
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "too_many_streams" and refused.headers["retry-after"] == "5"
        assert jobs_in_queue(redis_url) == queued_before  # refused before anything was queued
    wait_for(lambda: sse_gauge(base) == before, 10, "both streams given back")
    answer(driver, job_id, ["ok"])
    assert read_all(url)[-1]["event"] == "done"  # a slot is free again


def test_resume_at_or_after_the_terminal_event_ends_at_once(redis_url: str) -> None:
    driver = Driver(redis_url)
    # Pings and the hub's idle check every 30 s: an answer that waited for either would take 30 s, so
    # "at once" is checked with a 10 s bound per request, which a loaded machine does not break.
    try:
        with run_gateway(redis_url, wait_timeout_s=1.0, sse_ping_s=30) as base:
            job_id = post(base, **image_form()).json()["job_id"]
            answer(driver, job_id, ["a", "b"])
            url = f"{base}/v1/spatial-qa/{job_id}/events"
            full = read_all(url)
            done_id = full[-1]["id"]
            assert full[-1]["event"] == "done"
            ms, seq = map(int, done_id.split("-"))
            for kw in ({"headers": {"Last-Event-ID": done_id}},  # what a browser EventSource sends
                       {"params": {"last_event_id": done_id}},
                       {"headers": {"Last-Event-ID": f"{ms}-{seq + 1}"}},
                       {"headers": {"Last-Event-ID": f"{ms + 10**9}-0"}}):
                t0 = time.monotonic()
                r = httpx.get(url, timeout=10, **kw)  # type: ignore[arg-type]
                took = time.monotonic() - t0
                assert r.status_code == 204 and r.content == b"", (kw, r.status_code, r.text)
                assert took < 10, f"204 after {took:.1f} s for {kw}"
            # One before the end still streams exactly the terminal event.
            assert [e["event"] for e in read_all(url, headers={"Last-Event-ID": full[-2]["id"]})] == ["done"]
    finally:
        driver.close()


@pytest.mark.parametrize("bad", ["18446744073709551616-0", "0-18446744073709551616", "99999999999999999999999-0",
                                 "1-2-3", "-1-0", "1718000000000", "1-0x", "１-0"])
def test_out_of_range_or_malformed_last_event_id_is_a_400(env: tuple[str, Driver], bad: str) -> None:
    base, driver = env
    job_id = post(base, **image_form()).json()["job_id"]
    answer(driver, job_id, ["ok"])  # a finished job: a wrongly accepted id would end in a 200 or 204, not hang
    for kw in ({"headers": {"Last-Event-ID": bad.encode()}}, {"params": {"last_event_id": bad}}):
        r = httpx.get(f"{base}/v1/spatial-qa/{job_id}/events", timeout=10, **kw)  # type: ignore[arg-type]
        assert r.status_code == 400, (bad, kw, r.status_code, r.text)
        assert r.json()["error"]["code"] == "bad_last_event_id"
    assert read_all(f"{base}/v1/spatial-qa/{job_id}/events")[-1]["event"] == "done"  # and the gateway carries on


def test_an_id_this_live_job_never_sent_is_a_400(env: tuple[str, Driver]) -> None:
    base, _ = env
    job_id = post(base, **image_form()).json()["job_id"]
    r = httpx.get(f"{base}/v1/spatial-qa/{job_id}/events", headers={"Last-Event-ID": "18446744073709551615-0"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_last_event_id"


def test_cancel_on_disconnect_still_cancels_through_the_hub(env: tuple[str, Driver]) -> None:
    base, _ = env
    form = image_form(options='{"cancel_on_disconnect": true}')
    with httpx.stream("POST", f"{base}/v1/spatial-qa", headers={"Accept": "text/event-stream"}, timeout=30, **form) as r:
        job_id = r.headers["location"].rsplit("/", 1)[1]
        assert next(sse_events(r))["event"] == "queued"
    wait_for(lambda: httpx.get(f"{base}/v1/spatial-qa/{job_id}").json()["status"] == "cancelled", 10,
             "the job was cancelled when its only client went away")


def test_a_job_with_an_unreadable_spec_is_visible_to_no_key(redis_url: str) -> None:
    with run_gateway(redis_url, api_keys=["k1", "k2"]) as base:
        job_id = post(base, headers={"X-API-Key": "k1"}, **image_form()).json()["job_id"]
        assert httpx.get(f"{base}/v1/spatial-qa/{job_id}", headers={"X-API-Key": "k1"}).status_code == 200
        r = redis_sync.Redis.from_url(redis_url)
        try:
            r.hset(job_key(job_id), "spec", '{"job_id": "broken')  # e.g. written by an older version
        finally:
            r.close()
        for key in ("k1", "k2"):
            h = {"X-API-Key": key}
            for resp in (httpx.get(f"{base}/v1/spatial-qa/{job_id}", headers=h),
                         httpx.get(f"{base}/v1/spatial-qa/{job_id}/events", headers=h, timeout=10),
                         httpx.delete(f"{base}/v1/spatial-qa/{job_id}", headers=h)):
                assert resp.status_code == 404 and resp.json()["error"]["code"] == "job_not_found", (key, resp.text)


def test_a_stream_cut_by_a_redis_outage_ends_with_an_error_event(tmp_path: Path) -> None:
    with Stack(tmp_path, {"SR3D_LOG_LEVEL": "WARNING", "SR3D_SSE_PING_S": "0.5"}) as st:
        redis = st.start_redis()
        gw, url = st.start_gateway()
        st.wait_ready(url, gw, timeout=60)
        job_id = post(url, **image_form()).json()["job_id"]
        events: list[dict[str, Any]] = []
        with httpx.stream("GET", f"{url}/v1/spatial-qa/{job_id}/events", timeout=30) as r:
            for ev in sse_events(r):
                events.append(ev)
                if ev["event"] == "queued":
                    t0 = time.monotonic()
                    st.stop(redis, signal.SIGKILL)
        assert [e["event"] for e in events] == ["queued", "error"], events
        assert events[-1]["data"]["code"] == "redis_unavailable" and "id" not in events[-1]
        # within a few ping intervals (0.5 s, outage grace 1 s), not the job TTL; 20 s: a loaded box
        assert time.monotonic() - t0 < 20
        assert gw.alive(), gw.log_tail()
