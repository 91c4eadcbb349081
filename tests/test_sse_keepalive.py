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

import pytest

from loadtests.client import JobRequest, Media, SR3DClient, box_regions
from tests.conftest import run_gateway
from tests.test_gateway_api import IMG
from tests.test_gateway_sse import Driver, answer

pytestmark = pytest.mark.timeout(120)

PING_S = 0.2
QUIET_S = 4 * PING_S  # the job says nothing for several ping intervals after `queued`


@pytest.fixture
def slow_env(redis_url: str) -> Iterator[tuple[str, Driver]]:
    driver = Driver(redis_url)
    with run_gateway(redis_url, sse_ping_s=PING_S) as base:
        yield base, driver
    driver.close()


def play_slow_worker(driver: Driver, tokens: list[str]) -> threading.Thread:
    """Claim the next job, stay quiet for QUIET_S, then answer it with `tokens`."""

    def work() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            [d] = driver.call(driver.queue.claim("slow-worker", 1, 100)) or [None]
            if d is not None:
                time.sleep(QUIET_S)
                answer(driver, d.job.job_id, tokens)
                driver.call(driver.queue.ack(d.entry_id))
                return

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


def test_load_client_sees_no_ping_events_and_no_duplicate_ids(slow_env: tuple[str, Driver]) -> None:
    base, driver = slow_env
    worker = play_slow_worker(driver, ["It ", "is ", "far."])

    async def go() -> object:
        async with SR3DClient(base) as client:
            req = JobRequest(Media("image", "scene.png", IMG, "image/png"), "How far is <region0>?",
                             box_regions([(0, [1, 1, 8, 8])]))
            return await client.run(req)

    res = asyncio.run(go())
    worker.join(10)
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
    worker = play_slow_worker(driver, ["About ", "2 m."])
    rc = sr3d(["ask", str(image), "How far is <region0>?", "--region", "0:1,1,5,5", "--url", base])
    worker.join(10)
    assert rc == 0, capsys.readouterr().err
    assert capsys.readouterr().out == "About 2 m.\n"
