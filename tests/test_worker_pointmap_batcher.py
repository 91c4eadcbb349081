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
