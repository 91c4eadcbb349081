"""Issue 30 items 1, 6 and 10 over real HTTP on loopback against a real Redis, with two API keys: a key
over one of its quotas (stored files, bytes held, jobs in flight, streams open, bodies being sent)
gets 429 with its own code and Retry-After, and the other key is unaffected. Scenes are written only
below the store's high-water mark and expire sooner than their job."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import httpx
import pytest
import redis as redis_sync

from service.blobs import BlobStoreFull
from service.keys import job_key, scene_key
from service.jobs import Jobs
from service.redis_conn import redis_client
from service.settings import Settings
from tests.conftest import run_gateway
from tests.test_gateway_api import image_form
from tests.test_openai_api import png_bytes

pytestmark = pytest.mark.timeout(120)

KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(base: str, key: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{base}/v1/files", headers=auth(key), files={"file": ("a.png", data, "image/png")},
                      data={"purpose": "vision"}, timeout=30)


def submit(base: str, key: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/spatial-qa", headers=auth(key), timeout=30, **image_form())


def assert_quota(r: httpx.Response, code: str) -> None:
    assert r.status_code == 429, (r.status_code, r.text)
    assert r.json()["error"]["code"] == code, r.text
    assert int(r.headers["Retry-After"]) >= 1


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_stored_files_count_and_bytes_are_per_key(redis_url: str) -> None:
    mib = png_bytes() + b"\0" * (600 * 1024)  # ~0.6 MiB
    with run_gateway(redis_url, api_keys=[KEY_A, KEY_B], quota_files=3, quota_stored_mb=1.5) as base:
        ids = [upload(base, KEY_A, png_bytes()).json()["id"] for _ in range(3)]
        assert_quota(upload(base, KEY_A, png_bytes()), "files_quota_exceeded")
        assert upload(base, KEY_B, png_bytes()).status_code == 200  # the other key is unaffected
        # Deleting a file gives its slot back.
        assert httpx.delete(f"{base}/v1/files/{ids[0]}", headers=auth(KEY_A)).status_code == 200
        assert upload(base, KEY_A, mib).status_code == 200
        # Bytes: two 0.6 MiB files fit in 1.5 MiB, a third does not (while keyB stores two of its own).
        assert httpx.delete(f"{base}/v1/files/{ids[1]}", headers=auth(KEY_A)).status_code == 200
        assert upload(base, KEY_A, mib).status_code == 200
        assert httpx.delete(f"{base}/v1/files/{ids[2]}", headers=auth(KEY_A)).status_code == 200
        assert_quota(upload(base, KEY_A, mib), "storage_quota_exceeded")
        for _ in range(2):
            assert upload(base, KEY_B, mib).status_code == 200


def test_jobs_in_flight_are_per_key_and_free_again_when_terminal(redis_url: str) -> None:
    with run_gateway(redis_url, api_keys=[KEY_A, KEY_B], quota_jobs=2) as base:
        jobs = []
        for _ in range(2):
            r = submit(base, KEY_A)
            assert r.status_code == 202, r.text
            jobs.append(r.json()["job_id"])
        assert_quota(submit(base, KEY_A), "jobs_quota_exceeded")
        assert submit(base, KEY_B).status_code == 202
        # A cancelled (terminal) job no longer counts.
        assert httpx.delete(f"{base}/v1/spatial-qa/{jobs[0]}", headers=auth(KEY_A)).status_code == 202
        assert submit(base, KEY_A).status_code == 202
        # The OpenAI route shares the quota (its answer would be waited for: refused before queueing).
        chat = {"model": "sr3d", "max_tokens": 4, "regions": [{"frame": 0, "box": [1, 1, 8, 8]}],
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "<region0>?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                        + __import__("base64").b64encode(png_bytes()).decode()}}]}]}
        r = httpx.post(f"{base}/v1/chat/completions", json=chat, headers=auth(KEY_A), timeout=30)
        assert_quota(r, "jobs_quota_exceeded")
        assert r.json()["error"]["type"] == "rate_limit_error"


def test_streams_are_per_key(redis_url: str) -> None:
    with run_gateway(redis_url, api_keys=[KEY_A, KEY_B], quota_streams=3, sse_max_clients=5) as base:
        job_a = submit(base, KEY_A).json()["job_id"]
        job_b = submit(base, KEY_B).json()["job_id"]
        with ExitStack() as stack:
            client = stack.enter_context(httpx.Client(timeout=30))
            opened = []
            for _ in range(3):
                r = stack.enter_context(client.stream("GET", f"{base}/v1/spatial-qa/{job_a}/events", headers=auth(KEY_A)))
                assert r.status_code == 200
                opened.append(r)
            r = client.get(f"{base}/v1/spatial-qa/{job_a}/events", headers=auth(KEY_A))
            assert_quota(r, "streams_quota_exceeded")
            # keyB: its stream and its streamed submit still open (the gateway holds 5 in all)
            rb = stack.enter_context(client.stream("GET", f"{base}/v1/spatial-qa/{job_b}/events", headers=auth(KEY_B)))
            assert rb.status_code == 200
            rs = stack.enter_context(client.stream("POST", f"{base}/v1/spatial-qa?stream=true", headers=auth(KEY_B),
                                                   **image_form()))
            assert rs.status_code == 200
            opened[0].close()

            def room_again() -> bool:  # the closed stream's slot comes back once the gateway sees it gone
                with client.stream("GET", f"{base}/v1/spatial-qa/{job_a}/events", headers=auth(KEY_A)) as r:
                    return r.status_code == 200
            wait_for(room_again)


def _stalled_upload(host: str, port: int, key: str) -> socket.socket:
    """A POST /v1/files that announces 8 MiB and sends 64 KiB of it, then stalls."""
    s = socket.create_connection((host, port))
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nvision\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    s.sendall((f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {8 * 1024 * 1024}\r\n\r\n").encode()
              + head + png_bytes() + b"\0" * 65536)
    return s


def test_concurrent_uploads_are_per_key(redis_url: str) -> None:
    with run_gateway(redis_url, api_keys=[KEY_A, KEY_B], quota_uploads=2, http_body_idle_s=60) as base:
        host, port = base.removeprefix("http://").split(":")
        stalled = [_stalled_upload(host, int(port), KEY_A) for _ in range(2)]
        try:
            def refused_now() -> bool:
                return upload(base, KEY_A, png_bytes()).status_code == 429
            wait_for(refused_now)  # once both stalled bodies are being received
            assert_quota(upload(base, KEY_A, png_bytes()), "uploads_quota_exceeded")
            assert upload(base, KEY_B, png_bytes()).status_code == 200
        finally:
            for s in stalled:
                s.close()
        wait_for(lambda: upload(base, KEY_A, png_bytes()).status_code == 200)


@contextlib.contextmanager
def redis_maxmemory(redis_url: str, size: Callable[[int], int]) -> Iterator[None]:
    """Redis's maxmemory set to size(used memory now) for the block, restored afterwards."""
    client = redis_sync.Redis.from_url(redis_url)
    old = client.config_get("maxmemory")["maxmemory"]
    client.config_set("maxmemory", str(size(int(client.info("memory")["used_memory"]))))
    try:
        yield
    finally:
        client.config_set("maxmemory", old)
        client.close()


def test_scene_respects_the_high_water_mark_and_expires_before_the_job(redis_url: str) -> None:
    async def run() -> None:
        redis = redis_client(redis_url)
        tight = Jobs(redis, Settings(redis_url=redis_url, blob_redis_high_water=1e-6))
        roomy = Jobs(redis, Settings(redis_url=redis_url, job_ttl_s=3600, scene_ttl_s=600))
        try:
            with pytest.raises(BlobStoreFull):
                await tight.scenes.put("a" * 32, b"\0" * 4096)
            assert not await redis.exists(scene_key("a" * 32))
            job = "b" * 32
            await roomy.scenes.put(job, b"\0" * 4096)
            await redis.hset(job_key(job), mapping={"status": "running"})
            await roomy.terminal.finish(job, "done", {"answer": "x"})
            assert 0 < await redis.ttl(scene_key(job)) <= 600 < await redis.ttl(job_key(job))
        finally:
            await redis.aclose()

    with redis_maxmemory(redis_url, lambda used: 1 << 30):
        asyncio.run(run())


def test_quotas_are_off_without_api_keys(redis_url: str) -> None:
    """Keys off: no tenants to keep apart, and one client address is no tenant (behind a load balancer
    every request has the balancer's), so one busy client is bound by the deployment-wide limits only."""
    with run_gateway(redis_url, quota_uploads=1, quota_jobs=1, quota_streams=1, http_body_idle_s=60) as base:
        host, port = base.removeprefix("http://").split(":")
        stalled = [_stalled_upload(host, int(port), "none") for _ in range(2)]
        try:
            # Two bodies are being received from this address: a third upload still goes through.
            assert upload(base, "none", png_bytes()).status_code == 200
            jobs = [submit(base, "none") for _ in range(3)]
            assert [r.status_code for r in jobs] == [202] * 3, [r.text for r in jobs]
            with httpx.Client(timeout=30) as client, ExitStack() as stack:
                for r in jobs[:2]:
                    stream = stack.enter_context(client.stream("GET", f"{base}/v1/spatial-qa/{r.json()['job_id']}/events"))
                    assert stream.status_code == 200
        finally:
            for s in stalled:
                s.close()


def test_scenes_leave_the_uploads_room(redis_url: str) -> None:
    """Between half the high-water mark and the mark: a scene is refused, an upload still fits."""
    from service.blobs import check_redis_room

    async def run() -> None:
        redis = redis_client(redis_url)
        jobs = Jobs(redis, Settings(redis_url=redis_url, blob_redis_high_water=0.7))
        try:
            with pytest.raises(BlobStoreFull):
                await jobs.scenes.put("c" * 32, b"\0" * 4096)
            assert not await redis.exists(scene_key("c" * 32))
            await check_redis_room(redis, 4096, 0.7)  # an upload of the same size still fits
        finally:
            await redis.aclose()

    with redis_maxmemory(redis_url, lambda used: int(used / 0.5)):  # the store is half full
        asyncio.run(run())


def test_a_keys_bodies_are_paced_and_the_other_keys_are_not(redis_url: str) -> None:
    """SR3D_QUOTA_UPLOAD_MIB_S: past one second's burst, a key's request bodies are read at its rate
    (no refusal: the client's TCP is pushed back); meanwhile another key's upload goes through at once."""
    import threading

    mib = 1 << 20
    with run_gateway(redis_url, api_keys=[KEY_A, KEY_B], quota_upload_mib_s=1) as base:
        payload = png_bytes() + b"\0" * mib  # one MiB a file: the first fills the burst
        first_done = threading.Event()
        a_codes: list[int] = []

        def key_a() -> None:
            for k in range(5):
                a_codes.append(upload(base, KEY_A, payload).status_code)
                first_done.set()

        started = time.monotonic()
        t = threading.Thread(target=key_a)
        t.start()
        assert first_done.wait(30)
        r = upload(base, KEY_B, payload)
        assert r.status_code == 200, r.text
        assert t.is_alive(), "keyB's upload should have finished while keyA's bodies were still being paced"
        t.join(60)
        # 5 MiB at 1 MiB/s with a 1 MiB burst: at least 4 s, whatever the machine's speed.
        assert time.monotonic() - started >= 3.9
        assert a_codes == [200] * 5
