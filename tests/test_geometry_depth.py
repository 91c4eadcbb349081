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
from model.geometry.project import backproject, finalize, quantile


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


# The numpy post-processing this module ran before it moved to torch (commit a336150), frozen here
# as the oracle the torch path must reproduce.
def _numpy_reference(pred: np.ndarray, K: np.ndarray, poses: np.ndarray, reference_frame: int = 0):
    d = np.nan_to_num(pred.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    floor = max(float(np.quantile(d[:, ::4, ::4].ravel(), 0.98)) / 100.0, 1e-6)
    valid = d > floor
    depth = (1.0 / np.maximum(d, np.float32(floor))).astype(np.float32)
    h, w = depth.shape[-2:]
    Kinv = np.linalg.inv(K).astype(np.float32)
    u, v = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    pix = np.stack([u, v, np.ones_like(u)], axis=-1)
    cam = (pix.reshape(-1, 3) @ np.swapaxes(Kinv, -1, -2)).reshape(len(K), h, w, 3) * depth[..., None]
    poses_w = np.linalg.inv(poses[reference_frame])[None] @ poses
    T = poses_w.astype(np.float32)
    world = (cam.reshape(len(K), -1, 3) @ np.swapaxes(T[:, :3, :3], -1, -2) + T[:, None, :3, 3]).reshape(cam.shape)
    valid = valid & np.isfinite(world).all(axis=-1)
    world = np.where(valid[..., None], world, np.float32(0))
    norms = np.sqrt((world[valid].astype(np.float64) ** 2).sum(axis=-1))
    norms = norms[np.isfinite(norms) & (norms > 0)]
    scale = float(np.median(norms)) if norms.size else 1.0
    poses_w[:, :3, 3] /= scale
    return world / scale, valid, poses_w.astype(np.float32), scale


def _disparity(f: int, h: int, w: int, seed: int) -> np.ndarray:
    d = np.random.default_rng(seed).uniform(0.0, 3.0, (f, h, w)).astype(np.float32)
    d[0, :3] = 0.0  # "sky": below the floor -> invalid
    d[-1, 0, :4] = [np.nan, np.inf, -np.inf, 1e-9]
    return d


def _rigid(seed: int, f: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    poses = np.stack([np.eye(4)] * f)
    for T in poses:
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        a, b, c, d = q
        T[:3, :3] = [[a*a+b*b-c*c-d*d, 2*(b*c-a*d), 2*(b*d+a*c)], [2*(b*c+a*d), a*a-b*b+c*c-d*d, 2*(c*d-a*b)],
                     [2*(b*d-a*c), 2*(c*d+a*b), a*a-b*b-c*c+d*d]]
        T[:3, 3] = rng.normal(size=3)
    return poses


@pytest.mark.parametrize("zero", [False, True], ids=["random", "all-zero"])
def test_torch_postprocessing_matches_the_numpy_reference(backend: DepthAnythingBackend, zero: bool) -> None:
    pred = np.zeros((3, 20, 30), np.float32) if zero else _disparity(3, 20, 30, seed=4)
    K = np.stack([intrinsics_from_fov(30, 20)] * 3)
    want_pts, want_valid, want_poses, want_scale = _numpy_reference(pred, K, np.stack([np.eye(4)] * 3))
    pm = backend.pointmaps_from_prediction(torch.from_numpy(pred))  # the backend's own device path
    assert np.isfinite(pm.points).all() and pm.points.dtype == np.float32
    assert np.array_equal(pm.valid, want_valid) and pm.valid.any() != zero
    np.testing.assert_allclose(pm.points, want_pts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pm.poses, want_poses, atol=1e-6)
    assert pm.scale == pytest.approx(want_scale, rel=1e-6)
    # Non-identity poses (the canonicalising transform the monocular path skips), numpy in.
    poses = _rigid(5, 3)
    depth, valid = disparity_to_depth(pred)
    assert isinstance(depth, np.ndarray) and isinstance(valid, np.ndarray)
    got = finalize(backproject(depth, K), valid, K, poses, metric=False, source="x", reference_frame=1)
    want_pts, want_valid, want_poses, want_scale = _numpy_reference(pred, K, poses, reference_frame=1)
    assert np.array_equal(got.valid, want_valid)
    np.testing.assert_allclose(got.points, want_pts, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.poses, want_poses, atol=1e-5)
    assert got.scale == pytest.approx(want_scale, rel=1e-6)


def test_model_path_matches_the_numpy_reference_per_request(backend: DepthAnythingBackend) -> None:
    """compute_many (network -> one resize per frame size -> torch post-processing) against the
    reference applied to each request's own prediction."""
    reqs = [_frames(2, seed=6), _frames(3, 40, 40, seed=7), _frames(1, seed=8)]
    preds = backend.predict(reqs)
    for fr, pred, pm in zip(reqs, preds, backend.compute_many(reqs, [None] * 3)):
        f, h, w = fr.shape[:3]
        assert pred.shape == (f, h, w) and pred.dtype == np.float32
        K = np.stack([intrinsics_from_fov(w, h)] * f)
        want_pts, want_valid, _, want_scale = _numpy_reference(pred, K, np.stack([np.eye(4)] * f))
        assert np.array_equal(pm.valid, want_valid)
        np.testing.assert_allclose(pm.points, want_pts, rtol=1e-5, atol=1e-6)
        assert pm.scale == pytest.approx(want_scale, rel=1e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 1001])
def test_quantile_matches_numpy_both_ways(n: int) -> None:
    x = np.random.default_rng(n).normal(size=n)
    for q in (0.0, 0.5, 0.98, 1.0):
        for select in (True, False):
            assert float(quantile(torch.from_numpy(x), q, select=select)) == pytest.approx(np.quantile(x, q), abs=1e-12)


def test_finalize_leaves_the_callers_arrays_alone() -> None:
    pts = np.full((1, 2, 2, 3), 2.0)
    pts[0, 0, 0] = np.nan
    before = pts.copy()
    pm = finalize(pts, np.ones((1, 2, 2), bool), np.eye(3)[None], np.eye(4)[None], metric=True, source="x")
    assert np.array_equal(pts, before, equal_nan=True) and (pm.points[0, 0, 0] == 0).all() and not pm.valid[0, 0, 0]


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
