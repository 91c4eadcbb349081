"""model/geometry/scene_export.py: the compact scene the page's 3D view draws."""
from __future__ import annotations

import numpy as np
import pytest

from model.geometry.scene_export import MAX_POINTS, max_scene_bytes, pack_scene, unpack_scene


def _scene(f: int = 3, h: int = 60, w: int = 80, seed: int = 0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (f, h, w, 3), dtype=np.uint8)
    points = rng.normal(size=(f, h, w, 3)).astype(np.float32)
    valid = rng.random((f, h, w)) > 0.1
    poses = np.tile(np.eye(4, dtype=np.float32), (f, 1, 1))
    poses[:, 0, 3] = np.arange(f)
    K = np.array([[50.0, 0, w / 2], [0, 50.0, h / 2], [0, 0, 1]])
    return frames, points, valid, poses, K


def test_round_trip_keeps_every_field_and_only_valid_points() -> None:
    frames, points, valid, poses, K = _scene()
    box = np.zeros((60, 80), dtype=bool)
    box[10:30, 20:40] = True
    data = pack_scene(frames, points, valid, [[(1, box)]], poses, K, [0, 12, 40], scale=2.5, metric=True,
                      max_points=5000)
    s = unpack_scene(data)
    assert len(s.positions) == 5000 and len(data) <= max_scene_bytes(5000, 3)
    assert s.size == (80, 60) and s.scale == 2.5 and s.metric and s.num_regions == 1
    assert s.frame_indices.tolist() == [0, 12, 40]
    np.testing.assert_array_equal(s.poses, poses)
    np.testing.assert_allclose(s.intrinsics, [[50, 50, 40, 30]] * 3)
    # Every exported point is a valid pixel's point, with that pixel's colour and camera.
    flat_pts, flat_rgb, flat_ok = points.reshape(-1, 3), frames.reshape(-1, 3), valid.reshape(-1)
    lookup = {tuple(p): i for i, p in enumerate(flat_pts)}
    idx = np.array([lookup[tuple(p)] for p in s.positions])
    assert flat_ok[idx].all()
    np.testing.assert_array_equal(s.colors, flat_rgb[idx])
    np.testing.assert_array_equal(s.camera, idx // (60 * 80))
    region_px = np.zeros((3, 60, 80), dtype=bool)
    region_px[1] = box
    np.testing.assert_array_equal(s.region == 1, region_px.reshape(-1)[idx])


def test_region_points_are_kept_densely_and_the_lowest_region_wins_an_overlap() -> None:
    frames, points, valid, poses, K = _scene()
    valid[:] = True
    a = np.zeros((60, 80), dtype=bool)
    a[:10, :10] = True  # 100 px
    b = np.zeros((60, 80), dtype=bool)
    b[5:15, 5:15] = True  # overlaps a on 25 px
    s = unpack_scene(pack_scene(frames, points, valid, [[(0, a)], [(0, b)]], poses, K, [0, 1, 2], max_points=1000))
    # 1000 of 14400 points (7 %), but every region pixel is there: regions are what the view is about.
    assert (s.region == 1).sum() == 100 and (s.region == 2).sum() == 75


def test_caps_and_determinism() -> None:
    frames, points, valid, poses, K = _scene(f=2, h=300, w=400)
    one = pack_scene(frames, points, valid, [], poses, K, [0, 1], max_points=10**7)
    assert len(unpack_scene(one).positions) == MAX_POINTS and len(one) <= max_scene_bytes()
    assert pack_scene(frames, points, valid, [], poses, K, [0, 1], max_points=10**7) == one
    with pytest.raises(ValueError):
        pack_scene(frames, points[:, :-1], valid, [], poses, K, [0, 1])
    with pytest.raises(ValueError):
        unpack_scene(one[:-1])
    with pytest.raises(ValueError):
        unpack_scene(b"NOTSCENE" + one[8:])
