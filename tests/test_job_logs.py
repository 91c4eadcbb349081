"""Every log line of a job carries its id (service/logging.py), as the JSON lines the processes write:

* the worker: lines of a job's task, of the threads it starts (asyncio.to_thread: PIL decoding the
  image; the engine's prepare pool through run_in_executor), for a done, a failed and a concurrent job;
* the gateway: every request about a job (submit once the id exists, GET, events, cancel, the OpenAI
  chat route), access lines included, and no id on a request about none (no leak between requests of
  one keep-alive connection).
Real Redis, the real tiny engine and pipeline, real uvicorn on loopback; the lines are the records the
real JsonFormatter writes.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from service.logging import JsonFormatter
from service.schemas import BoxRegion, GenerationOptions, JobSpec, JobStatus
from service.settings import Settings
from tests.conftest import run_gateway
from tests.test_gateway_api import image_form, png_bytes
from tests.test_worker_loop import Harness, _run, data_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(240)


class Lines(logging.Handler):
    """The JSON lines the service would write, with the thread and task each came from."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # not on an event loop's thread
            task = None
        line = json.loads(self.format(record))
        line["_thread"], line["_task"] = threading.current_thread().name, task.get_name() if task else None
        self.lines.append(line)


@contextmanager
def captured(level: int) -> Iterator[Lines]:
    root = logging.getLogger()
    handler, old_level = Lines(), root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


# --------------------------------------------------------------------------------------------------
# Worker


async def _image_job(h: Harness) -> str:
    jid = uuid.uuid4().hex
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(buf, format="PNG")
    await h.blobs.put(f"{jid}/media", buf.getvalue())
    await h.jobs.submit(JobSpec(job_id=jid, media_kind="image", media_blob=f"{jid}/media", media_hash="h-img",
                                media_filename="a.png", question="How far is <region0> from the camera?",
                                regions=[[BoxRegion(frame=0, box=[1, 1, 30, 30])]],
                                options=GenerationOptions(max_tokens=4), created_at=time.time()))
    return jid


def test_every_worker_line_of_a_job_carries_its_id(data_dir: Path, redis_url: str) -> None:  # noqa: F811
    async def body(h: Harness) -> None:
        # Model code logging while it prepares a request, in the engine's own thread pool.
        engine = h.worker.engine
        prepare = engine.model.prepare

        def logged_prepare(query: Any) -> Any:
            logging.getLogger("model.prepare").debug("preparing the request")
            return prepare(query)

        engine.model.prepare = logged_prepare
        with captured(logging.DEBUG) as cap:
            h.start()
            image = await _image_job(h)
            video = (await h.submit(max_tokens=4)).job_id
            bad = (await h.submit(media=b"this is a text file, not an mp4\n" * 10)).job_id
            views = {j: await h.wait_terminal(j) for j in (image, video, bad)}
            await h.stop()  # every job's lines are written
        assert views[image].status == views[video].status == JobStatus.done and views[bad].status == JobStatus.failed
        ours = {image, video, bad}
        # The worker's lines: its event loop's (not the heartbeat's) and its pools' threads (asyncio_*:
        # to_thread, sr3d-*: the engine's); a thread some earlier test left behind is not the worker.
        lines = [ln for ln in cap.lines if ln["_task"] != "sr3d-heartbeat"
                 and (ln["_thread"] == "MainThread" or ln["_thread"].startswith(("asyncio_", "sr3d-")))]
        started = next(i for i, ln in enumerate(lines) if ln["message"] == "job started")
        during = lines[started:]
        # Every line from the first job's start to the last job's end names one of the jobs...
        assert all(ln.get("job_id") in ours for ln in during), [(ln["logger"], ln["message"]) for ln in during
                                                               if ln.get("job_id") not in ours]
        # ... the right one where the line says whose it is (a job's task, and the job's own lines) ...
        for ln in during:
            if ln["_task"] and ln["_task"].startswith("job-"):
                assert ln["job_id"] == ln["_task"][4:], ln
        messages = {j: [ln["message"] for ln in during if ln.get("job_id") == j] for j in ours}
        assert messages[image][0] == messages[video][0] == messages[bad][0] == "job started"
        assert messages[image][-1] == messages[video][-1] == "job done" and messages[bad][-1] == "job failed: bad input"
        # ... and lines from threads the job started carry it: PIL decoding the image (asyncio.to_thread),
        # the engine's prepare pool (run_in_executor), for each job that reached the engine.
        pil = [ln for ln in during if ln["logger"].startswith("PIL.")]
        assert pil and all(ln["job_id"] == image and ln["_thread"] != "MainThread" for ln in pil)
        prepared = [ln for ln in during if ln["logger"] == "model.prepare"]
        assert sorted(ln["job_id"] for ln in prepared) == sorted([image, video])
        assert all(ln["_thread"].startswith("sr3d-prepare") for ln in prepared)

    _run(data_dir, redis_url, body)


# --------------------------------------------------------------------------------------------------
# Gateway


@contextmanager
def uvicorn_lines_to_root() -> Iterator[None]:
    """uvicorn's loggers as setup_logging leaves them for `sr3d gateway` (through the root logger, access
    lines at INFO), whatever an earlier uvicorn.Config in this process configured; restored afterwards."""
    saved = []
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.propagate, lg.level))
        lg.handlers[:], lg.propagate = [], True
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, handlers, propagate, level in saved:
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(level)


def gateway_with_access_log(redis_url: str, **overrides: Any) -> Any:
    """The gateway as `sr3d gateway` runs it: uvicorn's own logging off (log_config=None), so its access
    lines go through the root logger like every other line."""
    return run_gateway(redis_url, uvicorn_options={"log_config": None, "access_log": True}, **overrides)


def _chat_body() -> dict[str, Any]:
    import base64

    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    return {"model": Settings().served_model_name,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "How far is <region0>?"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            "regions": [[{"frame": 0, "box": [1, 1, 8, 8]}]], "max_tokens": 4}


def test_every_gateway_line_about_a_job_carries_its_id(redis_url: str) -> None:
    with captured(logging.INFO) as cap, uvicorn_lines_to_root(), \
            gateway_with_access_log(redis_url, wait_timeout_s=0.5) as base:
        with httpx.Client(base_url=base, timeout=30) as c:  # one keep-alive connection
            submitted = c.post("/v1/spatial-qa", **image_form())
            job = submitted.json()["job_id"]
            assert c.get(f"/v1/spatial-qa/{job}").status_code == 200
            assert c.delete(f"/v1/spatial-qa/{job}").status_code == 202
            assert c.get(f"/v1/spatial-qa/{job}/events").status_code == 200  # the whole stream, to `error`
            assert c.get("/healthz").status_code == 200
            chat = c.post("/v1/chat/completions", json=_chat_body())
            assert chat.status_code == 504  # no worker: the job runs on after the wait
            chat_job = chat.headers["x-sr3d-job-id"]
            assert c.get("/healthz").status_code == 200
    lines = cap.lines
    by_request = {
        ('"POST /v1/spatial-qa', job), (f'"GET /v1/spatial-qa/{job} ', job), (f'"DELETE /v1/spatial-qa/{job} ', job),
        (f'"GET /v1/spatial-qa/{job}/events', job), ('"POST /v1/chat/completions', chat_job),
    }
    for needle, want in by_request:
        [line] = [ln for ln in lines if ln["logger"] == "uvicorn.access" and needle in ln["message"]]
        assert line.get("job_id") == want, line
    health = [ln for ln in lines if ln["logger"] == "uvicorn.access" and "/healthz" in ln["message"]]
    assert len(health) == 2 and not any("job_id" in ln for ln in health)  # nothing leaks into the next request
    submits = [ln for ln in lines if ln["message"] == "job submitted"]
    assert sorted(ln["job_id"] for ln in submits) == sorted([job, chat_job])
    # Every line on a request's task that is not about a job is one of the /healthz ones: no line of a
    # job's request went out without its id.
    untagged = [ln for ln in lines if "job_id" not in ln and ln["_task"] and ln["logger"] != "uvicorn.error"]
    assert untagged == health, untagged
