"""Issue 30 item 4 over real HTTP: an allowlisted loopback media server that answers compressed
bodies. The gateway asks for `identity`, refuses any Content-Encoding (a gzip bomb is never
decompressed) and counts its cap on the bytes that cross the wire."""
from __future__ import annotations

import gzip
import http.server
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import run_gateway
from tests.test_gateway_api import jobs_in_queue
from tests.test_openai_api import REGION, client_for, image_msg, png_bytes, refused

pytestmark = pytest.mark.timeout(120)

KEY = "sk-test-one"  # client_for's default key


class EncodingServer:
    """Loopback HTTP server: fixed (headers, body) per path; records each request's Accept-Encoding."""

    def __init__(self, routes: dict[str, tuple[dict[str, str], bytes]]) -> None:
        self.accept_encodings: list[str | None] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # no Content-Length needed: the body ends with the connection

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.accept_encodings.append(self.headers.get("Accept-Encoding"))
                headers, body = routes[self.path]
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> EncodingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def encoded_server() -> Iterator[EncodingServer]:
    small = png_bytes()
    bomb = gzip.compress(gzip.compress(small + b"\0" * (64 * 1024 * 1024)))  # ~66 KB on the wire, 64 MiB decoded
    routes = {
        "/bomb.png": ({"Content-Type": "image/png", "Content-Encoding": "gzip, gzip"}, bomb),
        "/small-gzip.png": ({"Content-Type": "image/png", "Content-Encoding": "gzip"}, gzip.compress(small)),
        "/identity.png": ({"Content-Type": "image/png", "Content-Encoding": "identity"}, small),
        # no Content-Length, 1 MiB on the wire under a 0.5 MiB cap: refused while streaming
        "/long.png": ({"Content-Type": "image/png"}, small + b"\0" * (1024 * 1024)),
    }
    with EncodingServer(routes) as srv:
        yield srv


def test_content_encoding_is_refused_and_the_cap_is_on_the_wire(redis_url: str, encoded_server: EncodingServer) -> None:
    def ask(base: str, path: str) -> openai.APIStatusError:
        return refused(lambda: client_for(base).chat.completions.create(
            model="sr3d", messages=image_msg(f"{encoded_server.base}{path}"), extra_body={"regions": REGION}))

    with run_gateway(redis_url, api_keys=[KEY], max_upload_mb=0.5, remote_media_domains=["127.0.0.1"],
                     allow_private_fetch=True, wait_timeout_s=1) as base:
        for path in ("/bomb.png", "/small-gzip.png"):
            err = ask(base, path)
            assert (err.status_code, err.code) == (422, "remote_content_encoded"), (path, err.body)
        assert set(encoded_server.accept_encodings) == {"identity"}
        err = ask(base, "/long.png")
        assert (err.status_code, err.code) == (413, "upload_too_large")
        assert jobs_in_queue(redis_url) == 0
        # `Content-Encoding: identity` is no encoding: fetched and queued (504: no worker here)
        assert ask(base, "/identity.png").code == "job_timeout"
        assert jobs_in_queue(redis_url) == 1
