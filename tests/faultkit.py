"""Shared pieces of the fault-injection tests (tests/test_faults_*.py and the other tests that kill
processes mid-job): the settings and request mix they run, the client-view verdict over many jobs, and
what a gateway says it answered. Read-only peeks at the queue are `service.local_stack.queue_state`;
which worker ran a job is `JobResult.started_by` and `service.consumer_name.consumer_is`."""
from __future__ import annotations

import asyncio
import io
import random
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from service.client import JobRequest, JobResult, Media, SR3DClient
from tests.e2e_helpers import BOTTLE_NAME, HERE, find_fixture

# Small on purpose (2 shared cores): 4 sampled frames; reclaim after 2 s idle, heartbeats well inside it.
FAULT_ENV = {
    "SR3D_NUM_FRAMES": "4",
    "SR3D_MAX_TOKENS": "4096",
    "SR3D_DEVICE": "cpu",
    "SR3D_LOG_LEVEL": "WARNING",
    "SR3D_CLAIM_IDLE_MS": "2000",
    "SR3D_HEARTBEAT_S": "0.4",
    "SR3D_QUEUE_MAX": "1000",
    "SR3D_WORKER_CONCURRENCY": "2",
}


VIDEO_SIZE = (640, 360)  # w, h of the bottle clip
VIDEO_FRAMES = 250  # region `frame` indexes the upload's own frames (the worker samples around them)
IMAGE_SIZE = (320, 240)  # the TUM frame below, downscaled so a CPU run spends its time in the service
QUESTIONS = {1: "How far is <region0> from the camera?", 2: "What is the distance between <region0> and <region1>?",
             3: "Among <region0>, <region1> and <region2>, which is closest to the camera?"}


@lru_cache(maxsize=None)
def video_media() -> Media:
    return Media.from_path(find_fixture(BOTTLE_NAME), "video")


@lru_cache(maxsize=None)
def image_media() -> Media:
    from PIL import Image

    with Image.open(HERE / "data" / "rgbd" / "color" / "0000.png") as im:
        buf = io.BytesIO()
        im.convert("RGB").resize(IMAGE_SIZE).save(buf, format="PNG")
    return Media("image", "frame.png", buf.getvalue(), "image/png")


def random_box(rng: random.Random, w: int, h: int) -> list[float]:
    bw, bh = rng.randint(w // 10, w // 3), rng.randint(h // 10, h // 3)
    x0, y0 = rng.randint(0, w - bw - 1), rng.randint(0, h - bh - 1)
    return [float(x0), float(y0), float(x0 + bw), float(y0 + bh)]


def mixed_requests(n: int, max_tokens: int, seed: int = 0) -> list[JobRequest]:
    """n jobs: mostly videos with 1-3 box regions on random frames, every third one an image.

    Every answer is exactly `max_tokens` long (`ignore_eos`): the fault tests time their kills on the
    token stream, and where the demo model's random weights say EOS moves with the float summation
    order (thread count, CPU): an answer that streamed several token events on the dev box stopped
    after 14 tokens, in one event, on CI's machine.
    """
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        opts = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        if i % 3 == 2:
            reqs.append(JobRequest(image_media(), QUESTIONS[1], [[{"frame": 0, "box": random_box(rng, *IMAGE_SIZE)}]],
                                   options=opts))
            continue
        k = rng.randint(1, 3)
        regions = [[{"frame": rng.randrange(VIDEO_FRAMES), "box": random_box(rng, *VIDEO_SIZE)}] for _ in range(k)]
        reqs.append(JobRequest(video_media(), QUESTIONS[k], regions, options=opts))
    return reqs


async def run_many(url: str, reqs: Sequence[JobRequest], **kwargs: Any) -> list[JobResult]:
    async with SR3DClient(url) as c:
        return list(await asyncio.gather(*(c.run(r, **kwargs) for r in reqs)))


def verdict(results: Sequence[JobResult], expect: str = "done") -> list[str]:
    """Every accepted job reached exactly one terminal event of the expected type; nothing lost or duplicated."""
    problems = []
    for i, r in enumerate(results):
        tag = f"job {i} ({r.job_id})"
        if r.http_status != 200:
            problems.append(f"{tag}: submit HTTP {r.http_status} {r.error_body}")
            continue
        problems += [f"{tag}: {p}" for p in r.consistency_problems()]
        if r.client_error:
            problems.append(f"{tag}: {r.client_error}")
        t = r.terminal
        if t is not None and t.type != expect:
            problems.append(f"{tag}: ended with {t.type} {t.data}")
    return problems


def wait_until(pred: Callable[[], bool], timeout: float, what: str, period: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(period)


def requests_by_status_class(url: str) -> dict[str, int]:
    """What a gateway process has answered so far, from its own `sr3d_http_requests_total`
    (every request it served, including ones a test never looked at): {"2xx": n, "4xx": n, ...}."""
    import re

    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, int] = {}
    # Route labels hold braces themselves (route="/v1/spatial-qa/{job_id}"): match the status inside.
    for labels, value in re.findall(r'^sr3d_http_requests_total\{(.*)\} ([0-9.e+]+)$', text, re.M):
        status = re.search(r'status="(\d)\d\d"', labels)
        if status:
            out[f"{status.group(1)}xx"] = out.get(f"{status.group(1)}xx", 0) + int(float(value))
    return out
