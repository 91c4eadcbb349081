"""Idempotency-Key semantics and the one spelling of the job id, over real HTTP on loopback against a
real Redis (issue 28: a replay of a finished job said `queued`, GET said `id` where everything else
says `job_id`; issue 30 item 9: a key reused with another body replayed the wrong job, the key was
written before its job was stored and outlived it). No worker runs: the job is finished through
Jobs, the worker's own write path. Also: 400/422 refusals are counted in
sr3d_jobs_rejected_total (issue 28: the dashboard's "rejected submissions" missed them).
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis as redis_sync

from service.keys import events_key, idem_key, job_key
from service.jobs import Jobs
from service.redis_conn import redis_client
from service.schemas import JobSpec
from service.settings import Settings
from tests.conftest import run_gateway
from tests.test_gateway_api import BOX, image_form, jobs_in_queue, png_bytes, post

pytestmark = pytest.mark.timeout(120)


def queue_call(redis_url: str, fn: str, *args: Any, **settings: Any) -> Any:
    """One Jobs call on a fresh loop and connection (as a worker process would make it);
    fn="answer" ends the job with a `done` event (the terminal writer: event and final state at once)."""
    async def main() -> Any:
        redis = redis_client(redis_url)
        q = Jobs(redis, Settings(redis_url=redis_url, **settings))
        try:
            if fn == "answer":
                return await q.terminal.finish(args[0], "done", {"answer": "ok", "finish_reason": "stop"})
            return await getattr(q, fn)(*args)
        finally:
            await q.aclose()
            await q.blobs.aclose()
            await redis.aclose()

    return asyncio.run(main())


@pytest.fixture
def gw(redis_url: str) -> Iterator[str]:
    with run_gateway(redis_url, job_ttl_s=120) as base:
        yield base


def ttl(redis_url: str, key: str) -> int:
    r = redis_sync.Redis.from_url(redis_url)
    try:
        return int(r.ttl(key))
    finally:
        r.close()


def test_replay_of_a_finished_job_says_done_and_every_shape_says_job_id(gw: str, redis_url: str) -> None:
    first = post(gw, headers={"Idempotency-Key": "done-1"}, **image_form())
    assert first.status_code == 202 and first.json()["status"] == "queued"
    job_id = first.json()["job_id"]
    queue_call(redis_url, "answer", job_id, job_ttl_s=120)

    replay = post(gw, headers={"Idempotency-Key": "done-1"}, **image_form())
    assert replay.headers.get("idempotent-replayed") == "true"
    assert replay.json()["job_id"] == job_id and replay.json()["status"] == "done"

    view = httpx.get(f"{gw}/v1/spatial-qa/{job_id}", timeout=10).json()
    assert view["job_id"] == job_id and view["id"] == job_id  # `id`: the documented alias
    events = httpx.get(f"{gw}/v1/spatial-qa/{job_id}/events", timeout=10).text
    assert f'"job_id": "{job_id}"' in events or f'"job_id":"{job_id}"' in events


def test_key_reused_with_another_body_is_422_and_queues_nothing(gw: str, redis_url: str) -> None:
    a = post(gw, headers={"Idempotency-Key": "k-1"}, **image_form())
    assert a.status_code == 202
    other_question = post(gw, headers={"Idempotency-Key": "k-1"}, **image_form(question="What is <region0>?"))
    other_image = post(gw, headers={"Idempotency-Key": "k-1"},
                       files={"image": ("scene.png", png_bytes(20, 12), "image/png")},
                       data={"question": "How far is <region0> from the camera?", "regions": BOX})
    for r in (other_question, other_image):
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "idempotency_key_reused"
    same = post(gw, headers={"Idempotency-Key": "k-1"}, **image_form())
    assert same.status_code == 202 and same.json()["job_id"] == a.json()["job_id"]
    assert jobs_in_queue(redis_url) == 1


def test_openai_route_binds_its_key_to_the_body_too(gw: str, redis_url: str) -> None:
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()

    def chat(text: str) -> httpx.Response:
        body = {"model": "sr3d", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}],
            "regions": [{"frame": 0, "box": [1, 1, 8, 8]}], "stream": True}
        with httpx.stream("POST", f"{gw}/v1/chat/completions", json=body, timeout=10,
                          headers={"Idempotency-Key": "oa-k"}) as r:
            r.read() if r.status_code != 200 else None
            return r

    assert chat("What is <region0>?").status_code == 200
    r = chat("How big is <region0>?")
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"
    assert jobs_in_queue(redis_url) == 1


def test_key_expires_with_its_job(gw: str, redis_url: str) -> None:
    job_id = post(gw, headers={"Idempotency-Key": "exp-1"}, **image_form()).json()["job_id"]
    ikey = idem_key("exp-1", None)
    assert ttl(redis_url, ikey) == pytest.approx(ttl(redis_url, job_key(job_id)), abs=2)
    queue_call(redis_url, "answer", job_id, job_ttl_s=120)
    assert 0 < ttl(redis_url, ikey) <= 120 and ttl(redis_url, job_key(job_id)) <= 120

    # A queued job cancelled by the client: the key expires with it too.
    cancelled = post(gw, headers={"Idempotency-Key": "exp-2"}, **image_form()).json()["job_id"]
    assert httpx.delete(f"{gw}/v1/spatial-qa/{cancelled}", timeout=10).status_code == 202
    assert 0 < ttl(redis_url, idem_key("exp-2", None)) <= 120


def test_a_submit_that_fails_leaves_no_key_behind(redis_url: str) -> None:
    """The key is written only once the job is stored: a failed store must not leave a key that
    would make the client's retry 'replay' a job that was never queued."""
    jid = uuid.uuid4().hex
    spec = JobSpec(job_id=jid, media_kind="image", media_blob=f"{jid}/media", media_hash="0" * 64,
                   media_filename="a.png", question="where?", created_at=time.time())
    r = redis_sync.Redis.from_url(redis_url)
    try:
        r.set(events_key(jid), "not a stream")  # makes the store fail half-way (WRONGTYPE)
        with pytest.raises(Exception, match="WRONGTYPE"):
            queue_call(redis_url, "submit", spec, "fail-1", "h")
        assert r.get(idem_key("fail-1", None)) is None
        assert queue_call(redis_url, "lookup_idempotent", "fail-1", None) is None
        assert jobs_in_queue(redis_url) == 0
    finally:
        r.close()


def rejected(base: str, reason: str) -> float:
    prefix = f'sr3d_jobs_rejected_total{{reason="{reason}"}} '
    lines = [ln for ln in httpx.get(f"{base}/metrics", timeout=10).text.splitlines() if ln.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_validation_refusals_are_counted_as_rejected(gw: str) -> None:
    before = {k: rejected(gw, k) for k in ("regions_invalid", "regions_not_json", "idempotency_key_reused",
                                           "unreferenced_region", "media_missing")}
    r = post(gw, **image_form(regions=json.dumps([{"frame": 0, "box": [8, 8, 1]}])))
    assert r.status_code == 422 and r.json()["error"]["code"] == "regions_invalid"
    r = post(gw, **image_form(regions="[not json"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "regions_not_json"
    r = post(gw, **image_form(question="What is this?"))
    assert r.status_code == 422 and r.json()["error"]["code"] == "unreferenced_region"
    post(gw, headers={"Idempotency-Key": "m-1"}, **image_form())
    r = post(gw, headers={"Idempotency-Key": "m-1"}, **image_form(question="What is <region0>?"))
    assert r.status_code == 422
    # The OpenAI-compatible route counts its refusals the same way.
    r = httpx.post(f"{gw}/v1/chat/completions", timeout=10, json={
        "model": "sr3d", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "media_missing"
    # A GET of an unknown job is no submission: not counted.
    assert httpx.get(f"{gw}/v1/spatial-qa/{'0' * 32}", timeout=10).status_code == 404
    for reason, n in before.items():
        assert rejected(gw, reason) == n + 1, reason
    assert rejected(gw, "job_not_found") == 0.0


def test_every_refused_submission_is_counted_once(redis_url: str) -> None:
    """415, 429 (rate limit), 413 and 401 counted exactly once each, wherever they were raised."""
    with run_gateway(redis_url, api_keys=["k1"], rate_limit_per_min=1, rate_limit_burst=1, max_upload_mb=1,
                     metrics_public=True) as gw:
        key = {"X-API-Key": "k1"}
        before = {k: rejected(gw, k) for k in ("unsupported_media_type", "rate_limited", "upload_too_large",
                                               "unauthorized")}
        r = post(gw, headers=key, files={"image": ("a.png", b"not a png at all" * 10, "image/png")},
                 data={"question": "What is <region0>?", "regions": BOX})
        assert r.status_code == 415  # took the one token
        assert post(gw, headers=key, **image_form()).status_code == 429
        assert post(gw, **image_form()).status_code == 401
        big = {"image": ("a.png", png_bytes() + b"\0" * (2 << 20), "image/png")}
        assert post(gw, headers=key, files=big, data={"question": "q"}).status_code == 413
        for reason, n in before.items():
            assert rejected(gw, reason) == n + 1, reason
