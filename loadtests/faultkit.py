"""Shared pieces of the fault-injection tests (tests/test_faults_*.py): request mixes, the client-view
verdict over many jobs, and read-only peeks at the Redis queue state."""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from loadtests.client import JobRequest, JobResult, SR3DClient
from loadtests.scenarios import VIDEO_FRAMES, VIDEO_SIZE, image_media, question_for, random_box, video_media

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
            reqs.append(JobRequest(image_media(), question_for(1, rng), [[{"frame": 0, "box": random_box(rng, 320, 240)}]],
                                   options=opts))
            continue
        k = rng.randint(1, 3)
        regions = [[{"frame": rng.randrange(VIDEO_FRAMES), "box": random_box(rng, *VIDEO_SIZE)}] for _ in range(k)]
        reqs.append(JobRequest(video_media(), question_for(k, rng), regions, options=opts))
    return reqs


async def run_many(url: str, reqs: Sequence[JobRequest], **kwargs: Any) -> list[JobResult]:
    async with SR3DClient(url) as c:
        return list(await asyncio.gather(*(c.run(r, **kwargs) for r in reqs)))


def started_by(res: JobResult) -> list[str]:
    """Consumer names of the workers that started this job, in order (one per delivery attempt)."""
    return [e.data.get("worker", "") for e in res.events
            if e.type == "progress" and isinstance(e.data, dict) and e.data.get("stage") == "started"]


def consumer_is(consumer: str, pid: int) -> bool:
    return consumer.endswith(f"-{pid}")  # default consumer name: {hostname}-{pid}


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


def queue_state(redis_url: str) -> dict[str, int]:
    """Consumer-group lag and pending count of the jobs stream, and the DLQ length."""
    import redis

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        groups = {g["name"]: g for g in r.xinfo_groups("sr3d:jobs")} if r.exists("sr3d:jobs") else {}
        g = groups.get("sr3d-workers", {})
        return {"lag": int(g.get("lag") or 0), "pending": int(g.get("pending") or 0),
                "dlq": int(r.xlen("sr3d:dlq")) if r.exists("sr3d:dlq") else 0}
    finally:
        r.close()


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
