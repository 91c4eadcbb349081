"""The Worker in-process against a real Redis (conftest), the real tiny engine, real media decoding.

Covers what the process-level e2e tests cannot pin down exactly: the event sequence of one job,
no retry for bad input, a crashed attempt's streamed prefix not being sent twice, a redelivery of
an answered job being acked silently, and SIGTERM-style drain.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.e2e_helpers import BOTTLE_NAME, BOX, QUESTION, find_fixture
from service.blobs import make_blob_store
from service.engines.torch_engine import TorchEngine, ensure_tiny_checkpoint
from service.media.probe import probe_video
from service.pipeline import Pipeline, make_pointmap_backend
from service.jobs import Jobs
from service.keys import GROUP, JOBS, events_key
from service.redis_conn import redis_client
from service.schemas import BoxRegion, GenerationOptions, JobSpec, JobStatus
from service.settings import Settings
from service.worker import Worker, WorkerConfig, _Stream
from tests.waiting import await_until, wait_idle_past

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("worker-data")
    ensure_tiny_checkpoint(d)
    return d


class Harness:
    """A worker with its own Jobs client, run as a task; `stop()` drains it like SIGTERM."""

    def __init__(self, settings: Settings, engine: TorchEngine, backend: Any) -> None:
        self.redis = redis_client(settings.redis_url)
        self.blobs = make_blob_store(settings, self.redis)
        self.jobs = Jobs(self.redis, settings, self.blobs)
        self.settings = settings
        cfg = WorkerConfig.from_settings(settings)
        cfg.claim_block_ms = 100
        self.worker = Worker(self.jobs, engine, Pipeline(settings, self.blobs, backend), cfg, consumer="w1")
        self.task: asyncio.Task[None] | None = None

    async def submit(self, max_tokens: int = 6, job_id: str | None = None, media: bytes | None = None,
                     ignore_eos: bool = False) -> JobSpec:
        jid = job_id or uuid.uuid4().hex
        data = media if media is not None else find_fixture(BOTTLE_NAME).read_bytes()
        await self.blobs.put(f"{jid}/media", data)
        spec = JobSpec(job_id=jid, media_kind="video", media_blob=f"{jid}/media", media_hash="h-" + str(len(data)),
                       media_filename="clip.mp4", question=QUESTION, regions=[[BoxRegion(frame=BOX[0], box=BOX[1])]],
                       options=GenerationOptions(max_tokens=max_tokens, num_frames=4, ignore_eos=ignore_eos), created_at=time.time())
        await self.jobs.submit(spec)
        return spec

    def start(self) -> None:
        self.task = asyncio.create_task(self.worker.run())

    async def stop(self) -> None:
        self.worker.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 60)

    async def wait_terminal(self, jid: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = await self.jobs.get(jid)
            if view is not None and view.status.terminal:
                return view
            await asyncio.sleep(0.05)
        raise AssertionError(f"{jid} not terminal")

    async def pending(self) -> int:
        return int((await self.redis.xpending(JOBS, GROUP))["pending"])

    async def pending_after_ack(self, timeout: float = 10) -> int:
        """Pending entries once the worker had time to ack: the terminal writer acks in the script that
        ends the job, but a refused start (a redelivered job that has ended) acks on its own."""
        deadline = time.monotonic() + timeout
        while (n := await self.pending()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return n


async def _take_as_dead(h: Harness) -> str:
    """Consumer `dead` takes the next job and then never acks it: the stream entry's id."""
    await h.redis.xreadgroup(GROUP, "dead", {JOBS: ">"}, count=1)
    [p] = await h.redis.xpending_range(JOBS, GROUP, min="-", max="+", count=1, consumername="dead")
    return str(p["message_id"])


def _run(data_dir: Path, redis_url: str, body: Any, **overrides: Any) -> None:
    settings = Settings(redis_url=redis_url, data_dir=data_dir, device="cpu", worker_concurrency=2, **overrides)

    async def go() -> None:
        engine = TorchEngine(None, data_dir=str(data_dir), device="cpu", warmup=False)
        await engine.start()
        backend = await asyncio.to_thread(make_pointmap_backend, settings)
        h = Harness(settings, engine, backend)
        await h.jobs.ensure_group()
        try:
            await body(h)
        finally:
            if h.task is not None and not h.task.done():
                await h.stop()
            await engine.close()
            await h.jobs.aclose()
            await h.redis.aclose()

    asyncio.run(go())


def test_job_event_sequence_and_ack(data_dir: Path, redis_url: str) -> None:
    async def body(h: Harness) -> None:
        h.start()
        spec = await h.submit(max_tokens=8)
        view = await h.wait_terminal(spec.job_id)
        assert view.status == JobStatus.done
        events = await h.jobs.events.range(spec.job_id)
        types = [e.type for e in events]
        assert types[0] == "queued" and types[-1] == "done" and types.count("done") == 1
        stages = [e.data["stage"] for e in events if e.type == "progress"]
        assert stages == ["started", "decode", "pointmaps", "measure", "encode"]
        # the decode event says how much the decoder did for the 4 samples: from the first frame through the
        # last sample at most (the clip's keyframes decide how much seeking skips), never fewer than the samples
        decode = next(e.data for e in events if e.type == "progress" and e.data["stage"] == "decode")
        info = probe_video(find_fixture(BOTTLE_NAME))
        assert decode["frames"] == 4 and 4 <= decode["frames_decoded"] <= info.frame_count
        tokens = "".join(e.data["text"] for e in events if e.type == "token")
        done = events[-1].data
        assert done["answer"] == tokens == view.answer
        assert done["usage"]["completion_tokens"] == view.usage.completion_tokens <= 8
        assert {"queue_wait_s", "decode_s", "pointmaps_s", "encode_s", "generate_s", "total_s"} <= set(done["timings"])
        # the engine's split of encode (the torch engine: its preparation, then batch wait + vision + prefill)
        t = done["timings"]
        assert t["encode_prepare_s"] > 0 and t["encode_prefill_s"] > 0
        assert t["encode_prepare_s"] + t["encode_prefill_s"] <= t["encode_s"] + 0.01
        assert await h.pending_after_ack() == 0

    _run(data_dir, redis_url, body)


def test_bad_media_fails_once_and_is_acked(data_dir: Path, redis_url: str) -> None:
    async def body(h: Harness) -> None:
        h.start()
        spec = await h.submit(media=b"this is a text file, not an mp4\n" * 10)
        view = await h.wait_terminal(spec.job_id)
        assert view.status == JobStatus.failed and view.error.code == "unsupported_container"
        events = await h.jobs.events.range(spec.job_id)
        assert events[-1].type == "error" and events[-1].data["code"] == "unsupported_container"
        assert await h.pending_after_ack() == 0  # acked: bad input is never retried

    _run(data_dir, redis_url, body)


def test_reclaimed_job_does_not_resend_the_crashed_attempts_prefix(data_dir: Path, redis_url: str) -> None:
    async def body(h: Harness) -> None:
        # Reference answer (greedy, so any rerun reproduces it).
        h.start()
        ref = await h.submit(max_tokens=20, ignore_eos=True)  # a prefix to split, whatever the random weights say
        answer = (await h.wait_terminal(ref.job_id)).answer
        await h.stop()
        assert len(answer) > 4

        # A "crashed" attempt: consumer `dead` took the job, streamed a prefix, then vanished.
        spec = await h.submit(max_tokens=20, ignore_eos=True)
        entry_id = await _take_as_dead(h)
        assert (await h.jobs.records.start(spec.job_id, "dead", time.time())).started
        prefix = answer[: len(answer) // 2]
        await h.jobs.events.append(spec.job_id, "progress", {"stage": "started", "worker": "dead", "attempt": 1})
        await h.jobs.events.append(spec.job_id, "token", {"text": prefix})
        await wait_idle_past(h.redis, JOBS, GROUP, entry_id, h.settings.claim_idle_ms)

        h.start()  # reclaims via XAUTOCLAIM: the entry is idle past claim_idle_ms
        view = await h.wait_terminal(spec.job_id)
        assert view.status == JobStatus.done and view.answer == answer
        events = await h.jobs.events.range(spec.job_id)
        tokens = [e.data["text"] for e in events if e.type == "token"]
        assert tokens[0] == prefix and "".join(tokens) == answer  # the rest, nothing repeated
        assert [e.type for e in events].count("done") == 1
        starts = [e.data for e in events if e.type == "progress" and e.data["stage"] == "started"]
        assert [s["worker"] for s in starts] == ["dead", "w1"] and starts[1]["attempt"] == 2
        assert await h.pending_after_ack() == 0

    _run(data_dir, redis_url, body, claim_idle_ms=300)


def test_redelivery_of_an_answered_job_is_just_acked(data_dir: Path, redis_url: str) -> None:
    async def body(h: Harness) -> None:
        spec = await h.submit(max_tokens=4)
        entry_id = await _take_as_dead(h)
        assert (await h.jobs.records.start(spec.job_id, "dead", time.time())).started
        # The dead worker (an older version, which wrote the two apart) wrote the `done` event, then
        # died before the record's final state and the ack; its entry is idle past claim_idle_ms.
        done = {"answer": "x", "usage": {}, "timings": {}, "finish_reason": "stop", "job_id": spec.job_id}
        await h.redis.xadd(events_key(spec.job_id), {"type": "done", "data": json.dumps(done)})
        await wait_idle_past(h.redis, JOBS, GROUP, entry_id, h.settings.claim_idle_ms)
        h.start()
        view = await h.wait_terminal(spec.job_id)
        assert view.status == JobStatus.done and view.answer == "x"
        assert await h.pending_after_ack() == 0
        events = await h.jobs.events.range(spec.job_id)
        assert [e.type for e in events] == ["queued", "done"]  # the worker added nothing: it repaired the record

    _run(data_dir, redis_url, body, claim_idle_ms=300)


def test_stop_drains_in_flight_jobs(data_dir: Path, redis_url: str) -> None:
    async def body(h: Harness) -> None:
        h.start()
        spec = await h.submit(max_tokens=400)

        async def started() -> bool:
            return (await h.jobs.get(spec.job_id)).status != JobStatus.queued

        await await_until(started, f"job {spec.job_id} taken by the worker", 60)
        await h.stop()  # like SIGTERM: stop claiming, finish what is running
        view = await h.jobs.get(spec.job_id)
        assert view.status == JobStatus.done
        assert await h.pending_after_ack() == 0

    _run(data_dir, redis_url, body)


def test_stream_prefix_logic() -> None:
    s = _Stream(client="Hello wo")
    s.text = "Hel"
    assert s.take(final=False) == ("", False)  # catching up with what the client has
    s.text = "Hello world"
    assert s.take(final=False) == ("rld", False)
    s.text = "Hello world!"
    assert s.take(final=True) == ("!", False)
    d = _Stream(client="abc")
    d.text = "abX"
    assert d.take(final=False) == ("abX", True)  # diverged: client must reset
