"""PointMapBatcher (the worker's depth batching) on the tiny random Depth Anything model, on the CPU."""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import torch

from model.geometry import DepthAnythingBackend, build_tiny_depth_model
from service.pipeline import PointMapBatcher


class Recording:
    """The real backend, noting how many jobs each `compute_many` call received."""

    def __init__(self, backend: DepthAnythingBackend) -> None:
        self.backend = backend
        self.calls: list[list[int]] = []

    def compute_many(self, frames: list[np.ndarray], intrinsics: list[Any]) -> list[Any]:
        self.calls.append([len(f) for f in frames])
        return self.backend.compute_many(frames, intrinsics)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> DepthAnythingBackend:
    torch.set_num_threads(1)
    return DepthAnythingBackend(build_tiny_depth_model(str(tmp_path_factory.mktemp("depth")), input_size=56),
                                device="cpu", batch_size=4)


def _frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 24, 32, 3), dtype=np.uint8)


async def _all(batcher: PointMapBatcher, jobs: list[np.ndarray]) -> list[Any]:
    try:
        return await asyncio.gather(*(batcher.compute(f) for f in jobs))
    finally:
        await batcher.close()


def test_batches_whole_jobs_up_to_the_frame_cap(backend: DepthAnythingBackend) -> None:
    rec = Recording(backend)
    jobs = [_frames(4, seed) for seed in range(5)] + [_frames(12, 9)]
    results = asyncio.run(_all(PointMapBatcher(rec, max_jobs=8, max_frames=8), jobs))
    # 4+4 | 4+4 | 4 (the 12-frame job does not fit and starts the next batch) | 12 alone (over the cap)
    assert rec.calls == [[4, 4], [4, 4], [4], [12]]
    for f, pm in zip(jobs, results):  # each job gets its own point maps back, as if computed alone
        alone = backend.compute(f)
        assert pm.points.shape == (len(f), 24, 32, 3)
        np.testing.assert_allclose(pm.points, alone.points, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(pm.valid, alone.valid)


def test_max_jobs_caps_batches_of_small_jobs(backend: DepthAnythingBackend) -> None:
    rec = Recording(backend)
    asyncio.run(_all(PointMapBatcher(rec, max_jobs=2, max_frames=128), [_frames(1, s) for s in range(5)]))
    assert rec.calls == [[1, 1], [1, 1], [1]]


def test_a_failing_batch_fails_each_of_its_jobs_and_the_batcher_goes_on(backend: DepthAnythingBackend) -> None:
    async def scenario() -> tuple[list[Any], Any]:
        batcher = PointMapBatcher(backend, max_jobs=8, max_frames=128)
        bad = np.zeros((2, 24, 32), np.uint8)  # no channel axis: the backend raises
        try:
            first = await asyncio.gather(batcher.compute(bad), batcher.compute(_frames(2, 0)), return_exceptions=True)
            return first, await batcher.compute(_frames(2, 1))
        finally:
            await batcher.close()

    first, after = asyncio.run(scenario())
    assert all(isinstance(r, Exception) for r in first)  # one batch: both jobs get its error
    assert after.points.shape == (2, 24, 32, 3)


HOLD_LIMIT_S = 30.0  # a call held for a condition that never comes gives up after this (the test then fails)


class Overlapping(Recording):
    """A backend that declares `overlaps` (a GPU one): records how many of its calls ran at the same time.

    Each call is held until `until_peak` calls have been in flight at once (the overlap the test expects,
    reached however slowly the loops get going) and the gate is open (`open_gate()`), then for `window_s`
    more (a window in which a batcher that must not overlap would show it)."""

    overlaps = True

    def __init__(self, backend: DepthAnythingBackend, until_peak: int = 1, window_s: float = 0.0) -> None:
        super().__init__(backend)
        import threading

        self.cond = threading.Condition()
        self.running = 0
        self.peak = 0
        self.until_peak = until_peak
        self.window_s = window_s
        self.gate_open = True

    def open_gate(self) -> None:
        with self.cond:
            self.gate_open = True
            self.cond.notify_all()

    def compute_many(self, frames: list[np.ndarray], intrinsics: list[Any]) -> list[Any]:
        import time

        with self.cond:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.cond.notify_all()
        try:
            with self.cond:
                self.cond.wait_for(lambda: self.peak >= self.until_peak and self.gate_open, HOLD_LIMIT_S)
            if self.window_s:
                # A sleep is right here: the test checks that NO second call starts within the window.
                time.sleep(self.window_s)
            return super().compute_many(frames, intrinsics)
        finally:
            with self.cond:
                self.running -= 1


def test_streams_run_that_many_batches_at_once_and_every_job_gets_its_own_result(backend: DepthAnythingBackend) -> None:
    rec = Overlapping(backend, until_peak=3)  # each call waits for the other two loops' calls
    jobs = [_frames(4, seed) for seed in range(6)]
    results = asyncio.run(_all(PointMapBatcher(rec, max_jobs=1, max_frames=128, streams=3), jobs))
    assert rec.peak == 3 and sorted(len(c) for c in rec.calls) == [1] * 6
    for f, pm in zip(jobs, results):
        np.testing.assert_allclose(pm.points, backend.compute(f).points, rtol=1e-5, atol=1e-6)


def test_a_backend_that_does_not_overlap_runs_one_batch_at_a_time(backend: DepthAnythingBackend) -> None:
    rec = Overlapping(backend, window_s=0.2)  # room for a wrong second loop to start a call
    rec.overlaps = False  # a CPU backend: parallel batches would only share the same cores
    asyncio.run(_all(PointMapBatcher(rec, max_jobs=1, max_frames=128, streams=3), [_frames(2, s) for s in range(4)]))
    assert rec.peak == 1 and len(rec.calls) == 4
    assert backend.overlaps is False  # the real CPU backend says so itself


def test_a_job_left_over_by_one_loop_is_cancelled_on_close(backend: DepthAnythingBackend) -> None:
    """A request a loop took but could not fit (held for its next batch) is not lost on close: it is cancelled."""
    async def scenario() -> list[Any]:
        from tests.waiting import await_until

        rec = Overlapping(backend)
        rec.gate_open = False  # calls stay in flight until the batcher is closed
        batcher = PointMapBatcher(rec, max_jobs=8, max_frames=4, streams=2)
        futs = [asyncio.ensure_future(batcher.compute(_frames(4, s))) for s in range(5)]

        async def both_loops_busy() -> bool:
            return rec.running == 2

        try:
            # both loops busy with one job each (each holding the next, which did not fit), the rest queued
            await await_until(both_loops_busy, "both batcher loops inside compute_many", 30)
            await batcher.close()
        finally:
            rec.open_gate()  # the abandoned calls' threads finish (asyncio.run waits for them)
        return await asyncio.gather(*futs, return_exceptions=True)

    out = asyncio.run(scenario())
    assert all(isinstance(r, (asyncio.CancelledError, Exception)) or hasattr(r, "points") for r in out)
    assert any(isinstance(r, asyncio.CancelledError) for r in out)


def test_a_backend_that_does_not_merge_jobs_gets_one_job_per_batch(backend: DepthAnythingBackend) -> None:
    from model.geometry.multiview import MultiViewBackend

    rec = Recording(backend)
    rec.merges_jobs = False  # type: ignore[attr-defined]  # like Depth Anything 3: one pass per job anyway
    asyncio.run(_all(PointMapBatcher(rec, max_jobs=8, max_frames=128), [_frames(1, s) for s in range(3)]))
    assert rec.calls == [[1], [1], [1]]
    assert MultiViewBackend.merges_jobs is False
