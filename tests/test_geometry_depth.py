"""Depth Anything backend with the tiny random model (real transformers classes), and the point-map cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.geometry import (
    DepthAnythingBackend,
    PointMapBackend,
    PointMapCache,
    PointMaps,
    build_tiny_depth_model,
    cache_key,
    disparity_to_depth,
    intrinsics_from_fov,
)
from model.geometry.project import backproject, finalize


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.set_num_threads(1)
    return build_tiny_depth_model(str(tmp_path_factory.mktemp("depth")), seed=0, input_size=112)


@pytest.fixture(scope="module")
def backend(tiny_dir: str) -> DepthAnythingBackend:
    return DepthAnythingBackend(tiny_dir, device="cpu", batch_size=3)


def _frames(n: int, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, h, w, 3), dtype=np.uint8)


def test_tiny_model_reloads_identically(tiny_dir: str, backend: DepthAnythingBackend) -> None:
    again = DepthAnythingBackend(tiny_dir, device="cpu")
    fr = _frames(2)
    assert np.array_equal(backend.predict([fr])[0], again.predict([fr])[0])
    assert isinstance(backend, PointMapBackend) and not backend.metric


def test_compute_shapes_defaults_and_finiteness(backend: DepthAnythingBackend) -> None:
    fr = _frames(4)
    pm = backend.compute(fr)
    assert pm.points.shape == (4, 48, 64, 3) and pm.points.dtype == np.float32
    assert pm.valid.shape == (4, 48, 64) and pm.valid.mean() > 0.5
    assert np.isfinite(pm.points).all() and not pm.metric and pm.source == "depth-anything"
    np.testing.assert_allclose(pm.intrinsics[0], intrinsics_from_fov(64, 48), rtol=1e-6)
    np.testing.assert_allclose(pm.poses, np.broadcast_to(np.eye(4), (4, 4, 4)), atol=1e-6)
    assert abs(np.median(np.linalg.norm(pm.points[pm.valid], axis=-1)) - 1) < 1e-3
    # Points lie on the camera rays of the given intrinsics: re-projection gives the pixel back.
    K = pm.intrinsics[0].astype(np.float64)
    p = pm.points[0, 10, 20].astype(np.float64)
    uvw = K @ p
    assert np.allclose(uvw[:2] / uvw[2], [20, 10], atol=1e-3)


def test_batched_across_requests_equals_one_by_one(backend: DepthAnythingBackend) -> None:
    a, b, c = _frames(2, seed=1), _frames(3, seed=2), _frames(2, 40, 40, seed=3)  # two sizes, 7 frames
    K = intrinsics_from_fov(64, 48, 80.0)
    together = backend.compute_many([a, b, c], [None, K, None])
    alone = [backend.compute(a), backend.compute(b, K), backend.compute(c)]
    for x, y in zip(together, alone):
        np.testing.assert_allclose(x.points, y.points, atol=1e-5)
        assert np.array_equal(x.valid, y.valid)
    np.testing.assert_allclose(together[1].intrinsics[0], K, rtol=1e-6)


def test_all_zero_disparity_gives_finite_points(tmp_path: Path) -> None:
    depth, valid = disparity_to_depth(np.zeros((2, 8, 10), np.float32))
    assert np.isfinite(depth).all() and not valid.any()
    K = intrinsics_from_fov(10, 8)
    pm = finalize(backproject(depth, K), valid, np.stack([K, K]), np.stack([np.eye(4)] * 2), metric=False, source="x")
    assert np.isfinite(pm.points).all() and pm.scale == 1.0
    # The real model path: a random head without bias outputs exactly the ReLU floor, 0.
    zero_dir = build_tiny_depth_model(str(tmp_path), head_bias=-10.0, input_size=56)
    pm = DepthAnythingBackend(zero_dir, device="cpu").compute(_frames(2, 28, 28))
    assert np.isfinite(pm.points).all() and not pm.valid.any()


def test_disparity_floor_limits_far_depth() -> None:
    d = np.ones((1, 10, 10), np.float32)
    d[0, 0, 0] = 1e-9  # "sky"
    depth, valid = disparity_to_depth(d)
    assert depth.max() <= 100.0 + 1e-3 and not valid[0, 0, 0] and valid.sum() == 99


def _pm(n_bytes_frames: int) -> PointMaps:
    return PointMaps(points=np.zeros((n_bytes_frames, 4, 4, 3), np.float32), valid=np.ones((n_bytes_frames, 4, 4), bool),
                     intrinsics=np.zeros((n_bytes_frames, 3, 3), np.float32), poses=np.zeros((n_bytes_frames, 4, 4), np.float32),
                     scale=1.0, metric=False, source="t")


def test_cache_lru_by_bytes() -> None:
    one = _pm(1).nbytes
    cache = PointMapCache(max_bytes=3 * one)
    keys = [cache_key(f"h{i}", (8, (), None), "depth-anything") for i in range(4)]
    for k in keys[:3]:
        cache.put(k, _pm(1))
    assert cache.get(keys[0]) is not None  # refresh 0: 1 is now the oldest
    cache.put(keys[3], _pm(1))
    assert keys[1] not in cache and keys[0] in cache and keys[3] in cache and cache.nbytes == 3 * one
    assert cache.get(keys[1]) is None and cache.hits == 1 and cache.misses == 1
    cache.put(cache_key("big", (), "x"), _pm(10))  # larger than the cap: not stored, nothing evicted
    assert len(cache) == 3
    assert cache_key("h", (8, (1,), None), "a") != cache_key("h", (8, (2,), None), "a")


def test_cache_skips_the_backend_on_a_second_question(backend: DepthAnythingBackend) -> None:
    cache = PointMapCache()
    fr = _frames(2)
    key = cache_key("sha", (2, (), None), backend.name)
    calls = 0

    def pointmaps() -> PointMaps:
        nonlocal calls
        hit = cache.get(key)
        if hit is not None:
            return hit
        calls += 1
        value = backend.compute(fr)
        cache.put(key, value)
        return value

    first, second = pointmaps(), pointmaps()
    assert calls == 1 and first is second
