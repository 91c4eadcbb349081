"""The job protocol's guarantees (service/jobs/), against a real redis-server and a real gateway:

* one writer of a job's end: outcomes that race (the worker's done / fail / cancel, a takeover's done,
  a dead letter, the client's cancel) leave exactly one terminal event, the first one written, and a
  record whose final state is what that event says; every loser is told which event won;
* one view of a finished job: the answer of `?wait=true`, GET, and GET after a record left unfinished
  (an older version wrote the event and the record apart) was repaired, by the gateway or a worker;
* Redis key names are spelled in service/keys.py only.
"""
from __future__ import annotations

import ast
import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service import metrics
from service.jobs import JobHandle, Jobs
from service.jobs.view import final_state
from service.keys import events_key
from service.schemas import JobStatus
from tests.conftest import run_gateway
from tests.test_gateway_api import image_form
from tests.test_gateway_sse import Driver
from tests.test_queue_redis import run, spec

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]

# What a terminal event sets on the record (view.final_state), as JobView fields.
FINAL = ("status", "answer", "finish_reason", "region_mode", "answer_mode", "measurements", "error", "usage", "timings")


def _final(view: Any) -> dict[str, Any]:
    dumped = view.model_dump(mode="json") if not isinstance(view, dict) else view
    return {k: dumped[k] for k in FINAL}


async def _running(q: Jobs, consumer: str = "w1") -> JobHandle:
    """A job submitted (with an upload), claimed and started by `consumer`."""
    job = spec()
    await q.blobs.put(job.media_blob, b"png")
    await q.submit(job)
    [h] = await q.claim(consumer, 1, 100)
    assert h.job_id == job.job_id and await h.start()
    return h


# --------------------------------------------------------------------------------------------------
# One terminal writer


def test_racing_outcomes_leave_one_terminal_event_and_a_record_that_matches_it(redis_url: str) -> None:
    async def body(redis: Any, make: Any) -> None:
        q = make()
        for _ in range(12):
            h = await _running(q)
            takeover = JobHandle(q, h.delivery, "w2")  # a reclaiming worker, running the same job
            finished = metrics.JOBS_FINISHED.labels(status="done")._value.get() + sum(
                metrics.JOBS_FINISHED.labels(status=s)._value.get() for s in ("failed", "cancelled"))
            results = await asyncio.gather(
                h.done("first", usage={"prompt_tokens": 3, "completion_tokens": 2}, region_mode="marks", answer_mode="model"),
                h.fail("media_invalid", "bad bytes", timings={"decode_s": 0.1}),
                h.cancelled(answer="fir", usage={"prompt_tokens": 3, "completion_tokens": 1}, finish_reason="abort"),
                takeover.done("second"),
                q.queue.dead_letter(h.entry_id, h.job_id, 9),
                q.request_cancel(h.job_id),
            )
            ends, cancel = results[:5], results[5]
            events = await q.events.range(h.job_id)
            terminal = [e for e in events if e.terminal]
            assert len(terminal) == 1 and events[-1] == terminal[0]
            won = terminal[0]
            # Exactly one writer wrote it; every other one was told which event won.
            assert [r.outcome for r in ends].count("written") == 1
            assert all(r.event is not None and (r.event.id, r.event.type) == (won.id, won.type) for r in ends)
            # The client's cancel of a running job only asks; it is refused once the job has ended.
            assert won.data.get("code") != "cancelled" or won.data.get("answer") == "fir"
            assert cancel is (await q.get(h.job_id)).cancel_requested
            # The record says what the event says, and the job left the queue with its outcome.
            view = await q.get(h.job_id)
            assert view.status.terminal and view.finished_at is not None
            want = final_state(won)
            got = view.model_dump(mode="json")
            assert {k: got[k] for k in want} == want
            assert (await q.stats())["pending"] == 0
            assert not await q.blobs.exists(h.job.media_blob)
            after = metrics.JOBS_FINISHED.labels(status="done")._value.get() + sum(
                metrics.JOBS_FINISHED.labels(status=s)._value.get() for s in ("failed", "cancelled"))
            assert after == finished + 1  # counted once

    run(redis_url, body)


def test_the_first_outcome_wins_and_a_later_one_changes_nothing(redis_url: str) -> None:
    async def body(redis: Any, make: Any) -> None:
        q = make()
        h = await _running(q)
        first = await h.done("2 m", usage={"prompt_tokens": 1, "completion_tokens": 1}, finish_reason="stop")
        assert first.written and first.event is not None and first.event.data["job_id"] == h.job_id
        before = (await q.get(h.job_id)).model_dump()
        for later in (h.fail("engine", "late"), h.cancelled(answer=""), q.queue.dead_letter(h.entry_id, h.job_id, 5)):
            res = await later
            assert res.outcome == "ended" and res.event is not None and res.event.id == first.event.id
        assert await q.request_cancel(h.job_id) is False
        assert (await q.get(h.job_id)).model_dump() == before
        assert [e.type for e in await q.events.range(h.job_id)] == ["queued", "done"]
        # A gone record gets nothing written (an event stream recreated without a TTL would leak).
        gone = spec()
        res = await q.terminal.finish(gone.job_id, "done", {"answer": "x"})
        assert res.outcome == "missing" and not await redis.exists(events_key(gone.job_id))

    run(redis_url, body)


def test_a_queued_cancel_racing_a_start_ends_one_way_only(redis_url: str) -> None:
    async def body(redis: Any, make: Any) -> None:
        q = make()
        for _ in range(20):
            job = spec()
            await q.submit(job)
            [h] = await q.claim("w1", 1, 100)
            cancelled, started = await asyncio.gather(q.request_cancel(job.job_id), h.start())
            assert cancelled is True  # queued or running: the cancel is taken either way
            view = await q.get(job.job_id)
            events = await q.events.range(job.job_id)
            if started:  # the worker came first: the flag is set, the worker ends it
                assert view.status is JobStatus.running and view.cancel_requested and not events[-1].terminal
                await h.cancelled(answer="", finish_reason="abort")
            else:  # the cancel came first: one terminal event, and the start acked the entry
                assert view.status is JobStatus.cancelled and [e.type for e in events] == ["queued", "error"]
            assert (await q.get(job.job_id)).status is JobStatus.cancelled
            assert [e.terminal for e in await q.events.range(job.job_id)].count(True) == 1
            assert (await q.stats())["pending"] == 0

    run(redis_url, body)


# --------------------------------------------------------------------------------------------------
# One view


DONE = {"answer": "about 2 m", "usage": {"prompt_tokens": 7, "completion_tokens": 3}, "finish_reason": "stop",
        "timings": {"total_s": 0.5, "pointmaps_backend": "multiview"}, "region_mode": "marks", "answer_mode": "grounded"}


class _Worker(Driver):
    """Jobs calls on a private event loop in a thread, as a worker process would make them."""

    def take(self, job_id: str) -> JobHandle:
        [h] = self.call(self.jobs.claim("w1", 1, 1000))
        assert h.job_id == job_id and self.call(h.start())
        return h

    def legacy_done(self, job_id: str) -> None:
        """The `done` event alone, as an older worker wrote it before dying ahead of the record's state."""
        self.call(self.redis.xadd(events_key(job_id), {"type": "done", "data": json.dumps({**DONE, "job_id": job_id})}))


def _waiting_submit(base: str, key: str, worker: _Worker) -> tuple[threading.Thread, dict[str, httpx.Response], str]:
    """POST ?wait=true in a thread; returns once the job is queued (its id)."""
    out: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: out.setdefault("r", httpx.post(
        f"{base}/v1/spatial-qa?wait=true", timeout=60, headers={"Idempotency-Key": key}, **image_form())))
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job_id = worker.call(worker.jobs.lookup_idempotent(key, None))
        if job_id and worker.call(worker.jobs.get(job_id)) is not None:
            return t, out, job_id
        time.sleep(0.01)
    raise AssertionError("the waiting submit never queued its job")


def test_wait_get_and_repair_give_one_view(redis_url: str) -> None:
    worker = _Worker(redis_url)
    try:
        with run_gateway(redis_url, wait_timeout_s=30) as base:
            # Live: the worker ends the job through its handle while a client waits.
            t, out, live = _waiting_submit(base, "live", worker)
            worker.call(worker.take(live).done(**DONE))
            t.join(60)
            waited = out["r"].json()
            assert out["r"].status_code == 200 and waited == httpx.get(f"{base}/v1/spatial-qa/{live}").json()
            assert (waited["status"], waited["answer"], waited["region_mode"], waited["answer_mode"]) == (
                "done", DONE["answer"], "marks", "grounded")

            # Legacy, repaired by the gateway: the waiting client's answer finishes the record, GET agrees.
            t, out, by_gateway = _waiting_submit(base, "legacy", worker)
            worker.take(by_gateway)
            worker.legacy_done(by_gateway)
            t.join(60)
            waited_legacy = out["r"].json()
            assert out["r"].status_code == 200 and waited_legacy["status"] == "done"
            assert waited_legacy == httpx.get(f"{base}/v1/spatial-qa/{by_gateway}").json()

            # Legacy, repaired by a worker: a redelivery's start finishes the record from the event.
            by_worker = httpx.post(f"{base}/v1/spatial-qa", timeout=30, **image_form()).json()["job_id"]
            h = worker.take(by_worker)
            worker.legacy_done(by_worker)
            assert httpx.get(f"{base}/v1/spatial-qa/{by_worker}").json()["status"] == "running"
            assert worker.call(JobHandle(worker.jobs, h.delivery, "w2").start()) is False
            repaired = httpx.get(f"{base}/v1/spatial-qa/{by_worker}").json()

            assert _final(waited) == _final(waited_legacy) == _final(repaired)
    finally:
        worker.close()


# --------------------------------------------------------------------------------------------------
# Key names


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def _key_literals(source: str) -> list[str]:
    """String literals in code (docstrings aside; f-strings' literal parts included) that spell a Redis
    key name or the consumer group."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    return [f"line {n.lineno}: {n.value[:60]!r}" for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
            and ("sr3d:" in n.value or n.value == "sr3d-workers")]


def test_redis_key_names_live_in_keys_py_only() -> None:
    found = {str(p.relative_to(ROOT)): bad for p in sorted((ROOT / "service").rglob("*.py"))
             if p != ROOT / "service" / "keys.py" and (bad := _key_literals(p.read_text()))}
    assert not found, f"Redis key names spelled outside service/keys.py: {found}"
    # The check sees what it forbids: an f-string key, a plain one, the group; not a docstring.
    snippet = '"""sr3d:job:{id} is documented here."""\nA = f"sr3d:job:{x}:events"\nB = "sr3d:dlq"\nC = "sr3d-workers"\n'
    assert len(_key_literals(snippet)) == 3
