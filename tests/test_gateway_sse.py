"""SSE over real HTTP: ids are Redis entry ids, Last-Event-ID resumes with exactly the remainder,
streams end after the terminal event, ?wait=true. Events are appended through Jobs (what a
worker does); the end-to-end test with a real worker is in test_e2e_service.py.
"""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.jobs import Jobs
from service.redis_conn import redis_client
from service.settings import Settings
from tests.conftest import run_gateway
from tests.test_gateway_api import image_form, post

pytestmark = pytest.mark.timeout(120)


def sse_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Parse an SSE body into {id, event, data} dicts (comments/pings skipped)."""
    ev: dict[str, Any] = {}
    for line in response.iter_lines():
        if not line:
            if "data" in ev:
                ev["data"] = json.loads(ev["data"])
                yield ev
            ev = {}
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(":")
            ev[key] = value[1:] if value.startswith(" ") else value


def read_all(url: str, **kw: Any) -> list[dict[str, Any]]:
    with httpx.stream("GET", url, timeout=30, **kw) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers.get("x-accel-buffering") == "no" and "content-encoding" not in r.headers
        return list(sse_events(r))


class Driver:
    """Runs Jobs calls on a private event loop in a thread, as a worker process would."""

    def __init__(self, redis_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.redis = self.call(self._client(redis_url))
        self.jobs = Jobs(self.redis, Settings(redis_url=redis_url))

    @staticmethod
    async def _client(url: str) -> Any:
        return redis_client(url)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.jobs.aclose())
        self.call(self.redis.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def env(redis_url: str) -> Iterator[tuple[str, Driver]]:
    driver = Driver(redis_url)
    with run_gateway(redis_url, wait_timeout_s=1.0) as base:
        yield base, driver
    driver.close()


def answer(driver: Driver, job_id: str, tokens: list[str]) -> None:
    q = driver.jobs
    driver.call(q.append_event(job_id, "progress", {"stage": "decode", "seconds": 0.01}))
    for t in tokens:
        driver.call(q.append_event(job_id, "token", {"text": t}))
    done = {"answer": "".join(tokens), "usage": {"prompt_tokens": 5, "completion_tokens": len(tokens)},
            "timings": {"total_s": 0.1}, "finish_reason": "stop"}
    driver.call(q.append_event(job_id, "done", done))  # the terminal writer: event and final state at once


def test_resume_with_last_event_id_returns_exactly_the_remainder(env: tuple[str, Driver]) -> None:
    base, driver = env
    job_id = post(base, **image_form()).json()["job_id"]
    answer(driver, job_id, ["It ", "is ", "1.2 ", "m."])
    url = f"{base}/v1/spatial-qa/{job_id}/events"
    full = read_all(url)
    assert [e["event"] for e in full] == ["queued", "progress", "token", "token", "token", "token", "done"]
    assert full[-1]["data"]["answer"] == "It is 1.2 m."
    ids = [e["id"] for e in full]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(set(ids)) == len(ids)
    for cut in (0, 3, 5):
        rest = read_all(url, headers={"Last-Event-ID": ids[cut]})
        assert rest == full[cut + 1 :]
    assert read_all(f"{url}?last_event_id={ids[2]}") == full[3:]
    # The header wins over the query parameter (browsers resend the header on reconnect).
    assert read_all(f"{url}?last_event_id={ids[0]}", headers={"Last-Event-ID": ids[4]}) == full[5:]


def test_events_errors(env: tuple[str, Driver]) -> None:
    base, _ = env
    job_id = post(base, **image_form()).json()["job_id"]
    r = httpx.get(f"{base}/v1/spatial-qa/{job_id}/events", headers={"Last-Event-ID": "garbage"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_last_event_id"
    r = httpx.get(f"{base}/v1/spatial-qa/{'f' * 32}/events")
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"


def test_post_streams_live_events_until_done(env: tuple[str, Driver]) -> None:
    base, driver = env
    seen: list[dict[str, Any]] = []
    form = image_form()
    with httpx.stream("POST", f"{base}/v1/spatial-qa", headers={"Accept": "text/event-stream"}, timeout=30, **form) as r:
        assert r.status_code == 200 and r.headers["location"].startswith("/v1/spatial-qa/")
        job_id = r.headers["location"].rsplit("/", 1)[1]
        for ev in sse_events(r):
            seen.append(ev)
            if ev["event"] == "queued":  # the job is live: play the worker's part now
                threading.Thread(target=answer, args=(driver, job_id, ["a", "b"]), daemon=True).start()
    assert [e["event"] for e in seen] == ["queued", "progress", "token", "token", "done"]
    # The stream names its job in the first and the last event: a client that cannot read the
    # Location header (a browser EventSource) can still resume and poll it.
    assert seen[0]["data"] == {"job_id": job_id, "position": 0}
    assert seen[-1]["data"]["job_id"] == job_id
    assert httpx.get(f"{base}/v1/spatial-qa/{job_id}").json()["answer"] == "ab"


def test_cancelled_and_progress_are_visible_with_the_job_id(env: tuple[str, Driver]) -> None:
    base, driver = env
    first = post(base, **image_form()).json()["job_id"]
    second = post(base, **image_form()).json()["job_id"]
    # The second job waits behind the first: its queued event says so.
    with httpx.stream("GET", f"{base}/v1/spatial-qa/{second}/events", timeout=30) as r:
        queued = next(sse_events(r))
    assert queued["event"] == "queued" and queued["data"] == {"job_id": second, "position": 1}
    assert httpx.delete(f"{base}/v1/spatial-qa/{second}").status_code == 202
    terminal = read_all(f"{base}/v1/spatial-qa/{second}/events")[-1]
    assert terminal["event"] == "error" and terminal["data"]["code"] == "cancelled" and terminal["data"]["job_id"] == second
    # A worker's stages show in GET as they happen (the `progress` field is not a placeholder).
    [h] = driver.call(driver.jobs.claim("w-test", 1, 100))
    assert h.job_id == first and driver.call(h.start())
    driver.call(h.progress("decode", {"seconds": 0.01, "frames": 1}))
    view = httpx.get(f"{base}/v1/spatial-qa/{first}").json()
    assert view["status"] == "running" and view["progress"] == {"stage": "decode", "stages": {"decode": {"seconds": 0.01, "frames": 1}}}


def test_wait_true_returns_the_answer_or_202_after_the_timeout(env: tuple[str, Driver]) -> None:
    base, driver = env
    r = httpx.post(f"{base}/v1/spatial-qa?wait=true", timeout=30, **image_form())
    assert r.status_code == 202 and r.json()["status"] == "queued"  # wait_timeout_s=1 and no worker

    result: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: result.setdefault("r", httpx.post(f"{base}/v1/spatial-qa?wait=true&stream=false",
                                                                          timeout=30, headers={"Idempotency-Key": "w1"},
                                                                          **image_form())))
    t.start()
    job_id = None
    for _ in range(1000):  # the job id appears under the idempotency key, then the job is queued
        job_id = driver.call(driver.jobs.lookup_idempotent("w1", None))
        if job_id and driver.call(driver.jobs.get(job_id)) is not None:
            break
        threading.Event().wait(0.01)
    assert job_id
    answer(driver, job_id, ["ok"])
    t.join(30)
    body = result["r"].json()
    assert result["r"].status_code == 200 and body["status"] == "done" and body["answer"] == "ok"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 1}


def test_sr3d_ask_streams_the_answer(env: tuple[str, Driver], tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main as sr3d

    from tests.test_gateway_api import IMG

    base, driver = env
    image = tmp_path / "room.png"
    image.write_bytes(IMG)
    mask = tmp_path / "m.png"
    mask.write_bytes(IMG)

    def play_worker() -> None:
        for _ in range(1000):
            [d] = driver.call(driver.jobs.claim("w-ask", 1, 100)) or [None]
            if d is not None:
                assert len(d.job.regions) == 2 and d.job.options.max_tokens == 5
                answer(driver, d.job.job_id, ["About ", "2 m."])
                return

    t = threading.Thread(target=play_worker, daemon=True)
    t.start()
    rc = sr3d(["ask", str(image), "How far is <region0> from <region1>?", "--region", "0:1,1,5,5",
               "--mask", f"0:{mask}", "--max-tokens", "5", "--url", base])
    t.join(10)
    assert rc == 0
    assert capsys.readouterr().out == "About 2 m.\n"
    assert sr3d(["ask", str(image), "<image> hi", "--url", base]) == 1
    assert "placeholder_in_question" in capsys.readouterr().err
