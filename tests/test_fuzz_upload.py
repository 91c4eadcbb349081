"""Property-based fuzzing of the upload path, through real HTTP to `sr3d gateway` + `sr3d worker`.

Inputs: random bytes dressed as a video (right magic bytes, so they get past the gateway's sniff and
reach PyAV in the worker), real clips truncated at random points, mutated PNG masks, malformed
regions JSON, huge/odd numbers, arbitrary unicode questions. Properties:
* the gateway never answers 5xx and never hangs (every request has a client timeout);
* an accepted job always reaches a terminal state within a bound, and a failure carries a specific
  error code (never `dead_lettered`: bad input must be classified, not crash-retried);
* the worker process survives all of it.
Short by default (a few dozen examples per property); SR3D_LONG_TESTS=1 runs 1,000 per property.
"""
from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.local_stack import Stack
from tests.e2e_helpers import BOTTLE_NAME, find_fixture
from tests.faultkit import FAULT_ENV, VIDEO_SIZE, requests_by_status_class

LONG = os.environ.get("SR3D_LONG_TESTS") == "1"
N = 1000 if LONG else 20
FUZZ = settings(max_examples=N, deadline=None, derandomize=not LONG,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TERMINAL_BOUND_S = 90.0  # decode has its own time limit; a job past this is a hang
OPTS = json.dumps({"max_tokens": 2, "num_frames": 2})
VIDEO = find_fixture(BOTTLE_NAME)

pytestmark = pytest.mark.timeout(2400 if LONG else 300)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    env = {**FAULT_ENV, "SR3D_DATA_DIR": str(tmp_path_factory.getbasetemp() / "sr3d-faults-data"),
           "SR3D_WAIT_TIMEOUT_S": "2", "SR3D_MAX_UPLOAD_MB": "4", "SR3D_QUEUE_MAX": "100000"}
    with Stack(tmp_path_factory.mktemp("fuzz-upload"), env) as s:
        s.start_redis()
        gw, url = s.start_gateway()
        w, w_url = s.start_worker()
        s.wait_ready(url, gw)
        s.wait_ready(w_url, w)
        with httpx.Client(base_url=url, timeout=30) as http:
            yield {"http": http, "accepted": [], "sent": 0, "worker": w, "gw": gw, "w_url": w_url, "url": url}
    assert s.leaked == []


def _drain(http: httpx.Client, ids: list[str]) -> list[str]:
    """Wait until every job is terminal. A job is stuck when nothing finishes for TERMINAL_BOUND_S:
    the bound restarts whenever the backlog moves, so a long run's queue may take as long as the
    worker needs, while a job that never ends still fails within the bound once the rest are done."""
    deadline = time.monotonic() + TERMINAL_BOUND_S
    problems, pending = [], list(ids)
    while pending and time.monotonic() < deadline:
        still = []
        for jid in pending:
            view = http.get(f"/v1/spatial-qa/{jid}").json()
            if view["status"] in ("queued", "running"):
                still.append(jid)
            elif view["status"] == "failed":
                code = (view.get("error") or {}).get("code")
                if not code or code == "dead_lettered":
                    problems.append(f"{jid}: failed without a specific code: {view.get('error')}")
        if len(still) < len(pending):
            deadline = time.monotonic() + TERMINAL_BOUND_S
        pending = still
        if pending:
            time.sleep(0.25)
    return problems + [f"{jid}: not terminal, and no job finished for {TERMINAL_BOUND_S} s" for jid in pending]


def _post(svc: dict[str, Any], files: list[tuple[str, tuple[str, bytes, str]]], data: dict[str, str]) -> httpx.Response:
    r = svc["http"].post("/v1/spatial-qa", files=files, data=data)
    svc["sent"] += 1
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code == 202:
        svc["accepted"].append(r.json()["job_id"])
    else:
        body = r.json()
        assert isinstance(body["error"]["code"], str) and body["error"]["code"], body
    return r


def _video_part(content: bytes, name: str = "clip.mp4") -> tuple[str, tuple[str, bytes, str]]:
    return ("video", (name, content, "video/mp4"))


BOX_REGIONS = json.dumps([[{"frame": 0, "box": [10, 10, 100, 100]}]])
Q = "How far is <region0> from the camera?"


@FUZZ
@given(body=st.binary(min_size=0, max_size=4096))
def test_random_bytes_as_video(svc: dict[str, Any], body: bytes) -> None:
    # ftyp at offset 4 passes the mp4 sniff, so PyAV in the worker sees the garbage
    _post(svc, [_video_part(b"\x00\x00\x00\x18ftypisom" + body)], {"question": Q, "regions": BOX_REGIONS, "options": OPTS})


@FUZZ
@given(frac=st.floats(min_value=0.0, max_value=1.0), flip=st.lists(st.integers(0, 88_000), max_size=8))
def test_truncated_and_bitflipped_real_clip(svc: dict[str, Any], frac: float, flip: list[int]) -> None:
    clip = bytearray(VIDEO.read_bytes())
    cut = bytes(clip[: max(12, int(len(clip) * frac))])
    mutated = bytearray(cut)
    for i in flip:
        if 12 <= i < len(mutated):
            mutated[i] ^= 0xFF
    _post(svc, [_video_part(bytes(mutated))], {"question": Q, "regions": BOX_REGIONS, "options": OPTS})


def _mask_png(w: int, h: int) -> bytes:
    from PIL import Image

    im = Image.new("L", (w, h), 0)
    im.paste(255, (w // 4, h // 4, w // 2, h // 2))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


MASK = _mask_png(*VIDEO_SIZE)


@FUZZ
@given(cut=st.integers(8, len(MASK)), edits=st.lists(st.tuples(st.integers(8, len(MASK) - 1), st.integers(0, 255)), max_size=6),
       size=st.sampled_from([VIDEO_SIZE, (1, 1), (64, 36), (5000, 3)]))
def test_mutated_png_mask(svc: dict[str, Any], cut: int, edits: list[tuple[int, int]], size: tuple[int, int]) -> None:
    png = bytearray(MASK if size == VIDEO_SIZE else _mask_png(*size))[:cut]
    for i, v in edits:
        if i < len(png):
            png[i] = v
    regions = json.dumps([[{"frame": 3, "mask": "m0"}]])
    files = [_video_part(VIDEO.read_bytes(), VIDEO.name), ("m0", ("m0.png", bytes(png), "image/png"))]
    _post(svc, files, {"question": Q, "regions": regions, "options": OPTS})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(["frame", "box", "mask", "x"]) | st.text(max_size=5),
                                                                      children, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(regions=st.one_of(st.text(max_size=200), json_values.map(json.dumps)))
def test_malformed_regions_json(svc: dict[str, Any], regions: str) -> None:
    files = [("image", ("f.png", MASK, "image/png"))]  # a valid PNG as the image
    _post(svc, files, {"question": Q, "regions": regions, "options": OPTS})


huge = st.one_of(st.integers(min_value=-(2**80), max_value=2**80), st.sampled_from(["1e309", "-1e309", "NaN", "Infinity", "1e-400"]))


@FUZZ
@given(frame=huge, coord=huge, max_tokens=huge, num_frames=huge, seed=huge, temperature=huge)
def test_huge_numbers(svc: dict[str, Any], frame: Any, coord: Any, max_tokens: Any, num_frames: Any, seed: Any,
                      temperature: Any) -> None:
    # raw JSON text so that NaN / 1e309 / 2**80 reach the server exactly as written
    regions = f'[[{{"frame": {frame}, "box": [0, 0, {coord}, 100]}}]]'
    options = (f'{{"max_tokens": {max_tokens}, "num_frames": {num_frames}, "seed": {seed}, '
               f'"temperature": {temperature}}}')
    _post(svc, [_video_part(VIDEO.read_bytes(), VIDEO.name)], {"question": Q, "regions": regions, "options": options})


@FUZZ
@given(question=st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=300),
       filename=st.text(alphabet=st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=40))
def test_unicode_question_and_filename(svc: dict[str, Any], question: str, filename: str) -> None:
    files = [("image", (filename + ".png", MASK, "image/png"))]
    _post(svc, files, {"question": question, "regions": "[]", "options": OPTS})


def test_every_accepted_job_ended_and_the_worker_survived(svc: dict[str, Any]) -> None:
    """Runs last in this module: drains what the properties above got accepted."""
    problems = _drain(svc["http"], svc["accepted"])
    assert problems == [], problems[:10]
    assert svc["worker"].alive() and svc["gw"].alive(), (svc["worker"].log_tail(), svc["gw"].log_tail())
    assert httpx.get(f"{svc['w_url']}/healthz", timeout=5).status_code == 200
    answered = requests_by_status_class(svc["url"])
    print(f"fuzz requests sent: {svc['sent']} ({len(svc['accepted'])} accepted, all terminal); gateway answered:", answered)
    assert answered.get("5xx", 0) == 0, answered
