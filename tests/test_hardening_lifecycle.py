"""Issue 14 items 7 and 11 against real redis-server processes: the upload high-water mark under
`maxmemory` + noeviction, the embedded server dying with (or adopted after) its owner, and a
restarted worker taking over its crashed predecessor's pending jobs without the claim-idle wait."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis as redis_sync

from service.api.errors import status_for
from service.blobs import BlobStoreFull, RedisBlobStore
from service.procs import pid_alive
from service.jobs import Jobs
from service.keys import GROUP, JOBS
from service.redis_conn import redis_client, start_embedded_redis
from service.settings import Settings
from tests.test_queue_redis import spec

pytestmark = pytest.mark.timeout(120)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_uploads_refused_above_high_water_and_queue_writes_still_fit(redis_url: str) -> None:
    async def go() -> None:
        r = redis_client(redis_url)
        store = RedisBlobStore(r, max_bytes=8 << 20, high_water=0.7)
        used = int((await r.info("memory"))["used_memory"])
        await r.config_set("maxmemory", str(used + 4 * (1 << 20)))  # ~4 MB of room in all
        try:
            await store.put("j1/media", b"x" * 100_000)  # fits under 70 %
            with pytest.raises(BlobStoreFull) as e:
                await store.put("j2/media", b"x" * (3 << 20))  # would pass 70 % of maxmemory
            assert status_for(e.value.code) == 503 and e.value.code == "upload_store_full" and "Retry-After" in e.value.headers
            assert not await store.exists("j2/media")
            q = Jobs(r, Settings(redis_url=redis_url))
            await q.ensure_group()
            job = spec()
            await q.submit(job)  # queue writes still have the other 30 %
            await q.append_event(job.job_id, "progress", {"stage": "x"})
            await q.aclose()
        finally:
            await r.config_set("maxmemory", "0")
            await store.aclose()
            await r.aclose()

    asyncio.run(go())


def test_embedded_redis_config_never_evicts(tmp_path: Path) -> None:
    url, handle = start_embedded_redis(tmp_path, maxmemory_mb=64)
    try:
        c = redis_sync.Redis.from_url(url, decode_responses=True)
        assert c.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert c.config_get("maxmemory") == {"maxmemory": str(64 << 20)}
        c.close()
    finally:
        handle.stop()


def test_embedded_redis_socket_for_a_long_data_dir_lives_in_temp_and_goes_with_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unix socket path has ~107 bytes: a deep data dir gets its socket in a short temporary directory,
    which stopping the server removes (one was left behind per `sr3d bench service` run)."""
    scratch = tmp_path / "t"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    url, handle = start_embedded_redis(deep)
    try:
        assert not url.startswith(f"unix://{deep}") and url.startswith(f"unix://{scratch}")
        assert redis_sync.Redis.from_url(url).ping()
    finally:
        handle.stop()
    assert not list(scratch.iterdir())


def test_embedded_redis_dies_with_its_killed_owner(tmp_path: Path) -> None:
    code = ("import sys, time; from service.redis_conn import start_embedded_redis; "
            "url, h = start_embedded_redis(sys.argv[1]); print(h.pid, flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        server_pid = int(owner.stdout.readline())
        assert pid_alive(server_pid)
        owner.send_signal(signal.SIGKILL)  # no atexit, no finally: only the kernel can stop the server now
        owner.wait(10)
        deadline = time.monotonic() + 10
        while pid_alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(server_pid), "redis-server outlived its SIGKILLed owner"
    finally:
        if owner.poll() is None:
            owner.kill()
    # The next start replaces it cleanly (stale url file, dead server) and owns the new one.
    url, handle = start_embedded_redis(tmp_path)
    try:
        assert handle.owner and redis_sync.Redis.from_url(url).ping()
    finally:
        handle.stop()


def test_orphaned_embedded_redis_is_adopted_and_stopped(tmp_path: Path) -> None:
    url, first = start_embedded_redis(tmp_path)
    server_pid = first.pid
    assert server_pid is not None
    # As if the owner died where no parent-death signal exists: its pidfile names a dead process.
    (tmp_path / "redis" / "owner.pid").write_text(str(_dead_pid()))
    url2, adopted = start_embedded_redis(tmp_path)
    assert url2 == url and adopted.owner and adopted.pid == server_pid
    adopted.stop()  # what the adopter's exit (SIGTERM path) does
    assert not pid_alive(server_pid)
    first.stop()  # its process already exited: a no-op
    assert not (tmp_path / "redis" / "url").exists()


def test_restarted_worker_takes_over_dead_local_consumers_pending_at_once(redis_url: str) -> None:
    async def go() -> None:
        r = redis_client(redis_url)
        settings = Settings(redis_url=redis_url, claim_idle_ms=60_000)
        q1 = Jobs(r, settings)
        await q1.ensure_group()
        # A live worker on this host (our parent's pid) must keep its entries through the takeover.
        live_name = f"{socket.gethostname()}-{os.getppid()}"
        live = spec()
        await q1.submit(live)
        [d_live] = await q1.claim(live_name, 4, 10)
        job = spec()
        await q1.submit(job)
        crashed = f"{socket.gethostname()}-{_dead_pid()}"
        [d] = await q1.claim(crashed, 4, 10)
        t0 = time.monotonic()
        q2 = Jobs(r, settings)  # the restarted worker: a new pid, a new name
        me = f"{socket.gethostname()}-{os.getpid()}"
        got = await q2.claim(me, 4, 10)
        assert [g.job.job_id for g in got] == [job.job_id] and got[0].entry_id == d.entry_id
        assert time.monotonic() - t0 < 30  # not claim_idle_ms (60 s); half of it is generous on a loaded box
        names = {c["name"] for c in await r.xinfo_consumers(JOBS, GROUP)}
        assert crashed not in names and me in names
        assert live_name in names
        [p] = await r.xpending_range(JOBS, GROUP, min=d_live.entry_id, max=d_live.entry_id, count=1)
        assert p["consumer"] == live_name
        await q1.aclose()
        await q2.aclose()
        await r.aclose()

    asyncio.run(go())


def test_worker_metrics_bind_loopback_unless_configured() -> None:
    import argparse

    from service.commands import worker as worker_cmd

    parser = argparse.ArgumentParser()
    worker_cmd.add(parser.add_subparsers())
    args = parser.parse_args(["worker"])
    assert args.metrics_host is None and Settings().worker_metrics_host == "127.0.0.1"  # default: loopback
    dockerfile = (Path(__file__).resolve().parents[1] / "Dockerfile").read_text()
    assert dockerfile.count("SR3D_WORKER_METRICS_HOST=0.0.0.0") == 2  # both worker images: scrapeable
