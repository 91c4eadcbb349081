"""End to end through real processes: `sr3d serve` (embedded Redis, in-process worker, tiny real
checkpoint + tiny depth model), real HTTP on loopback, real SSE. Nothing is mocked.

One `sr3d serve` is shared by the module (start-up = tiny checkpoint build + warm-up); each test
submits its own jobs.
"""
from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.client import JobRequest, Media, SR3DClient, box_regions, stream_id_key
from service.local_stack import serve_stack
from tests.e2e_helpers import BOTTLE_NAME, BOX, QUESTION, SERVE_ENV, assert_clean_stream, bottle_request, find_fixture, follow, run, wait_terminal

pytestmark = pytest.mark.timeout(400)

@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> str:
    with serve_stack(tmp_path_factory.mktemp("serve"), SERVE_ENV) as (_, url):
        yield url


# --------------------------------------------------------------------------------------- happy path


def test_streamed_job_on_real_clip_then_resume(service: str) -> None:
    async def go() -> None:
        async with SR3DClient(service) as c:
            res = await c.run(bottle_request(max_tokens=24))
            assert res.http_status == 200, res.error_body
            assert_clean_stream(res)
            types = [e.type for e in res.events]
            assert types[0] == "queued" and types[-1] == "done", types
            stages = [e.data["stage"] for e in res.events if e.type == "progress"]
            assert [s for s in stages if s in ("decode", "pointmaps", "encode")] == ["decode", "pointmaps", "encode"], stages
            first_token = types.index("token") if "token" in types else len(types) - 1
            assert types.index("progress") < first_token
            done = res.events[-1].data
            assert done["answer"] == res.answer_from_tokens
            assert done["usage"]["completion_tokens"] >= 1 and done["usage"]["prompt_tokens"] > 4 * 121
            assert done["finish_reason"] in ("stop", "length")
            assert done["demo_model"] is True  # SR3D_MODEL unset: the tiny random demo checkpoint answered
            # strictly increasing ids (Redis entry ids compare as (ms, seq))
            keys = [stream_id_key(e.id) for e in res.events]
            assert all(a < b for a, b in zip(keys, keys[1:]))

            # Resume from the middle: exactly the remainder, same ids, same payloads.
            for k in (0, len(res.events) // 2, len(res.events) - 2):
                rest = await follow(c, res.job_id, last_event_id=res.events[k].id)
                assert [(e.id, e.type, e.data) for e in rest] == [(e.id, e.type, e.data) for e in res.events[k + 1:]]

            view = (await c.get(res.job_id)).json()
            assert view["status"] == "done" and view["answer"] == done["answer"]
            assert view["usage"]["completion_tokens"] == done["usage"]["completion_tokens"]

    run(go())


def test_idempotent_resubmission_returns_the_same_job(service: str) -> None:
    async def go() -> None:
        async with SR3DClient(service) as c:
            req = bottle_request(max_tokens=4)
            req.idempotency_key = "e2e-idem-1"
            r1, r2 = await c.submit(req), await c.submit(req)
            assert r1.status_code == 202 and r2.status_code in (200, 202), (r1.text, r2.text)
            assert r1.json()["job_id"] == r2.json()["job_id"]
            view = await wait_terminal(c, r1.json()["job_id"])
            assert view["status"] == "done"

    run(go())


def test_cancel_stops_generation(service: str) -> None:
    async def go() -> None:
        async with SR3DClient(service) as c:
            max_tokens = 4000
            # ignore_eos: a random-weight model may emit EOS before the cancel lands.
            res = await c.run(bottle_request(max_tokens=max_tokens, ignore_eos=True), cancel_after_tokens=1)
            assert res.job_id and res.terminal is not None
            assert res.terminal.type == "error" and res.terminal.data["code"] == "cancelled", res.terminal
            view = await wait_terminal(c, res.job_id)
            assert view["status"] == "cancelled"
            assert view["usage"]["completion_tokens"] < max_tokens
            assert view["error"]["code"] == "cancelled"

    run(go())


def test_second_question_on_same_video_hits_the_pointmap_cache(service: str) -> None:
    async def go() -> None:
        async with SR3DClient(service) as c:
            res = [await c.run(bottle_request(max_tokens=2)) for _ in range(2)]
            for r in res:
                assert_clean_stream(r)
            pm = [next(e.data for e in r.events if e.type == "progress" and e.data.get("stage") == "pointmaps") for r in res]
            assert "cached" in pm[1]["source"], pm
            metrics = (await c.get_json("/metrics")).text
            assert 'sr3d_pointmap_cache_total{result="hit"}' in metrics

    run(go())


# ------------------------------------------------------------------------------------- bad media


def _png_header_only(width: int, height: int) -> bytes:
    """A valid-looking PNG whose IHDR claims width x height, with one tiny IDAT: a few hundred
    bytes that would need width*height*3 bytes if anyone decoded it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    arr = np.zeros((h, w), dtype=np.uint8)
    arr[h // 4: h // 2, w // 4: w // 2] = 255
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _bad_cases() -> dict[str, tuple[JobRequest, set[str]]]:
    clip = find_fixture(BOTTLE_NAME).read_bytes()
    video = Media("video", "clip.mp4", clip, "video/mp4")
    q1 = QUESTION
    return {
        "truncated_video": (JobRequest(Media("video", "cut.mp4", clip[: len(clip) // 10], "video/mp4"), q1, box_regions([BOX])),
                            {"corrupt_media", "no_video_stream"}),
        "text_named_mp4": (JobRequest(Media("video", "notes.mp4", b"just some text, not a video\n" * 20, "video/mp4"), q1,
                                      box_regions([BOX])), {"unsupported_container", "unsupported_media_type"}),
        "huge_png_header": (JobRequest(Media("image", "huge.png", _png_header_only(20000, 20000), "image/png"), q1,
                                       box_regions([(0, [10, 10, 50, 50])])), {"resolution_too_large"}),
        "mask_wrong_size": (JobRequest(video, q1, [[{"frame": 0, "mask": "m0"}]], masks={"m0": _png(64, 48)}),
                            {"mask_size_mismatch"}),
        "box_outside_frame": (JobRequest(video, q1, box_regions([(0, [700, 400, 800, 500])])), {"box_out_of_frame"}),
        "frame_past_end": (JobRequest(video, q1, box_regions([(10_000, [10, 10, 50, 50])])), {"frame_out_of_range"}),
    }


BAD_CASES = ["truncated_video", "text_named_mp4", "huge_png_header", "mask_wrong_size", "box_outside_frame", "frame_past_end"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_media_returns_its_error(service: str, case: str) -> None:
    req, codes = _bad_cases()[case]

    async def go() -> None:
        async with SR3DClient(service) as c:
            r = await c.submit(req)
            if r.status_code != 202:  # rejected by the gateway's cheap checks
                assert 400 <= r.status_code < 500, r.text
                assert r.json()["error"]["code"] in codes, r.text
                return
            view = await wait_terminal(c, r.json()["job_id"])
            assert view["status"] == "failed", view
            assert view["error"]["code"] in codes, view
            events = await follow(c, r.json()["job_id"])
            assert events[-1].type == "error" and events[-1].data["code"] == view["error"]["code"]

    run(go())


def test_service_still_answers_after_bad_inputs(service: str) -> None:
    async def go() -> None:
        async with SR3DClient(service) as c:
            res = await c.run(bottle_request(max_tokens=3))
            assert_clean_stream(res)
            assert res.ok
            assert (await c.get_json("/readyz")).status_code == 200

    run(go())
