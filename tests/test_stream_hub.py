"""StreamHub (issue 14 items 3, 4, 10, 12) against a real redis-server: one blocking connection
fans a job's events out to hundreds of subscribers; resume rules; limits; outage and expiry."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from service.api.errors import status_for
from service.errors import ApiError
from service.jobs import Jobs
from service.keys import events_key, job_key
from service.redis_conn import redis_client, start_embedded_redis
from service.settings import Settings
from service.stream_hub import HubFull, StreamHub, Subscription, parse_event_id
from tests.waiting import await_until, blocked_clients, command_calls

pytestmark = pytest.mark.timeout(120)


def _run(redis_url: str, body: Any, **hub_kw: Any) -> None:
    async def go() -> None:
        r = redis_client(redis_url)
        q = Jobs(r, Settings(redis_url=redis_url))
        hub = StreamHub(r, **hub_kw)
        await hub.start()
        try:
            await body(r, q, hub)
        finally:
            await hub.close()
            await q.aclose()
            await q.blobs.aclose()
            await r.aclose()

    asyncio.run(go())


async def _new_job(r: Any, jid: str) -> None:
    await r.hset(job_key(jid), mapping={"status": "queued", "spec": "{}"})
    await r.xadd(events_key(jid), {"type": "queued", "data": "{}"})


async def _collect(sub: Any) -> list[Any]:
    return [ev async for ev in sub.events()]


async def _caught_up(r: Any, jid: str, *subs: Subscription) -> None:
    """Until every subscriber has read the job's newest event so far (its catch-up from Redis is over)."""
    newest = (await r.xrevrange(events_key(jid), count=1))[0][0]
    await await_until(_async(lambda: all(s.last == newest for s in subs)), f"{len(subs)} subscriber(s) of {jid} at {newest}", 30)


async def _reader_blocked(r: Any) -> None:
    """Until the hub's reader is parked in its blocking XREAD (the only XREAD these tests issue)."""
    await await_until(lambda: blocked_clients(r, "xread"), "the hub's reader blocked in XREAD", 30)


def _async(pred: Any) -> Any:
    async def probe() -> Any:
        return pred()

    return probe


def test_parse_event_id() -> None:
    assert parse_event_id("1718000000000-0") == "1718000000000-0"
    assert parse_event_id(f"{2**64 - 1}-{2**64 - 1}") == f"{2**64 - 1}-{2**64 - 1}"
    for bad in ("18446744073709551616-0", "1-18446744073709551616", "abc", "1-", "-1-0", "1-0-0", "9" * 30 + "-0", ""):
        with pytest.raises(ApiError) as e:
            parse_event_id(bad)
        assert status_for(e.value.code) == 400 and e.value.code == "bad_last_event_id"


def test_300_subscribers_one_job_one_blocking_connection(redis_url: str) -> None:
    async def body(r: Any, q: Jobs, hub: StreamHub) -> None:
        await _new_job(r, "j1")
        clients_before = int((await r.info("clients"))["connected_clients"])
        subs = [hub.subscribe("j1") for _ in range(300)]
        tasks = [asyncio.create_task(_collect(s)) for s in subs]
        # Every client follows the fan-out when the events come: caught up (no Redis call in the probe,
        # the connection count below stays the hub's own), then the reader blocked on the job.
        await _caught_up(r, "j1", *subs)
        await _reader_blocked(r)
        for i in range(20):
            await q.append_event("j1", "token", {"text": f"t{i}"})
        await q.append_event("j1", "done", {"answer": "x"})
        results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        want = ["queued"] + ["token"] * 20 + ["done"]
        assert all([e.type for e in res] == want for res in results)
        assert all([e.data.get("text") for e in res[1:21]] == [f"t{i}" for i in range(20)] for res in results)
        clients_after = int((await r.info("clients"))["connected_clients"])
        # 1 blocking reader + at most max_redis_calls pooled catch-up connections, for 300 clients.
        assert clients_after - clients_before <= 1 + 8, (clients_before, clients_after)
        assert hub.subscribers == 0

    _run(redis_url, body, max_redis_calls=8)


def test_new_job_wakes_the_blocked_reader(redis_url: str) -> None:
    async def body(r: Any, q: Jobs, hub: StreamHub) -> None:
        await _new_job(r, "a")
        first = hub.subscribe("a")
        task_a = asyncio.create_task(_collect(first))
        await _caught_up(r, "a", first)
        await _reader_blocked(r)  # the reader now blocks (block_ms 30 s) on job a only
        await _new_job(r, "b")
        after = (await r.xrange(events_key("b")))[-1][0]
        # From here on the only XRANGE is b's catch-up and the only XREAD the hub's reader's.
        xranges, xreads = await command_calls(r, "xrange"), await command_calls(r, "xread")
        sub = hub.subscribe("b", after=after)
        task = asyncio.create_task(_collect(sub))

        async def woken_and_caught_up() -> bool:
            # b's catch-up ran (and found nothing after `after`), and the reader left its blocked XREAD
            # and blocks again, now on a and b: the event below can only come through the woken reader.
            # Redis 6 counts a blocking XREAD when it starts, Redis 7 when it ends: either way one more.
            return (await command_calls(r, "xrange") > xranges and await command_calls(r, "xread") > xreads
                    and bool(await blocked_clients(r, "xread")))

        await await_until(woken_and_caught_up, "the reader woken by the new job and blocked again", 10)  # < block_ms
        t0 = time.monotonic()
        await q.append_event("b", "done", {"answer": "y"})
        [ev] = await asyncio.wait_for(task, 15)
        assert ev.type == "done" and time.monotonic() - t0 < 15  # not after block_ms (30 s)
        await q.append_event("a", "done", {"answer": "x"})
        assert [e.type for e in await asyncio.wait_for(task_a, 15)] == ["queued", "done"]

    # idle_check_s: no safety-net re-read during the test (it could deliver b's event without the reader).
    _run(redis_url, body, block_ms=30_000, idle_check_s=60)


def test_resume_rules(redis_url: str) -> None:
    async def body(r: Any, q: Jobs, hub: StreamHub) -> None:
        await _new_job(r, "j")
        tok = await q.append_event("j", "token", {"text": "a"})
        assert await hub.check_resume("j", "0-0") == "live" and await hub.check_resume("j", tok) == "live"
        ms, seq = map(int, tok.split("-"))
        with pytest.raises(ApiError) as e:  # after the newest event of an unfinished job
            await hub.check_resume("j", f"{ms}-{seq + 1}")
        assert status_for(e.value.code) == 400
        done = await q.append_event("j", "done", {"answer": "a"})
        assert await hub.check_resume("j", done) == "ended"  # what EventSource sends after `done`
        assert await hub.check_resume("j", f"{2**64 - 1}-0") == "ended"
        events = await asyncio.wait_for(_collect(hub.subscribe("j", after=tok)), 5)
        assert [e.id for e in events] == [done]

    _run(redis_url, body)


def test_limit_is_a_503_before_the_response(redis_url: str) -> None:
    async def body(r: Any, q: Jobs, hub: StreamHub) -> None:
        await _new_job(r, "j")
        subs = [hub.subscribe("j") for _ in range(3)]
        with pytest.raises(HubFull) as e:
            hub.subscribe("j")
        err = e.value.api_error()
        assert status_for(err.code) == 503 and err.headers["Retry-After"] == "7"
        subs[0].close()
        hub.subscribe("j").close()  # room again
        for s in subs:
            s.close()
        assert hub.subscribers == 0

    _run(redis_url, body, max_subscribers=3, retry_after_s=7)


def test_slow_subscriber_overflow_resyncs_from_redis(redis_url: str) -> None:
    async def body(r: Any, q: Jobs, hub: StreamHub) -> None:
        await _new_job(r, "j")
        sub = hub.subscribe("j")
        it = sub.events().__aiter__()
        assert (await it.__anext__()).type == "queued"
        for i in range(50):  # far more than queue_size while the client reads nothing
            await q.append_event("j", "token", {"text": str(i)})
        await q.append_event("j", "done", {"answer": ""})
        # The reader pushed more than queue_size events at the client that reads nothing: it resyncs.
        await await_until(_async(lambda: sub.resync), "the subscriber's queue overflowing (resync)", 30)
        rest = [ev async for ev in it]
        assert [e.data.get("text") for e in rest[:-1]] == [str(i) for i in range(50)] and rest[-1].type == "done"

    _run(redis_url, body, queue_size=4)


def test_expired_job_ends_the_stream(redis_url: str) -> None:
    async def body(r: Any, q: Jobs, hub: StreamHub) -> None:
        await _new_job(r, "gone")
        sub = hub.subscribe("gone")
        task = asyncio.create_task(_collect(sub))
        await _caught_up(r, "gone", sub)  # a live stream, then the job expires under it
        await r.delete(job_key("gone"), events_key("gone"))
        events = await asyncio.wait_for(task, 5)
        assert events[-1].type == "error" and events[-1].data["code"] == "job_expired"

    _run(redis_url, body, idle_check_s=0.3)


def test_redis_outage_ends_streams_with_an_error_event(tmp_path: Path) -> None:
    url, server = start_embedded_redis(tmp_path)

    async def go() -> None:
        r = redis_client(url)
        hub = StreamHub(r, idle_check_s=0.2, outage_grace_s=0.5)
        await hub.start()
        try:
            await _new_job(r, "j")
            sub = hub.subscribe("j")
            task = asyncio.create_task(_collect(sub))
            await _caught_up(r, "j", sub)  # `queued` delivered before Redis goes away
            await asyncio.to_thread(server.stop)
            events = await asyncio.wait_for(task, 20)
            assert events[0].type == "queued"
            assert events[-1].type == "error" and events[-1].data["code"] == "redis_unavailable" and events[-1].id == ""
        finally:
            await hub.close()
            await r.aclose()

    try:
        asyncio.run(go())
    finally:
        server.stop()


def test_events_of_many_jobs_share_reads(redis_url: str) -> None:
    """Each XREAD names every followed job's stream (O(jobs) on both sides) and a blocked one returns on
    the first event anywhere: without spacing, 100 jobs' token events cost one 100-stream read each.
    The hub spaces its reads (min_read_interval_s), so a read carries every event written meanwhile, and
    every subscriber still gets all of its job's events, in order."""
    jobs = [f"m{i}" for i in range(100)]
    n_tokens = 4

    async def body(r: Any, q: Jobs, hub: StreamHub) -> None:
        for j in jobs:
            await _new_job(r, j)
        subs = [hub.subscribe(j) for j in jobs]
        tasks = [asyncio.create_task(_collect(s)) for s in subs]
        for s in subs:
            await _caught_up(r, s.job_id, s)
        await _reader_blocked(r)
        xreads = await command_calls(r, "xread")
        for i in range(n_tokens):
            for j in jobs:  # interleaved across jobs, ~1 ms apart: a live deployment's token stream
                await r.xadd(events_key(j), {"type": "token", "data": f'{{"text": "t{i}"}}'})
                await asyncio.sleep(0.001)
        for j in jobs:
            await q.append_event(j, "done", {"answer": "x"})
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        for res in results:
            assert [e.type for e in res] == ["queued"] + ["token"] * n_tokens + ["done"]
            assert [e.data["text"] for e in res[1:-1]] == [f"t{i}" for i in range(n_tokens)]
        reads = await command_calls(r, "xread") - xreads
        events = len(jobs) * (n_tokens + 1)
        assert reads <= events / 2, f"{reads} XREADs for {events} events of {len(jobs)} jobs"

    _run(redis_url, body)
