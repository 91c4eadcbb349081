"""Work that one tenant's requests made the gateway's event loop do, which every other tenant's
requests waited behind (loadtests/tenant_attack.py found them with its loop probe), over real HTTP on
loopback against a real Redis:
  - a chat body over the JSON value bound is refused without being kept or joined (it was buffered
    whole, joined into one 12 MB bytes object and counted in one piece while holding the GIL);
  - a client that hangs up mid-body ends its request without a logged traceback (each hang-up was an
    "Exception in ASGI application" with a formatted traceback, on the loop);
  - remote media fetches share one TLS context (each built its own, ~20 ms of CPU on the loop)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import tracemalloc
from collections.abc import Iterator

import pytest

from service import media_fetch
from service.media_fetch import FetchPolicy, fetch
from tests.conftest import run_gateway
from tests.test_hardening_remote_media import EncodingServer
from tests.test_http_timeouts import serve
from tests.test_openai_api import IMG_URL, REGION, image_msg, png_bytes
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


def _http(host: str, port: int, head: bytes, body: bytes, timeout: float = 60) -> tuple[int, bytes]:
    """Send a request on a raw socket (no client-side copy of the body) and read the whole answer."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(head)
        s.sendall(body)
        got = b""
        while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < _length(got):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return int(got.split(b" ", 2)[1]), got.split(b"\r\n\r\n", 1)[1]


def _length(got: bytes) -> int:
    for line in got.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 62


def test_a_chat_body_over_the_value_bound_is_refused_without_being_kept(redis_url: str) -> None:
    body = json.dumps({"model": "sr3d", "messages": image_msg(IMG_URL, "<region0>?"), "max_tokens": 4,
                       "regions": [[0, 0, 0, 0]] * 1_000_000}).encode()
    assert len(body) > 12_000_000
    with run_gateway(redis_url, chat_body_max_mb=16) as base:
        host, port = base.removeprefix("http://").split(":")
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        tracemalloc.start()
        try:
            status, answer = _http(host, int(port), head, body)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert 400 <= status < 500 and json.loads(answer)["error"]["code"] == "json_too_complex", answer[:300]
    # Kept and joined, the body alone was 2 x 14 MB of new allocations in this process.
    assert peak < 6 * 2**20, f"{peak / 2**20:.1f} MiB allocated while a {len(body) / 2**20:.0f} MiB body was refused"


def test_a_legal_chat_body_still_reaches_validation(redis_url: str) -> None:
    body = json.dumps({"model": "sr3d", "messages": image_msg(IMG_URL, "<region0>?"), "max_tokens": 4,
                       "regions": REGION, "temperature": "0.5"}).encode()
    with run_gateway(redis_url) as base:
        host, port = base.removeprefix("http://").split(":")
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        status, answer = _http(host, int(port), head, body)
    # Read whole, parsed and validated as before: the loose type is refused by the schema, not the reader.
    assert status == 400 and json.loads(answer)["error"]["param"] == "temperature", answer[:300]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def watching(*names: str) -> Iterator[_Records]:
    """Records of these loggers (attached after the server started: uvicorn's log config resets them)."""
    handler = _Records()
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def test_a_client_hanging_up_mid_upload_logs_no_traceback(redis_url: str) -> None:
    with serve(redis_url) as (host, port), watching("uvicorn.error", "sr3d.http") as log:
        part = (b"--bb\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                b"Content-Type: image/png\r\n\r\n" + png_bytes() + b"\0" * 65536)
        with socket.create_connection((host, port)) as s:
            s.sendall(f"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=bb\r\n"
                      f"Content-Length: {1 << 20}\r\n\r\n".encode() + part)
            wait_until(lambda: _open_bodies(port), "the gateway to be reading the upload body")
        wait_until(lambda: [r for r in log.records if r.levelno >= logging.ERROR
                            or "disconnected before its request body" in r.getMessage()],
                   "the gateway to log the hang-up (one line) or an error")
    errors = [r.getMessage() for r in log.records if r.levelno >= logging.ERROR]
    assert not errors, errors


def _open_bodies(port: int) -> bool:
    """True once the server side of a connection to `port` has read some bytes of the body (its
    receive queue drained below what was sent, seen through /proc/net/tcp: no request needed)."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    local = f"0100007F:{port:04X}"
    return any(r[1] == local and r[3] == "01" and int(r[4].split(":")[1], 16) == 0 for r in rows)


def test_remote_fetches_share_one_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []
    real = ssl.create_default_context

    def counting(*args: object, **kwargs: object) -> ssl.SSLContext:
        made.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ssl, "create_default_context", counting)
    policy = FetchPolicy(frozenset({"127.0.0.1"}), 1 << 20, 10, True)
    with EncodingServer({"/a.png": ({"Content-Type": "image/png"}, png_bytes())}) as srv:
        async def three() -> None:
            for _ in range(3):
                f = await fetch(f"{srv.base}/a.png", policy, frozenset({"png"}), "image/")
                f.close()

        asyncio.run(three())
    # Built at most once per process (earlier tests may have built it already), not once per fetch.
    assert len(made) <= 1, f"{len(made)} TLS contexts for 3 fetches"
    assert media_fetch._tls() is media_fetch._tls()


def test_authenticated_routes_make_no_thread_hop(redis_url: str) -> None:
    """Authentication and the gateway's state are resolved on the event loop: a plain `def` dependency
    runs in the shared thread pool, one hop each per request, which under load queue behind other
    tenants' hops and wait for the GIL."""
    import anyio.to_thread
    import httpx

    hops: list[str] = []
    original = anyio.to_thread.run_sync

    async def counted(func, *args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(getattr(func, "__name__", repr(func)))
        return await original(func, *args, **kwargs)

    with run_gateway(redis_url, api_keys=["key-one"]) as base:
        headers = {"Authorization": "Bearer key-one"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
            job = c.post("/v1/spatial-qa", files={"image": ("a.png", png_bytes(), "image/png")},
                         data={"question": "<region0>?", "regions": json.dumps([REGION])})
            assert job.status_code == 202, job.text
            anyio.to_thread.run_sync = counted  # type: ignore[assignment]
            try:
                for _ in range(3):
                    assert c.get("/v1/models").status_code == 200
                    assert c.get(f"/v1/spatial-qa/{job.json()['job_id']}").status_code == 200
            finally:
                anyio.to_thread.run_sync = original  # type: ignore[assignment]
    assert hops == []
