"""Pose recovery for RGB-D sent without poses: a ray-cast synthetic scene with a moving camera (exact
truth), frames that cannot be registered, and the real TUM fr1_rpy window against its ground truth."""
from __future__ import annotations

import numpy as np
import pytest

from service.api.errors import status_for

from model.geometry.pose_recovery import (
    PoseRecoveryResult,
    pointmaps_from_recovered,
    pointmaps_without_poses,
    recover_poses,
)
from model.geometry.rgbd import SceneError
from model.geometry.trajectory import ate, rotation_angle_deg, rpe, umeyama

H, W = 240, 320
K = np.array([[260.0, 0.0, 159.5], [0.0, 255.0, 119.5], [0.0, 0.0, 1.0]])
ROOM = (np.array([-3.0, -2.0, -1.5]), np.array([3.0, 1.5, 6.0]))  # seen from inside (y down: floor at +1.5)
BOXES = [  # seen from outside
    (np.array([-1.2, 0.3, 2.5]), np.array([-0.4, 1.5, 3.3])),
    (np.array([0.6, -0.5, 3.5]), np.array([1.6, 1.5, 4.2])),
]


def _rot(axis: list[float], deg: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    S = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.radians(deg)
    return np.eye(3) + np.sin(t) * S + (1 - np.cos(t)) * S @ S


class _Texture:
    """Value noise in world coordinates (three octaves): a surface point has the same colour from
    every view, and the pattern is random enough for SIFT everywhere."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.grids = [rng.random((256, 256)) for _ in range(3)]
        self.cells = [0.25, 0.08, 0.03]

    def __call__(self, a: np.ndarray, b: np.ndarray, face: np.ndarray) -> np.ndarray:
        out = np.zeros_like(a)
        for grid, cell, wgt in zip(self.grids, self.cells, (0.5, 0.3, 0.2), strict=True):
            x = (a + 17.0 * face) / cell + 1000.0
            y = (b + 29.0 * face) / cell + 1000.0
            x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
            fx, fy = x - x0, y - y0
            g = lambda i, j: grid[(y0 + j) % 256, (x0 + i) % 256]  # noqa: E731
            out += wgt * ((g(0, 0) * (1 - fx) + g(1, 0) * fx) * (1 - fy) + (g(0, 1) * (1 - fx) + g(1, 1) * fx) * fy)
        return out


_TEX = _Texture(7)


def _render(T_c2w: np.ndarray, texture: _Texture = _TEX) -> tuple[np.ndarray, np.ndarray]:
    """Exact ray casting of the room + boxes: (RGB uint8 [H,W,3], z-depth metres [H,W])."""
    u, v = np.meshgrid(np.arange(W, dtype=float), np.arange(H, dtype=float))
    rays_cam = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T  # z = 1: t is the z-depth
    d = rays_cam @ T_c2w[:3, :3].T
    o = T_c2w[:3, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        lo, hi = (ROOM[0] - o) * inv, (ROOM[1] - o) * inv
        far = np.maximum(lo, hi)
        t = far.min(-1)
        face = far.argmin(-1) + 3 * (d[np.arange(H)[:, None], np.arange(W)[None], far.argmin(-1)] > 0)
        for bi, (b0, b1) in enumerate(BOXES):
            lo, hi = (b0 - o) * inv, (b1 - o) * inv
            near = np.minimum(lo, hi)
            t_in, t_out = near.max(-1), np.maximum(lo, hi).min(-1)
            hit = (t_in < t_out) & (t_in > 0) & (t_in < t)
            t = np.where(hit, t_in, t)
            face = np.where(hit, 6 + 6 * bi + near.argmax(-1), face)
    X = o + d * t[..., None]
    axis = face % 3
    a = np.where(axis == 0, X[..., 1], X[..., 0])
    b = np.where(axis == 2, X[..., 1], X[..., 2])
    shades = [texture(a, b, face), texture(b, a, face + 40), texture(a + b, a - b, face + 80)]
    rgb = np.stack([0.6 * shades[0] + 0.4 * s for s in shades], -1)
    return np.clip(rgb * 255, 0, 255).astype(np.uint8), t


def _trajectory(n: int) -> np.ndarray:
    """A camera walking sideways and forward while panning and tilting; frame 0 is NOT the world
    origin, so the test also checks that everything comes back in camera 0's frame."""
    poses = []
    for i in range(n):
        T = np.eye(4)
        T[:3, :3] = _rot([0, 1, 0], -6 + 2.5 * i) @ _rot([1, 0, 0], 2 * np.sin(i))
        T[:3, 3] = [-0.6 + 0.12 * i, -0.1 + 0.02 * np.sin(i), -0.4 + 0.05 * i]
        poses.append(T)
    return np.array(poses)


@pytest.fixture(scope="module")
def scene() -> dict[str, np.ndarray]:
    gt = _trajectory(8)
    rgb, depth = zip(*(_render(T) for T in gt), strict=True)
    return {"gt": gt, "rgb": np.array(rgb), "depth": np.array(depth)}


def _errors(res: PoseRecoveryResult, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame rotation (deg) and translation (m) error; truth expressed in camera 0's frame."""
    truth = np.linalg.inv(gt[0]) @ gt
    E = np.linalg.inv(truth) @ res.poses_c2w
    return rotation_angle_deg(E[:, :3, :3]), np.linalg.norm(res.poses_c2w[:, :3, 3] - truth[:, :3, 3], axis=1)


def test_synthetic_moving_camera_poses_and_point_agreement(scene) -> None:
    """Depth + images of a moving camera, no poses: poses within 0.2 deg / 5 mm of the truth, and the
    recovered point maps put the same surface point at the same place from every frame.
    Measured (8 frames, 0.12 m / 2.5 deg steps, depth ~5 m; printed with pytest -s): pose error max
    0.026 deg / 1.8 mm; points vs truth median 0.50 mm (p95 1.05 mm); the same surface point from frame 0
    vs frames 1-7: median 0.48 mm (p95 0.90 mm) over 20k points."""
    gt, rgb, depth = scene["gt"], scene["rgb"], scene["depth"]
    pm, res = pointmaps_without_poses(depth, K, rgb)
    assert res.registered.all(), res.reasons
    assert res.reasons == {} and res.reference == 0
    assert np.array_equal(res.poses_c2w[0], np.eye(4))
    assert min(res.inliers[1:]) >= 100
    rot_err, trans_err = _errors(res, gt)
    print(f"\nsynthetic pose error: rotation max {rot_err.max():.4f} deg, translation max {1000 * trans_err.max():.2f} mm")
    assert rot_err.max() < 0.2 and trans_err.max() < 0.005

    assert pm.source == "pose-recovery" and pm.metric
    world = pm.metric_points().astype(np.float64)  # metres, camera 0's frame
    assert np.allclose(pm.poses[:, :3, 3] * pm.scale, res.poses_c2w[:, :3, 3], atol=1e-5)
    # (a) against the truth: every pixel's point vs its exact surface point in camera 0's frame.
    truth_cam0 = np.linalg.inv(gt[0]) @ gt
    rays = np.stack([*np.meshgrid(np.arange(W, dtype=float), np.arange(H, dtype=float)), np.ones((H, W))], -1)
    cam = (rays @ np.linalg.inv(K).T) * depth[..., None]
    true_pts = cam @ truth_cam0[:, None, :3, :3].transpose(0, 1, 3, 2) + truth_cam0[:, None, None, :3, 3]
    err = np.linalg.norm(world - true_pts, axis=-1)[pm.valid]
    # (b) across frames: frame 0's surface points looked up (bilinearly) in every other frame's
    # recovered map, where that pixel sees the same surface (exact depth test against the render).
    src = true_pts[0][::4, ::4].reshape(-1, 3)
    rec0 = world[0][::4, ::4].reshape(-1, 3)
    cross = []
    for k in range(1, len(gt)):
        y = (src - truth_cam0[k][:3, 3]) @ truth_cam0[k][:3, :3]
        uv = (y / y[:, 2:]) @ K.T
        x0, y0 = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
        inside = (x0 >= 0) & (x0 < W - 1) & (y0 >= 0) & (y0 < H - 1) & (y[:, 2] > 0)
        x0, y0, fx, fy, yk, r0 = x0[inside], y0[inside], (uv[inside, 0] - x0[inside]), (uv[inside, 1] - y0[inside]), y[inside], rec0[inside]
        corners = [(0, 0), (1, 0), (0, 1), (1, 1)]
        # Visible and on one surface: all four neighbours' depth within 1 % of the point's depth.
        same = np.all([np.abs(depth[k][y0 + j, x0 + i] - yk[:, 2]) < 0.01 * yk[:, 2] for i, j in corners], axis=0)
        wts = [(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy]
        interp = sum(w[:, None] * world[k][y0 + j, x0 + i] for w, (i, j) in zip(wts, corners, strict=True))
        cross.append(np.linalg.norm(interp[same] - r0[same], axis=1))
        assert same.sum() > 500  # the frames overlap substantially
    cross_err = np.concatenate(cross)
    print(
        f"point error vs truth: median {1000 * np.median(err):.2f} mm, p95 {1000 * np.quantile(err, 0.95):.2f} mm "
        f"(depth median {np.median(depth):.2f} m); same point from frame 0 vs frames 1-7: median "
        f"{1000 * np.median(cross_err):.2f} mm, p95 {1000 * np.quantile(cross_err, 0.95):.2f} mm over {len(cross_err)} points"
    )
    assert np.median(err) < 0.003 and np.quantile(err, 0.95) < 0.01
    assert np.median(cross_err) < 0.003 and np.quantile(cross_err, 0.95) < 0.01


def test_blank_and_foreign_frames_are_reported_not_given_a_pose(scene) -> None:
    gt, rgb, depth = scene["gt"][:5], scene["rgb"][:5].copy(), scene["depth"][:5]
    rgb[2] = 128  # blank: no keypoints at all
    # A textured frame of a different world (other texture seed): keypoints, but nothing that matches.
    rgb[3] = _render(gt[3], _Texture(99))[0]
    pm, res = pointmaps_without_poses(depth, K, rgb)
    assert res.registered.tolist() == [True, True, False, False, True]
    assert res.reasons[2].startswith("no_features")
    assert res.reasons[3].startswith(("too_few_matches", "too_few_inliers"))
    assert np.isnan(res.poses_c2w[2]).all() and np.isnan(res.poses_c2w[3]).all()
    assert res.inliers[2] == res.inliers[3] == 0
    # Frame 4 registers against the keyframes across the gap.
    rot_err, trans_err = _errors(res, gt)
    assert rot_err[4] < 0.2 and trans_err[4] < 0.005
    # Point maps: the unregistered frames contribute nothing; everything stays finite.
    assert not pm.valid[2].any() and not pm.valid[3].any() and pm.valid[4].mean() > 0.9
    assert np.isfinite(pm.poses).all() and np.isfinite(pm.points).all()


def test_depth_that_contradicts_the_others_is_rejected(scene) -> None:
    """Frame 3's image registers fine, but its depth is in other units (x1.5): placed with that pose,
    it does not lie on the surfaces the other frames measured, so the frame is reported, not merged."""
    depth = scene["depth"][:5].copy()
    depth[3] *= 1.5
    res = recover_poses(depth, K, scene["rgb"][:5])
    assert res.registered.tolist() == [True, True, True, False, True]
    assert res.reasons[3].startswith("depth_inconsistent")


def test_blank_first_frame_moves_the_reference(scene) -> None:
    rgb = scene["rgb"][:3].copy()
    rgb[0] = 0
    res = recover_poses(scene["depth"][:3], K, rgb)
    assert res.reference == 1 and res.registered.tolist() == [False, True, True]
    assert np.array_equal(res.poses_c2w[1], np.eye(4))
    pm = pointmaps_from_recovered(scene["depth"][:3], K, res)
    assert np.allclose(pm.poses[1], np.eye(4)) and not pm.valid[0].any()


def test_frame_without_depth_registers_from_its_image(scene) -> None:
    """PnP needs depth only on the already registered side: frame 0 without any depth cannot be the
    reference, but it still gets its pose (in frame 1's world) from its keypoints."""
    gt, depth = scene["gt"][:4], scene["depth"][:4].copy()
    depth[0] = 0
    res = recover_poses(depth, K, scene["rgb"][:4])
    assert res.reference == 1 and res.registered.all(), res.reasons
    truth = np.linalg.inv(gt[1]) @ gt
    E = np.linalg.inv(truth) @ res.poses_c2w
    assert rotation_angle_deg(E[:, :3, :3]).max() < 0.2
    assert np.linalg.norm(E[:, :3, 3], axis=1).max() < 0.01


def test_large_frames_detect_on_a_shrunk_image(scene) -> None:
    """Keypoints found on the shrunk image come back in full-resolution pixels (the poses stay exact)."""
    from model.geometry.pose_recovery import PoseRecoveryConfig

    res = recover_poses(scene["depth"][:3], K, scene["rgb"][:3], PoseRecoveryConfig(feature_max_side=200))
    assert res.registered.all(), res.reasons
    rot_err, trans_err = _errors(res, scene["gt"][:3])
    assert rot_err.max() < 0.3 and trans_err.max() < 0.01


def test_nothing_registrable_is_a_scene_error() -> None:
    depth = np.ones((2, H, W))
    with pytest.raises(SceneError) as e:
        pointmaps_without_poses(depth, K, np.zeros((2, H, W, 3), np.uint8))
    assert e.value.code == "scene_unregistrable" and status_for(e.value.code) == 422
    with pytest.raises(ValueError):
        recover_poses(depth, K, np.zeros((2, H, W + 1, 3), np.uint8))


def test_trajectory_metrics_on_known_transforms() -> None:
    rng = np.random.default_rng(1)
    gt = _trajectory(6)
    M = np.eye(4)
    M[:3, :3], M[:3, 3] = _rot(rng.normal(size=3), 40), rng.normal(size=3)
    # The same trajectory in another world frame: ATE 0 after alignment, RPE 0 without.
    moved = M @ gt
    assert ate(moved, gt)["rmse"] < 1e-9 and rpe(moved, gt)["trans_rmse"] < 1e-9
    R, t, s = umeyama(gt[:, :3, 3], 2.0 * moved[:, :3, 3], with_scale=True)
    assert abs(s - 2.0) < 1e-9
    # A known 1 cm error on one relative step: RPE sees exactly it.
    bumped = gt.copy()
    bumped[3:, :3, 3] += bumped[2, :3, :3] @ np.array([0.01, 0, 0])
    r = rpe(bumped, gt)
    assert abs(r["trans_max"] - 0.01) < 1e-9 and r["rot_max_deg"] < 1e-6


def test_tum_fr1_window_against_ground_truth() -> None:
    """Real Kinect data (TUM RGB-D fr1_rpy, 10 frames 0.2 s apart, rotation-dominated, up to 18.5 deg
    between frames, images not undistorted). `python -m loadtests.eval_pose_recovery` prints the
    figures quoted in the README; the bounds here are those figures with margin."""
    from loadtests.eval_pose_recovery import evaluate

    out = evaluate()
    print("\n", out)
    # Measured: frames 0-8 registered; frame 9 (motion-blurred: 22 of 232 matches agree, 9 %) reported,
    # not scored. ATE RMSE 0.74 cm (SE(3)-aligned), 2.6 cm aligned on frame 0 only; RPE 1.29 cm /
    # 1.06 deg per 0.2 s; rotation drift 6.3 deg after 1.6 s and 84 deg of panning (small over-estimates
    # of every step add up; the lens distortion, k1 = 0.26, is not modelled).
    assert out["registered"] == 9 and list(out["unregistered"]) == ["9"]
    assert out["unregistered"]["9"].startswith("too_few_inliers")
    assert out["ate_se3_m"]["rmse"] <= 0.015
    assert out["ate_anchored_rmse_m"] <= 0.04
    assert out["rpe_consecutive_registered"]["trans_rmse"] <= 0.02
    assert out["rpe_consecutive_registered"]["rot_rmse_deg"] <= 1.5
    assert out["rotation_error_vs_reference_deg"]["max"] <= 8.0
