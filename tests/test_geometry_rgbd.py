"""Exact geometry: back-projection, canonicalisation, normalisation, RGB-D scenes (synthetic + real TUM)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from service.api.errors import status_for
from PIL import Image

from model.errors import CodedError
from model.geometry.routes import scene_pointmaps
from model.geometry import (
    SceneError,
    backproject,
    canonicalize,
    intrinsics_from_fov,
    load_scene_npz,
    normalize_scale,
    pointmaps_from_rgbd,
    rotate_intrinsics,
    scale_intrinsics,
)

RGBD = Path(__file__).parent / "data" / "rgbd"


def _rot(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def _synthetic_scene(num: int = 3, h: int = 24, w: int = 32):
    """Cameras looking at the world plane z = 0 from above; depth by exact ray casting."""
    K = np.array([[30.0, 0, 15.5], [0, 28.0, 11.5], [0, 0, 1]])
    rng = np.random.default_rng(0)
    poses, depths, world = [], [], []
    u, v = np.meshgrid(np.arange(w, dtype=float), np.arange(h, dtype=float))
    pix = np.stack([u, v, np.ones_like(u)], -1)
    for i in range(num):
        # Camera axis points down (-z world) with some tilt; OpenCV camera: z forward.
        R = _rot(np.array([1.0, 0, 0]), np.pi) @ _rot(rng.normal(size=3), 0.2)
        t = np.array([rng.uniform(-1, 1), rng.uniform(-1, 1), 3.0 + i])
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R, t
        rays_cam = pix @ np.linalg.inv(K).T  # z = 1 in the camera
        rays_w = rays_cam @ R.T
        s = -t[2] / rays_w[..., 2]  # plane z = 0: camera z-depth == s since rays_cam.z == 1
        depths.append(s)
        world.append(t + rays_w * s[..., None])
        poses.append(T)
    return np.array(depths), K, np.array(poses), np.array(world)


def test_backproject_matches_pinhole_formula() -> None:
    K = np.array([[500.0, 0, 319.5], [0, 480.0, 239.5], [0, 0, 1]])
    depth = np.full((480, 640), 2.0)
    pts = backproject(depth, K)
    assert np.allclose(pts[240, 320], [(320 - 319.5) * 2 / 500, (240 - 239.5) * 2 / 480, 2.0])
    assert np.allclose(pts[0, 0], [-319.5 * 2 / 500, -239.5 * 2 / 480, 2.0])


def test_rgbd_reproduces_ground_truth_after_canonicalisation() -> None:
    depth, K, poses, world = _synthetic_scene()
    pm = pointmaps_from_rgbd(depth, K, poses, reference_frame=1)
    ref_inv = np.linalg.inv(poses[1])
    expected = world @ ref_inv[:3, :3].T + ref_inv[:3, 3]
    assert pm.metric and pm.valid.all() and pm.points.dtype == np.float32
    np.testing.assert_allclose(pm.metric_points(), expected, atol=1e-4)
    # Poses: reference is identity; poses map camera points onto the same canonical points.
    np.testing.assert_allclose(pm.poses[1], np.eye(4), atol=1e-6)
    cam0 = backproject(depth[0], K)
    via_pose = cam0 @ pm.poses[0, :3, :3].T + pm.poses[0, :3, 3] * pm.scale  # translation is normalised
    np.testing.assert_allclose(via_pose, expected[0], atol=1e-4)
    # Normalised: the median distance of valid points is 1.
    assert abs(np.median(np.linalg.norm(pm.points[pm.valid], axis=-1)) - 1) < 1e-5


def test_canonicalize_and_normalize_scale_directly() -> None:
    pts = np.ones((2, 1, 1, 3))
    T = np.stack([np.eye(4), np.eye(4)])
    T[1, :3, 3] = [1, 2, 3]
    world, poses = canonicalize(pts, T, reference_frame=1)
    np.testing.assert_allclose(world[0, 0, 0], [0, -1, -2])
    np.testing.assert_allclose(poses[1], np.eye(4))
    valid = np.array([[[True]], [[False]]])
    scaled, s = normalize_scale(world, valid)
    assert s == pytest.approx(np.sqrt(5)) and np.isfinite(scaled).all()
    _, s_none = normalize_scale(world, np.zeros_like(valid))
    assert s_none == 1.0


def test_holes_are_invalid_and_finite() -> None:
    depth, K, poses, _ = _synthetic_scene(num=2)
    depth[0, :5] = 0
    pm = pointmaps_from_rgbd(depth, K, poses)
    assert not pm.valid[0, :5].any() and pm.valid[0, 5:].all()
    assert np.isfinite(pm.points).all() and (pm.points[0, :5] == 0).all()


def test_intrinsics_helpers() -> None:
    K = intrinsics_from_fov(640, 480, 90.0)
    assert K[0, 0] == pytest.approx(320.0) and K[0, 2] == pytest.approx(319.5)
    half = scale_intrinsics(K, 0.5, 0.5)
    assert half[0, 0] == pytest.approx(160.0) and half[0, 2] == pytest.approx(159.5)
    # Rotating the image by 90 CCW: back-projecting the rotated depth gives the same 3D points up to the
    # camera rotation (x_new = y_old, y_new = -x_old).
    depth = np.random.default_rng(1).uniform(1, 2, (4, 6))
    K = np.array([[5.0, 0, 2.4], [0, 6.0, 1.3], [0, 0, 1]])
    p_old = backproject(depth, K)
    p_new = backproject(np.rot90(depth), rotate_intrinsics(K, 90, (6, 4)))
    back = np.rot90(p_new, k=-1)
    np.testing.assert_allclose(back[..., 2], p_old[..., 2])
    np.testing.assert_allclose(back[..., 0], p_old[..., 1], atol=1e-9)
    np.testing.assert_allclose(back[..., 1], -p_old[..., 0], atol=1e-9)
    assert np.allclose(rotate_intrinsics(K, 360, (6, 4)), K)


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_scene_npz_roundtrip_and_backend() -> None:
    depth, K, poses, world = _synthetic_scene(num=2)
    scene = load_scene_npz(_npz(depth=(depth * 5000).astype(np.uint16), intrinsics=K, poses=poses,
                                depth_scale=np.float32(5000), frame_indices=np.array([0, 6])))
    assert scene.depth.shape == (2, 24, 32) and list(scene.frame_indices) == [0, 6]
    assert np.abs(scene.depth - depth).max() < 1e-3
    pm = scene_pointmaps("rgbd", scene.depth, scene.intrinsics, scene.poses, np.zeros((2, 24, 32, 3), np.uint8)).pointmaps
    assert pm.source == "rgbd" and np.abs(pm.metric_points() - world @ np.linalg.inv(poses[0])[:3, :3].T
                                          - np.linalg.inv(poses[0])[:3, 3]).max() < 2e-3
    with pytest.raises(SceneError) as e:
        scene_pointmaps("rgbd", scene.depth, scene.intrinsics, scene.poses, np.zeros((3, 24, 32, 3), np.uint8))
    assert e.value.code == "scene_size_mismatch"


@pytest.mark.parametrize(
    "mutate,code",
    [
        (lambda a: a.pop("intrinsics"), "scene_missing_key"),
        (lambda a: a.update(depth=np.zeros((2, 3), np.uint16)), "scene_missing_key"),  # uint16 needs depth_scale
        (lambda a: a.update(depth=np.zeros((2, 2, 2, 2), np.float32)), "scene_bad_shape"),
        (lambda a: a.update(depth=np.zeros((2, 4, 4), np.int64)), "scene_bad_dtype"),
        (lambda a: a.update(depth=np.full((2, 4, 4), np.nan, np.float32)), "scene_bad_value"),
        (lambda a: a.update(depth=np.zeros((65, 1, 1), np.float32)), "scene_too_large"),
        (lambda a: a.update(intrinsics=np.zeros((3, 3))), "scene_bad_value"),
        (lambda a: a.update(intrinsics=np.eye(4)), "scene_bad_shape"),
        (lambda a: a.update(poses=np.stack([np.eye(4), 2 * np.eye(4)])), "scene_bad_value"),
        (lambda a: a.update(poses=np.eye(4)[None]), "scene_bad_shape"),
        (lambda a: a.update(frame_indices=np.array([3, 1])), "scene_bad_value"),
    ],
)
def test_bad_scenes(mutate, code) -> None:
    arrays = {"depth": np.ones((2, 4, 4), np.float32), "intrinsics": np.eye(3), "poses": np.stack([np.eye(4)] * 2)}
    mutate(arrays)
    with pytest.raises(SceneError) as e:
        load_scene_npz(_npz(**arrays))
    assert e.value.code == code and e.value.message and 400 <= status_for(e.value.code) < 500
    assert isinstance(e.value, CodedError)


def test_scene_without_poses_loads_for_pose_recovery() -> None:
    scene = load_scene_npz(_npz(depth=np.ones((2, 4, 4), np.float32), intrinsics=np.eye(3)))
    assert scene.poses is None and scene.depth.shape == (2, 4, 4)
    with pytest.raises(SceneError) as e:  # the exact-geometry backend cannot use it
        scene_pointmaps("rgbd", scene.depth, scene.intrinsics, scene.poses, np.zeros((2, 4, 4, 3), np.uint8))
    assert e.value.code == "scene_missing_key"


def test_not_an_npz_and_pickles_refused() -> None:
    with pytest.raises(SceneError) as e:
        load_scene_npz(b"PK\x03\x04 definitely not a zip")
    assert e.value.code == "invalid_scene_file"
    obj = np.empty(2, dtype=object)
    with pytest.raises(SceneError) as e:
        load_scene_npz(_npz(depth=np.ones((1, 2, 2), np.float32), intrinsics=np.eye(3), poses=np.eye(4)[None], x=obj))
    assert e.value.code == "scene_bad_dtype"


def test_real_tum_frames_reproject_consistently() -> None:
    """Frame 1 (TUM fr1_rpy, ground-truth poses) lifted into the canonical frame and projected into
    frame 0 must land where frame 0 measured the same depth: median |dz| ~1 cm (SOURCE.md: 0.65 cm)."""
    cams = json.loads((RGBD / "cameras.json").read_text())
    K = np.array(cams["intrinsics"]["K"])
    depth = np.stack([np.asarray(Image.open(RGBD / "depth" / f"000{i}.png"), dtype=np.float64) / 5000 for i in (0, 1)])
    poses = np.array([cams["frames"][i]["T_world_cam"] for i in (0, 1)])
    pm = pointmaps_from_rgbd(depth, K, poses, reference_frame=0)
    pts = pm.metric_points()[1][pm.valid[1]].astype(np.float64)  # frame-1 points in frame-0 camera
    uvw = pts @ K.T
    u, v = np.round(uvw[:, 0] / uvw[:, 2]).astype(int), np.round(uvw[:, 1] / uvw[:, 2]).astype(int)
    inside = (u >= 0) & (u < 640) & (v >= 0) & (v < 480) & (uvw[:, 2] > 0)
    measured = depth[0][v[inside], u[inside]]
    ok = measured > 0
    dz = np.abs(measured[ok] - pts[inside][ok, 2])
    assert ok.sum() > 100_000
    assert np.median(dz) < 0.02
    # Control: ignoring the motion (poses swapped for identity) is clearly worse.
    still = pointmaps_from_rgbd(depth, K, np.stack([np.eye(4)] * 2))
    pts_s = still.metric_points()[1][still.valid[1]].astype(np.float64)
    uvw = pts_s @ K.T
    u, v = np.round(uvw[:, 0] / uvw[:, 2]).astype(int), np.round(uvw[:, 1] / uvw[:, 2]).astype(int)
    inside = (u >= 0) & (u < 640) & (v >= 0) & (v < 480)
    m = depth[0][v[inside], u[inside]]
    assert np.median(np.abs(m[m > 0] - pts_s[inside][m > 0, 2])) > 2 * np.median(dz)
