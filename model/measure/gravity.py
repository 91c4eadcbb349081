"""Which way is up, and the gravity frame of the reference view.

Up = the normal of the dominant roughly-horizontal plane of the scene (floor, table top): RANSAC on a
grid sample of every frame's valid points, keeping only plane hypotheses whose normal lies within
`MAX_TILT_DEG` of the reference camera's up (image-up, -y), refined by least squares on the inliers,
and oriented against the reference camera's image-down axis. When no such plane holds at least
`MIN_INLIER_FRACTION` of the sample, up falls back to the reference camera's -y axis, and says so.
Deterministic: the RANSAC draws come from a fixed seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.geometry.types import PointMaps
from model.measure.types import UpEstimate

MAX_TILT_DEG = 60.0
SAMPLE_POINTS = 6000
SAMPLE_FRAMES = 8
HYPOTHESES = 160
INLIER_REL = 0.01  # inlier band: 1 % of the sample's median distance from the reference camera
MIN_INLIER_FRACTION = 0.08
MIN_INLIERS = 150


def reference_frame(pm: PointMaps) -> int:
    """The frame whose camera-to-world pose is the identity (the canonical frame), else 0."""
    err = np.abs(pm.poses.astype(np.float64) - np.eye(4)).reshape(len(pm.poses), -1).max(axis=1)
    i = int(np.argmin(err))
    return i if err[i] < 1e-4 else 0


def _scene_sample(pm: PointMaps, rng: np.random.Generator) -> np.ndarray:
    """Up to SAMPLE_POINTS valid points from up to SAMPLE_FRAMES frames spread over the job, on a grid."""
    f, h, w = pm.valid.shape
    frames = np.unique(np.linspace(0, f - 1, min(f, SAMPLE_FRAMES)).round().astype(int))
    stride = max(1, int(np.sqrt(len(frames) * h * w / (SAMPLE_POINTS * 1.5))))
    valid = pm.valid[frames, ::stride, ::stride]
    pts = pm.points[frames, ::stride, ::stride][valid]
    if len(pts) > SAMPLE_POINTS:
        pts = pts[np.sort(rng.permutation(len(pts))[:SAMPLE_POINTS])]
    return pts.astype(np.float64)


def estimate_up(pm: PointMaps) -> UpEstimate:
    ref = reference_frame(pm)
    cam_up = -pm.poses[ref, :3, 1].astype(np.float64)
    cam_up /= np.linalg.norm(cam_up)
    fallback = UpEstimate(vector=cam_up.tolist(), method="reference camera", plane_inliers=0)
    rng = np.random.default_rng(0)
    pts = _scene_sample(pm, rng)
    if len(pts) < MIN_INLIERS:
        return fallback
    centre = pm.poses[ref, :3, 3].astype(np.float64)
    tol = INLIER_REL * float(np.median(np.linalg.norm(pts - centre, axis=1)))
    idx = rng.integers(0, len(pts), size=(HYPOTHESES, 3))
    a, b, c = pts[idx[:, 0]], pts[idx[:, 1]], pts[idx[:, 2]]
    n = np.cross(b - a, c - a)
    norm = np.linalg.norm(n, axis=1)
    good = norm > 1e-12
    n[good] /= norm[good, None]
    cos = np.abs(n @ cam_up)
    good &= cos >= np.cos(np.radians(MAX_TILT_DEG))
    if not good.any():
        return fallback
    n, a = n[good], a[good]
    d = np.einsum("ij,ij->i", n, a)
    counts = (np.abs(pts @ n.T - d) <= tol).sum(axis=0)
    best = int(np.argmax(counts))
    if counts[best] < max(MIN_INLIERS, MIN_INLIER_FRACTION * len(pts)):
        return fallback
    normal = n[best]
    inl = pts[np.abs(pts @ normal - d[best]) <= tol]
    # Least-squares refinement: the plane's normal is the direction of least spread of its inliers.
    for _ in range(2):
        q = inl - inl.mean(axis=0)
        normal = np.linalg.svd(q, full_matrices=False)[2][-1]
        off = inl.mean(axis=0) @ normal
        inl = pts[np.abs(pts @ normal - off) <= tol]
        if len(inl) < 3:
            return fallback
    if normal @ cam_up < 0:  # against the image-down axis
        normal = -normal
    if normal @ cam_up < np.cos(np.radians(MAX_TILT_DEG)):
        return fallback
    return UpEstimate(vector=(normal / np.linalg.norm(normal)).tolist(), method="horizontal plane",
                      plane_inliers=int(len(inl)))


@dataclass
class GravityFrame:
    """Orthonormal (right, up, forward) in world coordinates; `to_local` maps world points to them."""

    right: np.ndarray
    up: np.ndarray
    forward: np.ndarray
    origin: np.ndarray

    @property
    def matrix(self) -> np.ndarray:
        return np.stack([self.right, self.up, self.forward])

    def to_local(self, p: np.ndarray) -> np.ndarray:
        return (p - self.origin) @ self.matrix.T

    def to_world(self, q: np.ndarray) -> np.ndarray:
        return q @ self.matrix + self.origin


def gravity_frame(pm: PointMaps, up: np.ndarray) -> GravityFrame:
    """Right/forward = the reference camera's x/z made horizontal (forward away from the viewer);
    a camera looking straight down uses its image-up axis as forward instead."""
    ref = reference_frame(pm)
    R = pm.poses[ref, :3, :3].astype(np.float64)
    up = up / np.linalg.norm(up)
    fwd = R[:, 2] - (R[:, 2] @ up) * up
    if np.linalg.norm(fwd) < 0.1:
        fwd = -R[:, 1] - (-R[:, 1] @ up) * up
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, up)  # OpenCV: x = y x z with y = -up
    return GravityFrame(right=right, up=up, forward=fwd, origin=pm.poses[ref, :3, 3].astype(np.float64))
