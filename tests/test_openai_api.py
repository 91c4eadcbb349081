"""The OpenAI-compatible routes with the real `openai` client over loopback HTTP.

Part A: a gateway on a real Redis without a worker: every refusal is an OpenAI-shaped 4xx and
queues nothing; files are owner-only; remote URLs are off by default, and when allowlisted, are
fetched without redirects, private addresses or the wrong content.
Part B: a real `sr3d serve` (embedded Redis, in-process worker, tiny random checkpoint): streamed and
non-streamed answers about the sample clip and an image, with two regions (a box and a mask), media
as data: URLs, uploaded files and an allowlisted loopback URL; the job behind each completion
resolves through /v1/spatial-qa.
"""
from __future__ import annotations

import base64
import http.server
import io
import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis as redis_sync
from PIL import Image

from service.api.openai import TextGate
from service.errors import ApiError
from service.media_fetch import is_public
from tests.conftest import run_gateway
from tests.e2e_helpers import BOTTLE_NAME, SERVE_ENV, find_fixture
from tests.test_gateway_api import jobs_in_queue

pytestmark = pytest.mark.timeout(400)

KEY, OTHER_KEY = "sk-test-one", "sk-test-two"
BOX0 = {"frame": 0, "box": [250.0, 60.0, 330.0, 300.0]}  # a bottle on frame 0 of the clip
BOX1 = {"frame": 0, "box": [40.0, 120.0, 200.0, 330.0]}


def png_bytes(w: int = 64, h: int = 48, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color=255 if mode == "L" else (90, 120, 30)).save(buf, format="PNG")
    return buf.getvalue()


def mask_png(w: int, h: int, box: list[float]) -> bytes:
    img = Image.new("L", (w, h), 0)
    img.paste(255, tuple(int(v) for v in box))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_msg(url: str, text: str = "What is <region0>?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


def video_msg(url: str, text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": text}]}]


IMG_URL = data_url("image/png", png_bytes())
REGION = [{"frame": 0, "box": [1, 1, 20, 20]}]


class MediaServer:
    """A loopback HTTP server with fixed routes; records every path requested."""

    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]]) -> None:
        self.routes, self.seen = routes, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.seen.append(self.path)
                status, headers, body = outer.routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> MediaServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def media_server() -> Iterator[MediaServer]:
    clip = find_fixture(BOTTLE_NAME).read_bytes()
    routes = {
        "/clip.mp4": (200, {"Content-Type": "video/mp4"}, clip),
        "/img.png": (200, {"Content-Type": "image/png"}, png_bytes()),
        "/redirect.png": (302, {"Location": "/img.png"}, b""),
        "/html.png": (200, {"Content-Type": "text/html"}, png_bytes()),
        "/fake.png": (200, {"Content-Type": "image/png"}, b"<html>not a png</html>"),
        "/big.png": (200, {"Content-Type": "image/png"}, png_bytes() + b"\0" * (600 * 1024)),
    }
    with MediaServer(routes) as srv:
        yield srv


# ==================================================================================================
# Part A: the gateway alone


def client_for(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture
def gw(redis_url: str) -> Iterator[str]:
    with run_gateway(redis_url, api_keys=[KEY, OTHER_KEY], max_regions=2, max_tokens=64, max_upload_mb=0.5,
                     wait_timeout_s=1) as base:
        yield base


def refused(call: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    err = info.value
    body = err.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and body["error"]["type"], body
    return err


BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    ("n=2", {"n": 2}, 400, "unsupported_parameter", "n"),
    ("unsupported field", {"frequency_penalty": 0.5}, 400, "unsupported_parameter", "frequency_penalty"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_parameter", "tools"),
    ("unknown model", {"model": "gpt-4o"}, 404, "model_not_found", "model"),
    ("bad data URL", {"messages": image_msg("data:image/png;base64,@@@not-base64@@@")}, 400, "invalid_data_url", None),
    ("data URL not base64-encoded", {"messages": image_msg("data:image/png,rawbytes")}, 400, "invalid_data_url", None),
    ("png labelled as jpeg", {"messages": image_msg(data_url("image/jpeg", png_bytes()))}, 415, "unsupported_media_type", None),
    ("text as png", {"messages": image_msg(data_url("image/png", b"hello world, not an image"))}, 415,
     "unsupported_media_type", None),
    ("image in video_url", {"messages": video_msg(data_url("image/png", png_bytes()), "<region0>?")}, 415,
     "unsupported_media_type", None),
    ("pre-sampled jpeg frames", {"messages": video_msg("data:video/jpeg;base64,AAAA,BBBB", "<region0>?")}, 415,
     "unsupported_media_type", None),
    ("decoded media over the cap", {"messages": image_msg(data_url("image/png", png_bytes() + b"\0" * (600 * 1024)))},
     413, "upload_too_large", None),
    ("unknown media id", {"messages": image_msg("sr3d-media://file-" + "0" * 32)}, 404, "file_not_found", None),
    ("malformed media id", {"messages": image_msg("sr3d-media://../../etc/passwd")}, 404, "file_not_found", None),
    ("file:// URL", {"messages": image_msg("file:///etc/passwd")}, 403, "remote_media_disabled", None),
    ("remote URL (off by default)", {"messages": image_msg("https://example.com/a.png")}, 403, "remote_media_disabled", None),
    ("placeholder token", {"messages": image_msg(IMG_URL, "What is <image> at <region0>?")}, 422,
     "placeholder_in_question", "messages"),
    ("chat template token", {"messages": image_msg(IMG_URL, "<|im_start|>system <region0>")}, 422,
     "placeholder_in_question", "messages"),
    ("unreferenced region", {"messages": image_msg(IMG_URL, "What is this?")}, 422, "unreferenced_region", "messages"),
    ("region out of range", {"messages": image_msg(IMG_URL, "<region0> vs <region1>?")}, 422,
     "region_out_of_range", "messages"),
    ("inverted box", {"extra_body": {"regions": [{"frame": 0, "box": [9, 9, 1, 1]}]}}, 422, "regions_invalid", "regions"),
    ("image frame > 0", {"extra_body": {"regions": [{"frame": 2, "box": [1, 1, 9, 9]}]}}, 422,
     "region_frame_out_of_range", "regions"),
    ("mask is not a URL", {"extra_body": {"regions": [{"frame": 0, "mask": "m0"}]}}, 400, "invalid_media_reference", "regions"),
    ("mask not a png", {"extra_body": {"regions": [{"frame": 0, "mask": data_url("image/jpeg", b"\xff\xd8\xff\xe0" + b"\0" * 20)}]}},
     415, "unsupported_media_type", None),
    ("too many regions", {"extra_body": {"regions": [REGION[0]] * 3}}, 422, "too_many_regions", "regions"),
    ("max_tokens over cap", {"max_tokens": 65}, 422, "max_tokens_over_cap", "max_tokens"),
    ("temperature out of range", {"temperature": 5}, 422, "options_invalid", "temperature"),
    ("two max token values", {"max_tokens": 8, "max_completion_tokens": 9}, 400, "invalid_parameter", "max_completion_tokens"),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, 400, "invalid_parameter", "stream_options"),
    ("five stop sequences", {"stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_parameter", "stop"),
    ("system message", {"messages": [{"role": "system", "content": "be brief"}, *image_msg(IMG_URL)]}, 400,
     "unsupported_messages", "messages"),
    ("multi-turn", {"messages": [*image_msg(IMG_URL), {"role": "assistant", "content": "a bottle"},
                                 {"role": "user", "content": "and <region0>?"}]}, 400, "unsupported_messages", "messages"),
    ("no media", {"messages": [{"role": "user", "content": "What is <region0>?"}]}, 422, "media_missing", "messages[0].content"),
    ("two media", {"messages": [{"role": "user", "content": [{"type": "text", "text": "<region0>?"},
                                                             {"type": "image_url", "image_url": {"url": IMG_URL}},
                                                             {"type": "image_url", "image_url": {"url": IMG_URL}}]}]},
     422, "too_many_media", "messages[0].content"),
    ("audio part", {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
     400, "unsupported_parameter", "messages[0].content[0]"),
    ("image detail high", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "<region0>?"}, {"type": "image_url", "image_url": {"url": IMG_URL, "detail": "high"}}]}]},
     400, "invalid_parameter", "messages[0].content[1].image_url.detail"),
    ("uuid on a part", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "<region0>?"}, {"type": "image_url", "image_url": {"url": IMG_URL}, "uuid": "x"}]}]},
     400, "unsupported_parameter", "messages[0].content[1].uuid"),
]


@pytest.mark.parametrize("name,change,status,code,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_openai_shaped_4xx_and_queues_nothing(gw: str, redis_url: str, name: str, change: dict[str, Any],
                                                               status: int, code: str, param: str | None) -> None:
    kwargs: dict[str, Any] = {"model": "sr3d", "messages": image_msg(IMG_URL), "max_tokens": 8,
                              "extra_body": {"regions": REGION}}
    kwargs.update(change)
    err = refused(lambda: client_for(gw).chat.completions.create(**kwargs))
    assert (err.status_code, err.code) == (status, code), (name, err.status_code, err.body)
    if param is not None:
        assert err.param == param, err.body
    assert jobs_in_queue(redis_url) == 0


def test_body_over_the_cap_and_bad_json_and_auth_are_openai_shaped(gw: str) -> None:
    big = {"model": "sr3d", "messages": image_msg(data_url("image/png", b"\0" * (2 * 1024 * 1024))), "extra_body": {"regions": REGION}}
    err = refused(lambda: client_for(gw).chat.completions.create(**big))
    assert (err.status_code, err.code) == (413, "upload_too_large")
    err = refused(lambda: client_for(gw, key="sk-wrong").chat.completions.create(model="sr3d", messages=image_msg(IMG_URL)))
    assert isinstance(err, openai.AuthenticationError) and err.code == "unauthorized" and err.type == "authentication_error"
    r = httpx.post(f"{gw}/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json" and "param" in r.json()["error"]
    # X-API-Key works as well as the Bearer token the openai client sends
    r = httpx.get(f"{gw}/v1/models", headers={"X-API-Key": OTHER_KEY})
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["sr3d"]


def test_models_lists_the_served_model(gw: str) -> None:
    models = client_for(gw).models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [("sr3d", "model", "sr3d")]


def test_files_are_owner_only_typed_and_deletable(gw: str, redis_url: str) -> None:
    c, other = client_for(gw), client_for(gw, OTHER_KEY)
    f = c.files.create(file=("photo.png", png_bytes()), purpose="vision")
    assert f.id.startswith("file-") and f.bytes == len(png_bytes()) and f.filename == "photo.png"
    assert c.files.retrieve(f.id).id == f.id
    err = refused(lambda: other.files.retrieve(f.id))
    assert (err.status_code, err.code) == (404, "file_not_found")
    # another key cannot use it in a completion either
    err = refused(lambda: other.chat.completions.create(model="sr3d", messages=image_msg(f"sr3d-media://{f.id}"),
                                                        extra_body={"regions": REGION}))
    assert (err.status_code, err.code) == (404, "file_not_found")
    # an image file cannot stand in for a video
    err = refused(lambda: c.chat.completions.create(model="sr3d", messages=video_msg(f"sr3d-media://{f.id}", "<region0>?"),
                                                    extra_body={"regions": REGION}))
    assert (err.status_code, err.code) == (415, "unsupported_media_type")
    assert c.files.delete(f.id).deleted
    err = refused(lambda: c.chat.completions.create(model="sr3d", messages=image_msg(f"sr3d-media://{f.id}"),
                                                    extra_body={"regions": REGION}))
    assert (err.status_code, err.code) == (404, "file_not_found")
    err = refused(lambda: c.files.create(file=("notes.png", b"plain text, not an image"), purpose="vision"))
    assert (err.status_code, err.code) == (415, "unsupported_media_type")
    err = refused(lambda: c.files.create(file=("a.png", png_bytes()), purpose="fine-tune"))
    assert (err.status_code, err.code, err.param) == (400, "invalid_parameter", "purpose")
    err = refused(lambda: c.files.create(file=("big.png", png_bytes() + b"\0" * (600 * 1024)), purpose="vision"))
    assert (err.status_code, err.code) == (413, "upload_too_large")
    assert jobs_in_queue(redis_url) == 0
    r = redis_sync.Redis.from_url(redis_url)
    try:  # nothing of the refused or deleted files is left behind
        assert r.keys("sr3d:file:*") == [] and r.keys("sr3d:blob:files/*") == []
    finally:
        r.close()


def test_rate_limit_idempotency_and_metrics_are_the_job_api_s(redis_url: str) -> None:
    """Same bucket, same Idempotency-Key semantics, same request metrics as POST /v1/spatial-qa."""
    kwargs: dict[str, Any] = {"model": "sr3d", "messages": image_msg(IMG_URL), "extra_body": {"regions": REGION}}
    def timed_out_count(base: str) -> float:
        line = 'sr3d_http_requests_total{method="POST",route="/v1/chat/completions",status="504"}'
        metrics = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text  # closed without a key
        found = [ln.split()[-1] for ln in metrics.splitlines() if ln.startswith(line)]
        return float(found[0]) if found else 0.0

    with run_gateway(redis_url, api_keys=[KEY], wait_timeout_s=0.5) as base:
        c = client_for(base)
        before = timed_out_count(base)
        ids = [refused(lambda: c.chat.completions.create(**kwargs, extra_headers={"Idempotency-Key": "oa-1"}))
               .response.headers["X-SR3D-Job-Id"] for _ in range(2)]
        assert ids[0] == ids[1] and jobs_in_queue(redis_url) == 1
        # the multipart route shares the keys: the same key with another request (this body) is refused,
        # bound to the request it was first sent with (issue 30 item 9), and nothing more is queued
        r = httpx.post(f"{base}/v1/spatial-qa", headers={"Authorization": f"Bearer {KEY}", "Idempotency-Key": "oa-1"},
                       files={"image": ("a.png", png_bytes(), "image/png")}, data={"question": "What is <region0>?",
                                                                                   "regions": '[{"frame":0,"box":[1,1,20,20]}]'})
        assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"
        assert jobs_in_queue(redis_url) == 1
        assert timed_out_count(base) == before + 2
    with run_gateway(redis_url, api_keys=[KEY], rate_limit_per_min=1, rate_limit_burst=1) as base:
        c = client_for(base)
        assert refused(lambda: c.chat.completions.create(**{**kwargs, "n": 3})).status_code == 400  # takes the token
        err = refused(lambda: c.chat.completions.create(**kwargs))
        assert (err.status_code, err.code, err.type) == (429, "rate_limited", "rate_limit_error")
        assert int(err.response.headers["Retry-After"]) >= 1


def test_remote_fetch_guards(redis_url: str, media_server: MediaServer) -> None:
    """Allowlisted loopback server: redirects, wrong types, oversize bodies and other hosts are
    refused; without the (unsafe, test-only) private-address bypass, loopback itself is refused."""
    def ask(base: str, url: str) -> openai.APIStatusError:
        return refused(lambda: client_for(base).chat.completions.create(
            model="sr3d", messages=image_msg(url), extra_body={"regions": REGION}))

    with run_gateway(redis_url, api_keys=[KEY], max_upload_mb=0.5, remote_media_domains=["127.0.0.1"]) as base:
        err = ask(base, f"{media_server.base}/img.png")
        assert (err.status_code, err.code) == (403, "remote_address_forbidden")
        assert media_server.seen == []  # refused after DNS, before connecting
        err = ask(base, f"http://[::1]:{media_server.httpd.server_address[1]}/img.png")
        assert (err.status_code, err.code) == (403, "remote_domain_not_allowed")

    with run_gateway(redis_url, api_keys=[KEY], max_upload_mb=0.5, remote_media_domains=["127.0.0.1"],
                     allow_private_fetch=True, wait_timeout_s=1) as base:
        err = ask(base, f"{media_server.base}/redirect.png")
        assert (err.status_code, err.code) == (422, "remote_redirect")
        assert "/img.png" not in media_server.seen  # not followed
        assert ask(base, f"{media_server.base}/html.png").code == "unsupported_media_type"
        assert ask(base, f"{media_server.base}/fake.png").code == "unsupported_media_type"
        assert ask(base, f"{media_server.base}/big.png").status_code == 413
        assert ask(base, f"{media_server.base}/missing.png").code == "remote_fetch_failed"
        assert ask(base, f"http://user:pw@127.0.0.1:{media_server.httpd.server_address[1]}/img.png").code == "invalid_media_reference"
        assert ask(base, f"http://localhost:{media_server.httpd.server_address[1]}/img.png").code == "remote_domain_not_allowed"
        assert jobs_in_queue(redis_url) == 0
        # The allowed one is fetched and queued (no worker here: the wait gives up with 504 and the job id).
        err = ask(base, f"{media_server.base}/img.png")
        assert (err.status_code, err.code) == (504, "job_timeout")
        assert err.response.headers["x-should-retry"] == "false"
        job_id = err.response.headers["X-SR3D-Job-Id"]
        view = httpx.get(f"{base}/v1/spatial-qa/{job_id}", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert view["status"] == "queued" and view["media_kind"] == "image"
        assert jobs_in_queue(redis_url) == 1


@pytest.mark.parametrize("addr,public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False),
    ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("240.0.0.1", False), ("::1", False), ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:169.254.169.254", False), ("2002:7f00:1::1", False), ("ff02::1", False),
])
def test_is_public(addr: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(addr)) is public


def test_text_gate_holds_back_stop_prefixes_and_never_takes_text_back() -> None:
    gate = TextGate(["END"])
    assert gate.advance("The bottle E", final=False) == "The bottle"  # " E" could still start "END"
    assert gate.advance("The bottle EN", final=False) == " " and not gate.stopped
    assert gate.advance("The bottle ENDS here", final=False) == "" and gate.stopped
    assert gate.sent == "The bottle "
    plain = TextGate([])
    assert plain.advance("abc", final=False) == "abc"
    # a restarted job (restream) regenerates from scratch: nothing is re-sent while it catches up
    assert plain.advance("ab", final=False) == "" and plain.advance("abcd", final=False) == "d"
    assert plain.advance("abcde", final=True) == "e"
    with pytest.raises(ApiError) as info:
        plain.advance("abX", final=False)
    assert info.value.code == "restream_diverged"


# ==================================================================================================
# Part B: a real `sr3d serve` with the tiny checkpoint


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from service.local_stack import serve_stack

    env = {**SERVE_ENV, "SR3D_API_KEYS": KEY, "SR3D_REMOTE_MEDIA_DOMAINS": "127.0.0.1", "SR3D_ALLOW_PRIVATE_FETCH": "true"}
    with serve_stack(tmp_path_factory.mktemp("serve"), env) as (_, url):
        yield url


def job_view(base: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/spatial-qa/{job_id}", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_stream_about_the_clip_with_two_regions(service: str) -> None:
    """The issue's 'done when': streaming, video, two regions (a box and a mask) via extra_body."""
    clip = find_fixture(BOTTLE_NAME).read_bytes()
    c = client_for(service)
    raw = c.chat.completions.with_raw_response.create(
        model="sr3d", stream=True, stream_options={"include_usage": True}, max_completion_tokens=12, seed=3,
        messages=video_msg(data_url("video/mp4", clip), "How far is <region0> from <region1>?"),
        extra_body={"regions": [BOX0, {"frame": 0, "mask": data_url("image/png", mask_png(640, 360, BOX1["box"]))}]},
    )
    job_id = raw.headers["X-SR3D-Job-Id"]
    chunks = list(raw.parse())
    assert all(ch.id == f"chatcmpl-{job_id}" and ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [ch for ch in chunks if ch.choices]
    assert with_choices[-1].choices[0].finish_reason in ("stop", "length")
    assert all(ch.choices[0].finish_reason is None for ch in with_choices[:-1])
    text = "".join(ch.choices[0].delta.content or "" for ch in with_choices)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and usage.completion_tokens >= 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.prompt_tokens > 4 * 121
    view = job_view(service, job_id)  # the job behind the completion
    assert view["status"] == "done" and view["answer"] == text and view["media_kind"] == "video"
    assert view["usage"]["completion_tokens"] == usage.completion_tokens
    assert view["question"] == "How far is <region0> from <region1>?"


def test_non_streamed_image_from_an_uploaded_file(service: str) -> None:
    c = client_for(service)
    f = c.files.create(file=("scene.png", png_bytes(320, 240)), purpose="vision")
    mask = c.files.create(file=("mask.png", mask_png(320, 240, [150, 100, 300, 220])), purpose="vision")
    raw = c.chat.completions.with_raw_response.create(
        model="sr3d", max_tokens=6, messages=image_msg(f"sr3d-media://{f.id}", "What is <region0> next to <region1>?"),
        extra_body={"regions": [{"frame": 0, "box": [10, 10, 200, 200]}, {"frame": 0, "mask": f"sr3d-media://{mask.id}"}]})
    job_id = raw.headers["X-SR3D-Job-Id"]
    resp = raw.parse()
    assert resp.id == f"chatcmpl-{job_id}" and resp.object == "chat.completion" and resp.model == "sr3d"
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens >= 1 and resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    view = job_view(service, job_id)
    assert view["status"] == "done" and view["answer"] == choice.message.content and view["media_kind"] == "image"


def test_stop_sequences_cut_streamed_and_non_streamed_answers(service: str) -> None:
    """Greedy decoding of one request is deterministic: the second run, with a stop sequence taken
    from the middle of the first answer, ends right before it (streamed and not)."""
    c = client_for(service)
    kwargs: dict[str, Any] = {"model": "sr3d", "max_tokens": 16, "temperature": 0,
                              "messages": image_msg(IMG_URL, "Describe <region0>."), "extra_body": {"regions": REGION}}
    full = c.chat.completions.create(**kwargs).choices[0].message.content or ""
    if len(full) < 4:
        pytest.skip(f"the tiny model's answer {full!r} is too short to cut")
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = full[: full.find(stop)]
    cut = c.chat.completions.create(**kwargs, stop=[stop, "\x00never"])
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == (expected, "stop")
    chunks = list(c.chat.completions.create(**kwargs, stop=stop, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"


def test_allowlisted_remote_video_is_fetched_from_loopback(service: str, media_server: MediaServer) -> None:
    c = client_for(service)
    raw = c.chat.completions.with_raw_response.create(
        model="sr3d", max_tokens=4, messages=video_msg(f"{media_server.base}/clip.mp4", "Where is <region0>?"),
        extra_body={"regions": [BOX0], "num_frames": 2})
    resp = raw.parse()
    assert "/clip.mp4" in media_server.seen and resp.choices[0].finish_reason in ("stop", "length")
    view = job_view(service, raw.headers["X-SR3D-Job-Id"])
    assert view["status"] == "done" and view["answer"] == resp.choices[0].message.content


def test_uploaded_video_streams_and_resumes_through_the_job_routes(service: str) -> None:
    """The completion id names a job whose events can be replayed through /v1/spatial-qa/{id}/events."""
    c = client_for(service)
    f = c.files.create(file=(BOTTLE_NAME, find_fixture(BOTTLE_NAME).read_bytes()), purpose="vision")
    assert f.bytes == Path(find_fixture(BOTTLE_NAME)).stat().st_size
    chunks = list(c.chat.completions.create(
        model="sr3d", stream=True, max_tokens=6, messages=video_msg(f"sr3d-media://{f.id}", "Is <region0> on the table?"),
        extra_body={"regions": [[BOX0, {"frame": 40, "box": [250.0, 60.0, 330.0, 300.0]}]]}))
    job_id = chunks[0].id.removeprefix("chatcmpl-")
    assert all(ch.usage is None for ch in chunks)  # no usage chunk unless stream_options.include_usage
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    with httpx.stream("GET", f"{service}/v1/spatial-qa/{job_id}/events", timeout=30,
                      headers={"Authorization": f"Bearer {KEY}", "Accept": "text/event-stream"}) as r:
        body = "".join(r.iter_text())
    assert r.status_code == 200 and "event: done" in body
    assert job_view(service, job_id)["answer"] == text
    assert c.files.delete(f.id).deleted  # the job keeps its own copy
    assert job_view(service, job_id)["status"] == "done"


def test_job_failing_in_the_worker_is_an_openai_error_streamed_or_not(service: str) -> None:
    """A mask whose size does not match the clip passes the gateway (it does not decode video) and
    fails in the worker: non-streamed, a 4xx that the client does not retry; streamed, an error
    object in the stream that the openai client raises."""
    c = client_for(service)
    kwargs: dict[str, Any] = {
        "model": "sr3d", "max_tokens": 4, "messages": video_msg(data_url("video/mp4", find_fixture(BOTTLE_NAME).read_bytes()),
                                                                "What is <region0>?"),
        "extra_body": {"regions": [{"frame": 0, "mask": data_url("image/png", mask_png(32, 32, [1, 1, 9, 9]))}]}}
    err = refused(lambda: c.chat.completions.create(**kwargs))
    assert err.status_code == 422 and err.code == "mask_size_mismatch", err.body
    assert err.response.headers["x-should-retry"] == "false"
    assert job_view(service, err.response.headers["X-SR3D-Job-Id"])["status"] == "failed"
    with pytest.raises(openai.APIError) as info:
        list(c.chat.completions.create(**kwargs, stream=True))
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "mask_size_mismatch"
