"""What a tenant's request costs the gateway before its quota answers, over real HTTP on loopback
against a real Redis: an upload past a key's quota is refused from its Content-Length before its body
is sent (a chunked one is still counted as it arrives), the exact size is what the key holds after,
and a well-behaved key's requests take few Redis round trips (each is a turn of the event loop, which
another key's traffic lengthens)."""
from __future__ import annotations

import contextlib
import socket
import statistics
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis as redis_sync
from redis.asyncio.connection import AbstractConnection

from service.keys import tenant_bytes_key
from tests.conftest import run_gateway
from tests.test_gateway_api import image_form
from tests.test_openai_api import png_bytes
from tests.test_tenant_quotas import KEY_A, KEY_B, assert_quota, auth, submit, upload

pytestmark = pytest.mark.timeout(120)

BOUNDARY = "bb"


def multipart_head(path: str, key: str, content_length: int, name: str = "file") -> bytes:
    """A request head and the start of a multipart body: what a client has sent before its file's bytes."""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {content_length}\r\n\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + png_bytes()


def answer_before_body(base: str, head: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Send only `head` (the body it announces is MiBs longer) and read the answer: the server must
    answer without waiting for the rest."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = s.recv(65536)
            assert chunk, "connection closed without an answer"
            raw += chunk
        head_part, _, body = raw.partition(b"\r\n\r\n")
        lines = head_part.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        # And then the server closes: kept alive, it would read and discard the MiBs still to come.
        assert headers.get("connection") == "close", headers
        assert s.recv(65536) == b"", "the connection stayed open after an answer to an unread body"
    import json

    return int(lines[0].split()[1]), headers, json.loads(body)


def test_over_quota_uploads_are_refused_before_their_body(redis_url: str) -> None:
    with run_gateway(redis_url, api_keys=[KEY_A, KEY_B], quota_stored_mb=4, quota_jobs=1) as base:
        # /v1/files: 8 MiB announced, 4 MiB quota: 429 while the client has sent only the head.
        status, headers, body = answer_before_body(base, multipart_head("/v1/files", KEY_A, 8 << 20))
        assert status == 429 and body["error"]["code"] == "storage_quota_exceeded" and int(headers["retry-after"]) >= 1
        # A multipart submit: the same for the bytes, and for the key's jobs once it holds its one job.
        status, headers, body = answer_before_body(base, multipart_head("/v1/spatial-qa", KEY_A, 8 << 20, "image"))
        assert status == 429 and body["error"]["code"] == "storage_quota_exceeded" and int(headers["retry-after"]) >= 1
        assert httpx.post(f"{base}/v1/spatial-qa", headers=auth(KEY_A), timeout=30, **image_form()).status_code == 202
        status, headers, body = answer_before_body(base, multipart_head("/v1/spatial-qa", KEY_A, 1 << 20, "image"))
        assert status == 429 and body["error"]["code"] == "jobs_quota_exceeded" and int(headers["retry-after"]) >= 1
        # Nothing was reserved by the refusals: the other key, and this key's files, are unaffected.
        assert upload(base, KEY_B, png_bytes()).status_code == 200
        assert upload(base, KEY_A, png_bytes()).status_code == 200


def test_chunked_uploads_are_still_counted_and_the_exact_size_is_held(redis_url: str) -> None:
    quota = 1 << 20
    with run_gateway(redis_url, api_keys=[KEY_A, KEY_B], quota_stored_mb=1) as base:
        r = redis_sync.Redis.from_url(redis_url, decode_responses=True)
        try:
            # Exactly the quota's bytes: the body's Content-Length is over it by the framing only, so the
            # file's exact size decides (accepted), and the key then holds that size, not the body's.
            data = png_bytes() + b"\0" * (quota - len(png_bytes()))
            ok = upload(base, KEY_A, data)
            assert ok.status_code == 200, ok.text
            bucket = [k for k in r.scan_iter(tenant_bytes_key("*"))]
            assert [int(v) for k in bucket for v in r.hgetall(k).values()] == [quota]
            assert_quota(upload(base, KEY_A, png_bytes()), "storage_quota_exceeded")
            assert httpx.delete(f"{base}/v1/files/{ok.json()['id']}", headers=auth(KEY_A)).status_code == 200
            # Chunked (no Content-Length): refused once the parsed file is over the quota, as before.
            body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nvision\r\n"
                    f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                    "Content-Type: image/png\r\n\r\n").encode() + data + b"\0" + f"\r\n--{BOUNDARY}--\r\n".encode()

            def chunks() -> Iterator[bytes]:
                yield from (body[i:i + 65536] for i in range(0, len(body), 65536))

            chunked = httpx.post(f"{base}/v1/files", headers={**auth(KEY_A), "Content-Type":
                                 f"multipart/form-data; boundary={BOUNDARY}"}, content=chunks(), timeout=30)
            assert "content-length" not in chunked.request.headers
            assert_quota(chunked, "storage_quota_exceeded")
            assert upload(base, KEY_A, data).status_code == 200
        finally:
            r.close()


@contextlib.contextmanager
def counting_round_trips(sent: list[bytes] | None = None) -> Iterator[list[int]]:
    """Counts what the gateway's redis.asyncio clients send (one send = one round trip: a command, a
    pipeline or a script call) in this process; `sent` collects each send's bytes (its head, 256 bytes)."""
    count = [0]
    original = AbstractConnection.send_packed_command

    async def counted(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        count[0] += 1
        if sent is not None:
            parts = [command] if isinstance(command, (bytes, str)) else list(command)
            sent.append(b"".join(p.encode() if isinstance(p, str) else bytes(p) for p in parts)[:256])
        await original(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        yield count
    finally:
        AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


def keyb_round_trips(base: str, rounds: int = 7) -> dict[str, int]:
    """Median Redis round trips per kind of keyB's round in loadtests/tenant_attack.py."""
    seen: dict[str, list[int]] = {}
    with counting_round_trips() as count, httpx.Client(base_url=base, headers=auth(KEY_B), timeout=30) as c:
        def timed(kind: str, call: Any) -> httpx.Response:
            before = count[0]
            r = call()
            seen.setdefault(kind, []).append(count[0] - before)
            assert r.status_code < 300, (kind, r.status_code, r.text)
            return r

        for _ in range(rounds):
            f = timed("upload", lambda: c.post("/v1/files", files={"file": ("a.png", png_bytes(), "image/png")},
                                               data={"purpose": "vision"}))
            timed("models", lambda: c.get("/v1/models"))
            job = timed("submit", lambda: c.post("/v1/spatial-qa", **image_form()))
            timed("cancel", lambda: c.delete(f"/v1/spatial-qa/{job.json()['job_id']}"))
            timed("delete", lambda: c.delete(f"/v1/files/{f.json()['id']}"))
    return {k: int(statistics.median(v)) for k, v in seen.items()}


def test_a_tenants_requests_take_few_redis_round_trips(redis_url: str) -> None:
    with run_gateway(redis_url, api_keys=[KEY_A, KEY_B]) as base:
        trips = keyb_round_trips(base)
    print("redis round trips per keyB request:", trips)
    # Upload: rate limit, one ledger call (check + reserve + prune), the blob's chunk and its rename,
    # the metadata with the exact size. Submit: rate limit, the ledger, 2 per stored blob, the job's
    # script (queue room included), the bind. The blob store's memory check is cached. Cancel: the job's
    # record and spec in one read, the cancel script, its uploads deleted, the new state.
    assert trips["upload"] <= 5 and trips["submit"] <= 6 and trips["cancel"] <= 4, trips


def test_the_upload_stores_memory_check_is_cached_and_never_refuses_on_a_stale_value(redis_url: str) -> None:
    import asyncio

    from service.blobs import BlobStoreFull, MemoryGauge
    from service.redis_conn import redis_client
    from tests.waiting import command_calls

    async def go() -> None:
        r = redis_client(redis_url)
        used = int((await r.info("memory"))["used_memory"])
        await r.config_set("maxmemory", str(used + (8 << 20)))
        try:
            gauge = MemoryGauge(r, high_water=0.7, max_age_s=60)  # no refresh by age in this test
            before = await command_calls(r, "info")
            for _ in range(5):
                await gauge.check(1000)
            # One read for five uploads (the count also holds the INFO that read `before`).
            assert await command_calls(r, "info") - before - 1 == 1
            # Its own puts count at once: a put that passes the mark only with them makes a fresh read.
            room = int(0.7 * (used + (8 << 20))) - used
            before = await command_calls(r, "info")
            await gauge.check(room - 2000)
            assert await command_calls(r, "info") - before - 1 == 1
            with pytest.raises(BlobStoreFull):  # over the mark on a fresh read: refused
                await gauge.check(room + (1 << 20))
            # A stale "full" (room was freed since) is re-read before refusing: accepted.
            gauge._used = used + (8 << 20)
            await gauge.check(1000)
        finally:
            await r.config_set("maxmemory", "0")
            await r.aclose()

    asyncio.run(go())


def test_a_stream_refused_for_its_keys_quota_reads_nothing_from_redis(redis_url: str) -> None:
    """A key at its stream quota that keeps asking for streams costs the gateway a counter check per
    request, not the job's record, spec and resume reads (four round trips each before)."""
    with run_gateway(redis_url, api_keys=[KEY_A, KEY_B], quota_streams=1) as base:
        job = submit(base, KEY_A).json()["job_id"]
        url = f"{base}/v1/spatial-qa/{job}/events"
        with httpx.Client(timeout=30) as client, client.stream("GET", url, headers=auth(KEY_A)) as held:
            assert held.status_code == 200
            sent: list[bytes] = []
            with counting_round_trips(sent):
                for _ in range(5):
                    assert_quota(client.get(url, headers=auth(KEY_A)), "streams_quota_exceeded")
            # The hub's own polling for the held stream (and its connections' set-up) is the gateway's, not
            # the refused requests'.
            names = [c.split(b"\r\n")[2].upper() for c in sent]
            assert [n for n in names if n not in (b"XREAD", b"CLIENT", b"HELLO", b"AUTH", b"SELECT", b"PING")] == []
