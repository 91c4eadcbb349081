"""Shared by the end-to-end tests: fixture lookup, a bottle-clip request, SSE follow helpers."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from service.client import JobRequest, JobResult, Media, SR3DClient, box_regions, iter_sse

HERE = Path(__file__).parent
BOTTLE_NAME = "intel_bottles_tabletop_8s.mp4"  # 640x360, 250 frames (CC BY 4.0, see tests/data)


def find_fixture(name: str) -> Path:
    """A clip the repository ships under tests/data/video (a missing one is a broken checkout: fail, not skip)."""
    path = HERE / "data" / "video" / name
    assert path.is_file(), f"fixture clip {path} is missing from the checkout"
    return path


# Small and fast on 2 cores: 4 sampled frames, short answers unless a test needs a long one.
SERVE_ENV = {
    "SR3D_NUM_FRAMES": "4",
    "SR3D_MAX_TOKENS": "4096",
    "SR3D_DEVICE": "cpu",
    "SR3D_WORKER_CONCURRENCY": "2",
    "SR3D_LOG_LEVEL": "WARNING",
}
QUESTION = "How far is <region0> from the camera?"
BOX = (0, [250.0, 60.0, 330.0, 300.0])  # a bottle on frame 0 of the clip


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def bottle_request(**options: Any) -> JobRequest:
    return JobRequest(Media.from_path(find_fixture(BOTTLE_NAME)), QUESTION, box_regions([BOX]), options=options)


async def follow(client: SR3DClient, job_id: str, last_event_id: str | None = None) -> list[Any]:
    """Read a job's event stream (from after `last_event_id`) until its terminal event."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    events = []
    async with client._http.stream("GET", f"/v1/spatial-qa/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        async for ev in iter_sse(r):
            events.append(ev)
            if ev.type in ("done", "error"):
                break
    return events


async def wait_terminal(client: SR3DClient, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await client.get(job_id)
        if r.status_code in (502, 503):  # Redis briefly away (the restart test): retry
            await asyncio.sleep(0.2)
            continue
        assert r.status_code == 200, r.text
        view = r.json()
        if view["status"] in ("done", "failed", "cancelled"):
            return view
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} not terminal after {timeout}s")


def assert_clean_stream(res: JobResult) -> None:
    assert res.client_error is None, res.client_error
    assert res.consistency_problems() == [], res.consistency_problems()


