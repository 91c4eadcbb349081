"""Gateway over real HTTP on loopback against a real Redis: validation codes, caps, idempotency,
queue cap, API keys and rate limits, cancel semantics, health, metrics, CORS. No worker runs here:
what a worker would see is checked through Jobs (part B's end-to-end tests run a real one).
"""
from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis as redis_sync
from PIL import Image

from service.jobs import Jobs
from service.keys import JOBS
from service.redis_conn import redis_client
from service.schemas import BoxRegion, MaskRef
from service.settings import Settings
from tests.conftest import run_gateway

pytestmark = pytest.mark.timeout(120)


def png_bytes(w: int = 16, h: int = 12, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color=128 if mode == "L" else (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes() -> bytes:
    """A real 4-frame H.264 mp4 written by PyAV (the gateway only sniffs it; enough to be genuine)."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 40, np.uint8), format="rgb24")
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return buf.getvalue()


IMG = png_bytes()
BOX = json.dumps([{"frame": 0, "box": [1, 1, 8, 8]}])


def image_form(question: str = "How far is <region0> from the camera?", regions: str = BOX, **extra: Any) -> dict[str, Any]:
    files: dict[str, Any] = {"image": ("scene.png", IMG, "image/png")}
    data = {"question": question, "regions": regions, **extra}
    return {"files": files, "data": data}


def jobs_in_queue(url: str) -> int:
    r = redis_sync.Redis.from_url(url)
    try:
        return int(r.xlen(JOBS)) if r.exists(JOBS) else 0
    finally:
        r.close()


@pytest.fixture
def gw(redis_url: str) -> Iterator[str]:
    with run_gateway(redis_url, max_regions=2, max_tokens=64, max_frames=8, max_question_chars=200) as base:
        yield base


def post(base: str, **kw: Any) -> httpx.Response:
    return httpx.post(f"{base}/v1/spatial-qa", timeout=30, **kw)


# --------------------------------------------------------------------------------------------------
# Validation: each bad input has its own status and code, and nothing is queued.

MASK_REGIONS = json.dumps([{"frame": 0, "mask": "m0"}])
TXT = ("notes.png", b"hello, not an image at all", "image/png")


@pytest.mark.parametrize(
    ("name", "files", "data", "status", "code"),
    [
        ("no media", {}, {"question": "q?"}, 422, "media_missing"),
        ("video and image", {"image": ("a.png", IMG), "video": ("a.mp4", b"\0\0\0\x18ftypisom" + b"\0" * 32)},
         {"question": "q?"}, 422, "media_ambiguous"),
        ("no question", {"image": ("a.png", IMG)}, {"regions": BOX}, 422, "question_missing"),
        ("regions not JSON", {"image": ("a.png", IMG)}, {"question": "q?", "regions": "[{frame: 0"}, 400, "regions_not_json"),
        ("negative frame", {"image": ("a.png", IMG)}, {"question": "q?", "regions": '[{"frame": -1, "box": [0,0,2,2]}]'},
         422, "regions_invalid"),
        ("inverted box", {"image": ("a.png", IMG)}, {"question": "q?", "regions": '[{"frame": 0, "box": [5,0,2,2]}]'},
         422, "regions_invalid"),
        ("image frame > 0", {"image": ("a.png", IMG)}, {"question": "q?", "regions": '[{"frame": 3, "box": [0,0,2,2]}]'},
         422, "region_frame_out_of_range"),
        ("too many regions", {"image": ("a.png", IMG)}, {"question": "q?", "regions": json.dumps([{"frame": 0, "box": [0, 0, 2, 2]}] * 3)},
         422, "too_many_regions"),
        ("question too long", {"image": ("a.png", IMG)}, {"question": "x" * 201}, 422, "question_too_long"),
        ("empty question", {"image": ("a.png", IMG)}, {"question": "   "}, 422, "question_empty"),
        ("typed <image>", {"image": ("a.png", IMG)}, {"question": "what is <image> here?"}, 422, "placeholder_in_question"),
        ("typed chat token", {"image": ("a.png", IMG)}, {"question": "<|im_start|>system"}, 422, "placeholder_in_question"),
        ("region ref out of range", {"image": ("a.png", IMG)}, {"question": "where is <region1>?", "regions": BOX},
         422, "region_out_of_range"),
        ("region never referenced", {"image": ("a.png", IMG)}, {"question": "how far is it?", "regions": BOX},
         422, "unreferenced_region"),
        ("bare <region>", {"image": ("a.png", IMG)}, {"question": "where is <region>?", "regions": BOX},
         422, "placeholder_in_question"),
        ("non-ASCII digit ref", {"image": ("a.png", IMG)}, {"question": "is <region0> near <region\u0663>?", "regions": BOX},
         422, "placeholder_in_question"),
        ("max_tokens over cap", {"image": ("a.png", IMG)}, {"question": "q?", "options": '{"max_tokens": 65}'},
         422, "max_tokens_over_cap"),
        ("num_frames over cap", {"image": ("a.png", IMG)}, {"question": "q?", "options": '{"num_frames": 9}'},
         422, "num_frames_over_cap"),
        ("temperature out of range", {"image": ("a.png", IMG)}, {"question": "q?", "options": '{"temperature": 9}'},
         422, "options_invalid"),
        ("unknown option", {"image": ("a.png", IMG)}, {"question": "q?", "options": '{"n": 4}'}, 422, "options_invalid"),
        ("options not JSON", {"image": ("a.png", IMG)}, {"question": "q?", "options": "{"}, 400, "options_not_json"),
        ("unknown mask part", {"image": ("a.png", IMG)}, {"question": "<region0>?", "regions": MASK_REGIONS}, 422, "mask_part_missing"),
        ("unreferenced file part", {"image": ("a.png", IMG), "m9": ("m9.png", IMG)}, {"question": "q?"}, 422, "unreferenced_part"),
        ("unknown field", {"image": ("a.png", IMG)}, {"question": "q?", "frames": "99"}, 422, "unknown_field"),
        ("text posing as png", {"image": TXT}, {"question": "q?"}, 415, "unsupported_media_type"),
        ("png posing as mp4", {"video": ("clip.mp4", IMG)}, {"question": "q?"}, 415, "unsupported_media_type"),
        ("gif", {"image": ("a.gif", b"GIF89a" + b"\0" * 20)}, {"question": "q?"}, 415, "unsupported_media_type"),
        ("mask not png", {"image": ("a.png", IMG), "m0": ("m0.png", b"\xff\xd8\xff\xe0" + b"\0" * 20)},
         {"question": "<region0>?", "regions": MASK_REGIONS}, 415, "unsupported_media_type"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
def test_bad_input_gets_specific_4xx(gw: str, redis_url: str, name: str, files: dict, data: dict, status: int, code: str) -> None:
    r = post(gw, files=files or None, data=data)
    assert r.status_code == status, (name, r.text)
    assert r.json()["error"]["code"] == code, r.text
    assert r.json()["error"]["message"]
    assert jobs_in_queue(redis_url) == 0


def test_unreferenced_region_is_422_before_anything_is_stored(gw: str, redis_url: str) -> None:
    """The model's own reference rules run at submit: a region the question never mentions is refused
    before the upload is stored or a job queued (it used to be accepted, decoded, depth-estimated and only
    then failed in the worker)."""
    two = json.dumps([{"frame": 0, "box": [1, 1, 8, 8]}, {"frame": 0, "mask": "m0"}])
    files = {"image": ("a.png", IMG, "image/png"), "m0": ("m0.png", png_bytes(16, 12, "L"), "image/png")}
    r = post(gw, files=files, data={"question": "how far is <region0>?", "regions": two})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "unreferenced_region" and "[1]" in r.json()["error"]["message"]
    assert jobs_in_queue(redis_url) == 0
    rc = redis_sync.Redis.from_url(redis_url)
    assert rc.keys("sr3d:blob:*") == [] and rc.keys("sr3d:job:*") == []
    # the same request with both regions referenced is accepted (the rule, not the form, decided)
    ok = post(gw, files=files, data={"question": "is <region0> left of <region1>?", "regions": two})
    assert ok.status_code == 202, ok.text
    assert rc.keys("sr3d:blob:*")


def test_not_multipart_is_415(gw: str) -> None:
    r = post(gw, json={"question": "q?"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_oversized_upload_streamed_without_content_length_is_413(redis_url: str) -> None:
    # 1 MiB cap (+1 MiB multipart allowance): stream 6 MiB in chunks; no Content-Length header.
    with run_gateway(redis_url, max_upload_mb=1) as base:
        sent = 0
        boundary = "sr3dboundary"

        def body() -> Iterator[bytes]:
            nonlocal sent
            head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\nq?\r\n"
                    f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
                    "Content-Type: image/png\r\n\r\n").encode()
            yield head + IMG
            for _ in range(96):
                sent += 64 * 1024
                yield b"\0" * (64 * 1024)
            yield f"\r\n--{boundary}--\r\n".encode()

        r = httpx.post(f"{base}/v1/spatial-qa", content=body(), timeout=30,
                       headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "upload_too_large"
        # Declared too large: refused before a byte of the body is read.
        r = httpx.post(f"{base}/v1/spatial-qa", content=b"x" * (3 << 20), timeout=30,
                       headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    assert jobs_in_queue(redis_url) == 0


# --------------------------------------------------------------------------------------------------
# Accepted jobs: what is stored is what a worker reads back.


def test_accepted_job_is_queued_with_blobs_the_worker_can_read(gw: str, redis_url: str) -> None:
    mask = png_bytes(16, 12, "L")
    regions = json.dumps([[{"frame": 0, "box": [1, 1, 8, 8]}, {"frame": 0, "mask": "m0"}], {"frame": 0, "box": [2, 2, 9, 9]}])
    r = post(gw, files={"image": ("scene.png", IMG, "image/png"), "m0": ("m0.png", mask, "image/png")},
             data={"question": "How far is <region0> from <region1>?", "regions": regions,
                   "options": json.dumps({"max_tokens": 7, "seed": 3})})
    assert r.status_code == 202, r.text
    body = r.json()
    job_id = body["job_id"]
    assert body["status_url"].endswith(f"/v1/spatial-qa/{job_id}") and body["events_url"].endswith("/events")
    assert r.headers["location"] == f"/v1/spatial-qa/{job_id}"

    view = httpx.get(f"{gw}/v1/spatial-qa/{job_id}").json()
    assert view["status"] == "queued" and view["media_kind"] == "image"

    async def worker_view() -> None:
        redis = redis_client(redis_url)
        q = Jobs(redis, Settings(redis_url=redis_url))
        try:
            [d] = await q.claim("w-test", 4, 100)
            job = d.job
            assert job.job_id == job_id and d.delivery.deliveries == 1
            assert job.options.max_tokens == 7 and job.options.seed == 3 and job.options.num_frames == 8  # min(SR3D_NUM_FRAMES, cap)
            assert isinstance(job.regions[0][0], BoxRegion) and isinstance(job.regions[0][1], MaskRef)
            assert await q.blobs.get(job.media_blob) == IMG
            async with q.blobs.open_path(job.regions[0][1].mask_blob, suffix=".png") as p:
                assert p.read_bytes() == mask
            import hashlib

            assert job.media_hash == hashlib.sha256(IMG).hexdigest()
        finally:
            await q.aclose()
            await redis.aclose()

    asyncio.run(worker_view())


def test_video_upload_is_accepted(gw: str) -> None:
    r = post(gw, files={"video": ("clip.mp4", mp4_bytes(), "video/mp4")},
             data={"question": "How far is <region0> from the camera?", "regions": json.dumps([{"frame": 2, "box": [0, 0, 4, 4]}])})
    assert r.status_code == 202, r.text
    assert httpx.get(f"{gw}/v1/spatial-qa/{r.json()['job_id']}").json()["media_kind"] == "video"


def test_mov_starting_with_a_wide_box_is_accepted_by_gateway_and_decoder(gw: str, tmp_path: Any) -> None:
    """Old QuickTime files have no `ftyp` and start with a `wide` box; gateway and decoder share one
    sniff (service/media/sniff.py), so the gateway accepts exactly what the worker's decoder opens. The
    file: a real mp4 whose leading `ftyp` box is retyped `wide` (same size, so every offset holds)."""
    from service.media.limits import MediaLimits
    from service.media.probe import probe_video

    mp4 = mp4_bytes()
    assert mp4[4:8] == b"ftyp"
    mov = mp4[:4] + b"wide" + mp4[8:]
    (tmp_path / "clip.mov").write_bytes(mov)
    assert probe_video(tmp_path / "clip.mov", MediaLimits()).frame_count == 4
    r = post(gw, files={"video": ("clip.mov", mov, "video/quicktime")},
             data={"question": "How far is <region0>?", "regions": json.dumps([{"frame": 0, "box": [0, 0, 4, 4]}])})
    assert r.status_code == 202, r.text
    # Same bytes under a Matroska extension: the content and the extension disagree.
    r = post(gw, files={"video": ("clip.mkv", mov, "video/x-matroska")}, data={"question": "q"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_idempotency_key_returns_the_same_job(gw: str, redis_url: str) -> None:
    a = post(gw, headers={"Idempotency-Key": "abc-1"}, **image_form())
    b = post(gw, headers={"Idempotency-Key": "abc-1"}, **image_form())
    c = post(gw, headers={"Idempotency-Key": "abc-2"}, **image_form())
    assert a.status_code == b.status_code == c.status_code == 202
    assert a.json()["job_id"] == b.json()["job_id"] != c.json()["job_id"]
    assert b.headers.get("idempotent-replayed") == "true" and "idempotent-replayed" not in a.headers
    assert jobs_in_queue(redis_url) == 2


def test_queue_cap_gives_429_with_retry_after(redis_url: str) -> None:
    with run_gateway(redis_url, queue_max=2, retry_after_s=7) as base:
        ids = [post(base, **image_form()).json()["job_id"] for _ in range(2)]
        r = post(base, **image_form())
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert r.headers["retry-after"] == "7"
        # The rejected upload was not left behind: only the two accepted jobs have blobs.
        blob_keys = redis_sync.Redis.from_url(redis_url).keys("sr3d:blob:*")
        assert sorted(k.decode().split(":")[2].split("/")[0] for k in blob_keys) == sorted(ids)
        # A repeat of an accepted request is still answered at the cap.
        first = post(base, headers={"Idempotency-Key": "k"}, **image_form())
        assert first.status_code == 429


# --------------------------------------------------------------------------------------------------
# API keys and rate limit


def test_api_keys_required_accepted_and_rate_limited(redis_url: str) -> None:
    with run_gateway(redis_url, api_keys=["key-one", "key-two"], rate_limit_per_min=2, rate_limit_burst=2) as base:
        r = post(base, **image_form())
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        r = post(base, headers={"Authorization": "Bearer key-nope"}, **image_form())
        assert r.status_code == 401
        ok1 = post(base, headers={"Authorization": "Bearer key-one"}, **image_form())
        ok2 = post(base, headers={"X-API-Key": "key-one"}, **image_form())
        assert ok1.status_code == ok2.status_code == 202
        limited = post(base, headers={"X-API-Key": "key-one"}, **image_form())
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["retry-after"]) >= 1
        # Buckets are per key: the other key still has its own.
        assert post(base, headers={"X-API-Key": "key-two"}, **image_form()).status_code == 202
        # A job is visible only to the key that submitted it.
        job = ok1.json()["job_id"]
        assert httpx.get(f"{base}/v1/spatial-qa/{job}", headers={"X-API-Key": "key-one"}).status_code == 200
        other = httpx.get(f"{base}/v1/spatial-qa/{job}", headers={"X-API-Key": "key-two"})
        assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found"
        assert httpx.get(f"{base}/v1/spatial-qa/{job}").status_code == 401
        # Ops endpoints stay open for probes and scrapers.
        assert httpx.get(f"{base}/healthz").status_code == 200


# --------------------------------------------------------------------------------------------------
# Cancel


def test_delete_semantics(gw: str, redis_url: str) -> None:
    queued = post(gw, **image_form()).json()["job_id"]
    r = httpx.delete(f"{gw}/v1/spatial-qa/{queued}")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    again = httpx.delete(f"{gw}/v1/spatial-qa/{queued}")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    assert httpx.delete(f"{gw}/v1/spatial-qa/{'0' * 32}").status_code == 404
    assert httpx.delete(f"{gw}/v1/spatial-qa/not-an-id").status_code == 404

    running = post(gw, **image_form()).json()["job_id"]

    async def start_then_check() -> None:
        redis = redis_client(redis_url)
        q = Jobs(redis, Settings(redis_url=redis_url))
        try:
            by_id = {h.job_id: h for h in await q.claim("w-test", 4, 100)}
            # The cancelled queued job is refused by start (and acked); the other starts.
            assert await by_id[queued].start() is False
            assert await by_id[running].start() is True
            r = await asyncio.to_thread(httpx.delete, f"{gw}/v1/spatial-qa/{running}")
            assert r.status_code == 202 and r.json()["status"] == "running" and r.json()["cancel_requested"] is True
            assert await by_id[running].cancel_requested()
            await by_id[running].cancelled(answer="", finish_reason="abort")  # the worker ends it
            assert (await q.stats())["pending"] == 0
        finally:
            await q.aclose()
            await redis.aclose()

    asyncio.run(start_then_check())
    view = httpx.get(f"{gw}/v1/spatial-qa/{running}").json()
    # One message for a cancel, whether the gateway (queued) or the worker (running) ended the job.
    assert view["status"] == "cancelled" and view["error"] == {"code": "cancelled", "message": "cancelled by the client"}
    assert view["error"] == httpx.get(f"{gw}/v1/spatial-qa/{queued}").json()["error"]
    assert httpx.delete(f"{gw}/v1/spatial-qa/{running}").status_code == 409


# --------------------------------------------------------------------------------------------------
# Ops


def test_health_ready_metrics_openapi(gw: str) -> None:
    assert httpx.get(f"{gw}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{gw}/readyz").status_code == 200
    post(gw, **image_form())
    text = httpx.get(f"{gw}/metrics").text
    assert 'sr3d_http_requests_total{method="POST",route="/v1/spatial-qa",status="202"}' in text
    assert "sr3d_queue_length 1.0" in text
    spec = httpx.get(f"{gw}/openapi.json").json()
    assert {"/v1/spatial-qa", "/v1/spatial-qa/{job_id}", "/v1/spatial-qa/{job_id}/events"} <= spec["paths"].keys()
    assert "ErrorBody" in spec["components"]["schemas"]
    assert "429" in spec["paths"]["/v1/spatial-qa"]["post"]["responses"]
    assert "multipart/form-data" in spec["paths"]["/v1/spatial-qa"]["post"]["requestBody"]["content"]


def test_redis_down_is_503_not_500(tmp_path: Any) -> None:
    with run_gateway(f"unix://{tmp_path}/no-redis.sock") as base:
        assert httpx.get(f"{base}/healthz").status_code == 200
        r = httpx.get(f"{base}/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "redis_unavailable" and "retry-after" in r.headers
        r = post(base, **image_form())
        assert r.status_code == 503 and r.json()["error"]["code"] == "redis_unavailable"


def test_unknown_route_and_method_are_json(gw: str) -> None:
    r = httpx.get(f"{gw}/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.put(f"{gw}/v1/spatial-qa")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_cors_allowlist(redis_url: str) -> None:
    with run_gateway(redis_url, cors_origins=["https://app.example"]) as base:
        pre = {"Access-Control-Request-Method": "POST"}
        ok = httpx.options(f"{base}/v1/spatial-qa", headers={"Origin": "https://app.example", **pre})
        assert ok.headers.get("access-control-allow-origin") == "https://app.example"
        bad = httpx.options(f"{base}/v1/spatial-qa", headers={"Origin": "https://evil.example", **pre})
        assert "access-control-allow-origin" not in bad.headers


def test_error_codes_map_to_statuses_in_one_table(redis_url: str) -> None:
    """Errors below the API carry only (code, message): the API layer's table gives the status, an
    unlisted code from the model or the decoder is a 422, and an uncoded ValueError is still a 500."""
    import socket
    import threading
    import time

    import uvicorn

    from model.errors import ModelInputError
    from service.api.app import create_app
    from service.api.errors import status_for
    from service.media.limits import MediaError

    assert status_for("file_too_large") == 413 and status_for("unsupported_codec") == 415
    assert status_for("queue_full") == 429 and status_for("some_new_model_code") == 422
    app = create_app(Settings(redis_url=redis_url))
    raised = {"model": ModelInputError("unreferenced_region", "<region1> is never referenced"),
              "media": MediaError("file_too_large", "too big"), "bug": ValueError("not coded")}

    async def boom(kind: str) -> None:
        raise raised[kind]

    app.add_api_route("/boom/{kind}", boom)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/boom/model")
        assert r.status_code == 422 and r.json() == {"error": {"code": "unreferenced_region",
                                                               "message": "<region1> is never referenced"}}
        r = httpx.get(f"http://127.0.0.1:{port}/boom/media")
        assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
        assert httpx.get(f"http://127.0.0.1:{port}/boom/bug").status_code == 500
    finally:
        server.should_exit = True
        thread.join(15)
