"""The job protocol (service/jobs/), blob stores, rate limiter and the embedded Redis, against a real redis-server."""
from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from service import metrics
from service.blobs import BlobNotFound, BlobTooLarge, DirBlobStore, RedisBlobStore
from service.jobs import JobHandle, Jobs, QueueFull
from service.keys import DLQ, GROUP, JOBS, events_key, job_key
from service.ratelimit import RateLimiter
from service.redis_conn import redis_client, start_embedded_redis
from service.schemas import JobSpec, JobStatus
from service.settings import Settings
from tests.waiting import await_until, blocked_clients, wait_idle_past

pytestmark = pytest.mark.timeout(60)


def spec(**kw: Any) -> JobSpec:
    jid = uuid.uuid4().hex
    base = dict(job_id=jid, media_kind="image", media_blob=f"{jid}/media", media_hash="0" * 64,
                media_filename="a.png", question="where?", created_at=time.time())
    return JobSpec(**{**base, **kw})


def run(redis_url: str, body: Callable[[Any, Callable[..., Jobs]], Awaitable[None]], **settings: Any) -> None:
    """Run `body(redis, make_queue)` on a fresh loop; every queue made is closed afterwards."""

    async def main() -> None:
        redis = redis_client(redis_url)
        made: list[Jobs] = []

        def make(**extra: Any) -> Jobs:
            q = Jobs(redis, Settings(redis_url=redis_url, **{**settings, **extra}))
            made.append(q)
            return q

        try:
            await make().ensure_group()
            await body(redis, make)
        finally:
            for q in made:
                await q.aclose()
                await q.blobs.aclose()
            await redis.aclose()

    asyncio.run(main())


def test_submit_claim_finish_ack(redis_url: str) -> None:
    async def body(redis: Any, make: Callable[..., Jobs]) -> None:
        q = make()
        job = spec()
        assert await q.submit(job) == (job.job_id, True)
        assert (await q.stats())["lag"] == 1
        [h] = await q.claim("w1", 4, 50)
        assert h.job == job and h.delivery.deliveries == 1
        assert await q.stats() == {"lag": 0, "pending": 1, "dlq": 0}
        assert await q.claim("w1", 4, 10) == []  # an in-flight entry is not handed out again
        assert await h.start()
        await h.progress("decode", {"seconds": 0.5})
        await h.progress("pointmaps", {"seconds": 0.25, "source": "rgbd"})
        assert (await q.get(job.job_id)).progress == {
            "stage": "pointmaps", "stages": {"decode": {"seconds": 0.5}, "pointmaps": {"seconds": 0.25, "source": "rgbd"}}}
        types = [(e.type, e.data.get("stage")) for e in await q.events.range(job.job_id)]
        assert types == [("queued", None), ("progress", "decode"), ("progress", "pointmaps")]
        assert await q.stats() == {"lag": 0, "pending": 1, "dlq": 0}
        await h.done("x", usage={"prompt_tokens": 1, "completion_tokens": 1})  # event, final state and ack at once
        view = await q.get(job.job_id)
        assert view.status is JobStatus.done and view.answer == "x" and view.attempts == 1
        assert await q.stats() == {"lag": 0, "pending": 0, "dlq": 0}

    run(redis_url, body)


def test_reclaim_heartbeat_and_own_pending_after_restart(redis_url: str) -> None:
    async def body(redis: Any, make: Callable[..., Jobs]) -> None:
        q1 = make()
        a, b = spec(), spec()
        await q1.submit(a)
        await q1.submit(b)
        got = {d.job.job_id: d for d in await q1.claim("w1", 2, 50)}
        assert set(got) == {a.job_id, b.job_id}
        # `b` goes idle past claim_idle_ms (Redis says so, not a sleep); w1 keeps `a` alive with a heartbeat.
        # claim_idle_ms is 1 s so that `a`, idle 0 after its heartbeat, stays below it until w2 claims,
        # however slowly a loaded machine runs the next two commands.
        await wait_idle_past(redis, JOBS, GROUP, got[b.job_id].entry_id, 1000)
        assert await q1.queue.heartbeat("w1", [got[a.job_id].entry_id]) == []
        before = metrics.REDELIVERIES._value.get()
        [stolen] = await make().claim("w2", 4, 10)
        assert stolen.job.job_id == b.job_id and stolen.delivery.deliveries == 2
        assert metrics.REDELIVERIES._value.get() == before + 1
        # w1 learns from its heartbeat that it no longer owns `b`.
        assert await q1.queue.heartbeat("w1", [got[a.job_id].entry_id, got[b.job_id].entry_id]) == [got[b.job_id].entry_id]
        # w1 restarts (new Jobs, same consumer name): its own pending `a` comes back first.
        [again] = await make().claim("w1", 4, 10)
        assert again.job.job_id == a.job_id and again.entry_id == got[a.job_id].entry_id

    run(redis_url, body, claim_idle_ms=1000)


def test_dead_letter_after_max_deliveries(redis_url: str) -> None:
    async def body(redis: Any, make: Callable[..., Jobs]) -> None:
        job = spec()
        await make().submit(job)
        [d1] = await make().claim("w1", 1, 10)  # delivery 1
        await wait_idle_past(redis, JOBS, GROUP, d1.entry_id, 100)  # claim_idle_ms: w2 may take it now
        assert len(await make().claim("w2", 1, 10)) == 1  # delivery 2 (reclaimed)
        await wait_idle_past(redis, JOBS, GROUP, d1.entry_id, 100)
        q = make()
        assert await q.claim("w3", 1, 10) == []  # delivery 3 > max_deliveries=2: dead-lettered
        [(_, fields)] = await redis.xrange(DLQ)
        assert fields["job_id"] == job.job_id and fields["deliveries"] == "3"
        term = await q.events.terminal(job.job_id)
        assert term is not None and term.type == "error" and term.data["code"] == "dead_lettered"
        view = await q.get(job.job_id)
        assert view.status is JobStatus.failed and view.error.code == "dead_lettered"
        assert await q.stats() == {"lag": 0, "pending": 0, "dlq": 1}

    run(redis_url, body, claim_idle_ms=100, max_deliveries=2)


def test_start_is_a_compare_and_set(redis_url: str) -> None:
    async def body(redis: Any, make: Callable[..., Jobs]) -> None:
        q = make()
        job = spec()
        await q.submit(job)
        [d] = await q.claim("w1", 1, 10)
        # Two deliveries racing (e.g. after a reclaim): the status moves queued -> running once per
        # call, but a terminal event written by the first stops every later start.
        wins = await asyncio.gather(*(JobHandle(q, d.delivery, f"w{i}").start() for i in range(8)))
        assert all(wins)  # running -> running = takeover from a dead worker; not terminal yet
        # An older version wrote the terminal event, then died before the record's final state: the
        # redelivery is refused and the record repaired from the event.
        done = {"answer": "a", "usage": {"prompt_tokens": 1, "completion_tokens": 1}, "region_mode": "marks", "job_id": job.job_id}
        await redis.xadd(events_key(job.job_id), {"type": "done", "data": json.dumps(done)})
        assert await JobHandle(q, d.delivery, "w9").start() is False
        view = await q.get(job.job_id)
        assert view.status is JobStatus.done and view.answer == "a" and view.region_mode == "marks"
        assert await JobHandle(q, d.delivery, "w9").start() is False
        assert await q.stats() == {"lag": 0, "pending": 0, "dlq": 0}  # the refused start acked

        queued = spec()
        await q.submit(queued)
        assert await q.request_cancel(queued.job_id) is True
        [dq] = await q.claim("w1", 1, 10)
        assert await dq.start() is False
        assert await q.request_cancel(queued.job_id) is False  # already terminal
        assert await q.request_cancel("0" * 32) is False  # unknown

        running = spec()
        await q.submit(running)
        [dr] = await q.claim("w1", 1, 10)
        assert await dr.start()
        assert await q.request_cancel(running.job_id) is True and await dr.cancel_requested()
        assert (await q.get(running.job_id)).status is JobStatus.running  # the worker finishes it
        # A reclaiming worker sees the flag: the job ends as cancelled with one terminal event.
        assert await JobHandle(q, dr.delivery, "w2").start() is False
        assert (await q.get(running.job_id)).status is JobStatus.cancelled
        events = await q.events.range(running.job_id)
        assert [e.type for e in events] == ["queued", "error"] and events[-1].data["code"] == "cancelled"
        assert await q.stats() == {"lag": 0, "pending": 0, "dlq": 0}

    run(redis_url, body)


def test_ttls_after_terminal_state(redis_url: str) -> None:
    async def body(redis: Any, make: Callable[..., Jobs]) -> None:
        q = make()
        job = spec()
        await q.blobs.put(job.media_blob, b"abc")
        await q.submit(job)
        assert 3000 < await redis.ttl(job_key(job.job_id)) <= 86400 and await redis.ttl(events_key(job.job_id)) > 3000
        await q.terminal.finish(job.job_id, "error", {"code": "media_invalid", "message": "bad"})
        for key in (job_key(job.job_id), events_key(job.job_id)):
            assert 0 < await redis.ttl(key) <= 30, key
        # Blobs are deleted as soon as the job is terminal (issue 14 item 7), not kept job_ttl_s.
        assert not await redis.exists(f"sr3d:blob:{job.media_blob}")
        # Same for a queued job cancelled before any worker saw it.
        queued = spec(regions=[[{"frame": 0, "mask_blob": "m/mask/a"}]])
        for key in queued.blob_keys():
            await q.blobs.put(key, b"abc")
        await q.submit(queued)
        assert await q.request_cancel(queued.job_id)
        assert not any([await redis.exists(f"sr3d:blob:{k}") for k in queued.blob_keys()])

    run(redis_url, body, job_ttl_s=30, job_max_age_s=86400)


def test_idempotency_and_queue_cap(redis_url: str) -> None:
    async def body(redis: Any, make: Callable[..., Jobs]) -> None:
        q = make()
        first = spec(api_key_id="k1")
        assert await q.submit(first, "same") == (first.job_id, True)
        assert await q.submit(spec(api_key_id="k1"), "same") == (first.job_id, False)
        other_tenant = spec(api_key_id="k2")
        assert await q.submit(other_tenant, "same") == (other_tenant.job_id, True)
        with pytest.raises(QueueFull) as e:
            await q.submit(spec())
        assert e.value.retry_after_s == 3 and e.value.cap == 2
        # Claimed (running) jobs still count against the cap; a job that ends frees its place.
        deliveries = await q.claim("w1", 2, 10)
        with pytest.raises(QueueFull):
            await q.submit(spec())
        await q.terminal.finish(deliveries[0].job.job_id, "done", {"answer": "a"}, entry_id=deliveries[0].entry_id)
        assert (await q.submit(spec()))[1] is True

    run(redis_url, body, queue_max=2, retry_after_s=3)


def test_read_events_blocks_then_returns_new(redis_url: str) -> None:
    async def body(redis: Any, make: Callable[..., Jobs]) -> None:
        q = make()
        job = spec()
        await q.submit(job)
        [queued] = await q.events.read(job.job_id)
        waiter = asyncio.create_task(q.events.read(job.job_id, after=queued.id, block_ms=5000))
        # The reader is parked in Redis (a blocked XREAD), not merely not scheduled yet.
        await await_until(lambda: blocked_clients(redis, "xread"), "read_events blocked in XREAD", 10)
        assert not waiter.done()
        eid = await q.append_event(job.job_id, "token", {"text": "hi"})
        [ev] = await asyncio.wait_for(waiter, 5)
        assert (ev.id, ev.type, ev.data) == (eid, "token", {"text": "hi"})
        assert await q.events.read(job.job_id, after=eid, block_ms=0) == []
        with pytest.raises(ValueError):
            await q.events.read(job.job_id, after="nope")

    run(redis_url, body)


# --------------------------------------------------------------------------------------------------
# Blob stores


async def _blob_roundtrip(store: Any, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40  # 10 KiB: several 4 KiB chunks in Redis
    assert await store.put("j1/media", data) == len(data)
    assert await store.get("j1/media") == data
    src = tmp_path / "src.bin"
    src.write_bytes(data[::-1])
    await store.put("j1/mask/m0", src)
    async with store.open_path("j1/mask/m0", suffix=".png") as p:
        assert p.read_bytes() == data[::-1]
    with pytest.raises(BlobTooLarge):
        await store.put("j1/big", b"x" * 20000)
    assert not await store.exists("j1/big")  # nothing half-written is left
    await store.delete("j1/media")
    with pytest.raises(BlobNotFound):
        await store.get("j1/media")
    with pytest.raises(ValueError):
        await store.put("../etc/passwd", b"x")


def test_redis_blob_store(redis_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        redis = redis_client(redis_url)
        store = RedisBlobStore(redis, max_bytes=16000, chunk_bytes=4096)
        try:
            await _blob_roundtrip(store, tmp_path)
            await store.put("j2/media", b"a" * 9000)
            assert await store.redis.llen("sr3d:blob:j2/media") == 3  # stored as chunks, not one big value
            # Many chunks, streamed from a file object: written and read back in order.
            data = bytes(range(256)) * 57  # 14592 bytes: 14 chunks of 1024 and a tail
            store.chunk_bytes = 1024
            assert await store.put("j3/media", io.BytesIO(data)) == len(data)
            assert await store.redis.llen("sr3d:blob:j3/media") == 15
            assert await store.get("j3/media") == data
            async with store.open_path("j3/media") as p:
                assert p.read_bytes() == data
            with pytest.raises(BlobTooLarge):  # the cap holds while streaming, and nothing is left behind
                await store.put("j4/media", io.BytesIO(b"x" * 16001))
            assert not await store.exists("j4/media") and not await store.redis.keys("sr3d:blob:j4*")
        finally:
            await store.aclose()
            await redis.aclose()

    asyncio.run(main())


def test_dir_blob_store_and_sweep(tmp_path: Path) -> None:
    store = DirBlobStore(tmp_path / "blobs", max_bytes=16000, default_ttl_s=1000)
    asyncio.run(_blob_roundtrip(store, tmp_path))
    asyncio.run(store.put("j3/media", b"keep"))
    asyncio.run(store.expire("j1/mask/m0", 0))
    assert store.sweep(now=time.time() + 1) == 1
    assert asyncio.run(store.get("j3/media")) == b"keep"
    assert store.sweep(now=time.time() + 2000) == 1 and not (tmp_path / "blobs" / "j3").exists()


# --------------------------------------------------------------------------------------------------
# Rate limiter and embedded Redis


def test_token_bucket(redis_url: str) -> None:
    async def main() -> None:
        redis = redis_client(redis_url)
        try:
            limiter = RateLimiter(redis, per_minute=60, burst=3)
            results = [await limiter.hit("k") for _ in range(4)]
            assert [r.allowed for r in results] == [True, True, True, False]
            assert results[-1].retry_after_s == 1
            assert (await limiter.hit("other")).allowed
            # A sleep is right here: the refill is a function of elapsed time (Redis TIME), nothing to poll for;
            # sleep() is a lower bound, so at least 1.1 tokens are back however loaded the machine is.
            await asyncio.sleep(1.1)  # 1 token/s refill
            assert (await limiter.hit("k")).allowed
            assert 0 < await redis.ttl("sr3d:rl:k") <= 4
            assert (await RateLimiter(redis, per_minute=0).hit("k")).allowed  # off
        finally:
            await redis.aclose()

    asyncio.run(main())


def test_embedded_redis_is_shared_and_persists_across_restart(tmp_path: Path) -> None:
    import redis as redis_sync

    url, owner = start_embedded_redis(tmp_path)
    try:
        url2, joined = start_embedded_redis(tmp_path)  # e.g. `sr3d worker` next to `sr3d gateway`
        assert url2 == url and owner.owner and not joined.owner
        joined.stop()  # a non-owner never stops the server
        client = redis_sync.Redis.from_url(url)
        client.xadd("sr3d:jobs", {"job_id": "abc"})
        client.close()
    finally:
        owner.stop()
    assert (tmp_path / "redis" / "appendonly.aof").exists()
    url3, again = start_embedded_redis(tmp_path)
    try:
        client = redis_sync.Redis.from_url(url3, decode_responses=True)
        assert client.xrange("sr3d:jobs")[0][1] == {"job_id": "abc"}  # AOF replayed
        client.close()
    finally:
        again.stop()
