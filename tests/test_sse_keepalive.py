"""Keep-alive pings in a slow stream must not turn into events (issue 19: "duplicate event ids").

The server sends a comment (`: ping ...`) every `sse_ping_s` while a job is quiet (queued behind
others, or a long prefill under GPU load). httpx-sse 0.4 dispatches a blank-line-terminated comment
as an empty `message` event that carries the sticky last event id (upstream httpx-sse issue #35),
which the WHATWG algorithm does not dispatch (empty data buffer). The load client then counted the
same id twice, and `sr3d ask` failed to parse the empty data. These tests play a worker whose
first event after `queued` comes several ping intervals later, over real HTTP and real Redis.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.client import JobRequest, Media, SR3DClient, box_regions
from tests.conftest import run_gateway
from tests.test_gateway_api import IMG
from tests.test_gateway_sse import Driver, answer

pytestmark = pytest.mark.timeout(120)

PING_S = 0.2
QUIET_PINGS = 4  # the job says nothing for several ping intervals after `queued`


@pytest.fixture
def slow_env(redis_url: str) -> Iterator[tuple[str, Driver]]:
    driver = Driver(redis_url)
    with run_gateway(redis_url, sse_ping_s=PING_S) as base:
        yield base, driver
    driver.close()


def wait_for_pings(base: str, job_id: str, n: int) -> None:
    """Until a second client following the same job has received `n` keep-alive comments: the job has
    been quiet for several ping intervals by the server's own clock (a fixed sleep could end before
    the first ping on a loaded machine, and the test would pass without any ping to misread)."""
    seen = 0
    with httpx.stream("GET", f"{base}/v1/spatial-qa/{job_id}/events", timeout=30) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            seen += line.startswith(":")
            if seen >= n:
                return
    raise AssertionError(f"the stream of {job_id} ended after {seen} of {n} pings")


def play_slow_worker(base: str, driver: Driver, tokens: list[str], errors: list[BaseException]) -> threading.Thread:
    """Claim the next job, stay quiet for QUIET_PINGS pings, then answer it with `tokens`. A failure
    to see the pings lands in `errors` (the job is answered anyway, so the client under test ends)."""

    def work() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            [d] = driver.call(driver.jobs.claim("slow-worker", 1, 100)) or [None]
            if d is not None:
                try:
                    wait_for_pings(base, d.job.job_id, QUIET_PINGS)
                except BaseException as e:  # noqa: BLE001 - reported by the test after join()
                    errors.append(e)
                answer(driver, d.job.job_id, tokens)  # its done event goes through the terminal writer, which acks
                return
        errors.append(AssertionError("no job to claim within 30 s"))

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


def test_load_client_sees_no_ping_events_and_no_duplicate_ids(slow_env: tuple[str, Driver]) -> None:
    base, driver = slow_env
    errors: list[BaseException] = []
    worker = play_slow_worker(base, driver, ["It ", "is ", "far."], errors)

    async def go() -> object:
        async with SR3DClient(base) as client:
            req = JobRequest(Media("image", "scene.png", IMG, "image/png"), "How far is <region0>?",
                             box_regions([(0, [1, 1, 8, 8])]))
            return await client.run(req)

    res = asyncio.run(go())
    worker.join(10)
    assert not worker.is_alive() and errors == [], errors
    assert res.client_error is None, res.client_error
    assert res.consistency_problems() == []  # was ["duplicate event ids"]
    assert [e.type for e in res.events] == ["queued", "progress", "token", "token", "token", "done"]
    assert res.answer_from_tokens == "It is far."


def test_sr3d_ask_survives_keepalive_pings(slow_env: tuple[str, Driver], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main as sr3d

    base, driver = slow_env
    image = tmp_path / "room.png"
    image.write_bytes(IMG)
    errors: list[BaseException] = []
    worker = play_slow_worker(base, driver, ["About ", "2 m."], errors)
    rc = sr3d(["ask", str(image), "How far is <region0>?", "--region", "0:1,1,5,5", "--url", base])
    worker.join(10)
    assert not worker.is_alive() and errors == [], errors
    assert rc == 0, capsys.readouterr().err
    assert capsys.readouterr().out == "About 2 m.\n"
