"""Depth -> camera points -> one canonical world frame -> normalised scale."""
from __future__ import annotations

import numpy as np


def backproject(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """z-depth [..., H, W] and intrinsics [3, 3] or [..., 3, 3] -> OpenCV camera points [..., H, W, 3].

    X = (u - cx) z / fx, Y = (v - cy) z / fy, Z = z; u = column, v = row. Skew is honoured.
    """
    depth = np.asarray(depth)
    dt = np.result_type(depth.dtype, np.float32)  # float32 stays float32 (large maps), float64 stays exact
    depth = depth.astype(dt, copy=False)
    h, w = depth.shape[-2:]
    Kinv = np.linalg.inv(np.asarray(K, dtype=np.float64)).astype(dt)  # [..., 3, 3]
    u, v = np.meshgrid(np.arange(w, dtype=dt), np.arange(h, dtype=dt))
    pix = np.stack([u, v, np.ones_like(u)], axis=-1)  # [H, W, 3]
    lead = Kinv.shape[:-2]
    # matmul (BLAS) rather than einsum: ~10x faster on 32 x 360 x 640 maps.
    rays = (pix.reshape(-1, 3) @ np.swapaxes(Kinv, -1, -2)).reshape(*lead, h, w, 3)
    return rays * depth[..., None]


def transform(points: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Apply 4x4 transforms [F, 4, 4] to points [F, H, W, 3] (in the points' dtype)."""
    T = np.asarray(T).astype(points.dtype)
    f = points.shape[0]
    flat = points.reshape(f, -1, 3) @ np.swapaxes(T[:, :3, :3], -1, -2) + T[:, None, :3, 3]
    return flat.reshape(points.shape)


def canonicalize(
    points_cam: np.ndarray, poses: np.ndarray, reference_frame: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame points [F, H, W, 3] + camera-to-world poses [F, 4, 4] -> points and poses in the
    reference camera's frame: X_ref = T_ref^-1 T_i X_cam. Returns (points_world, poses_world)."""
    poses = np.asarray(poses, dtype=np.float64)
    if not 0 <= reference_frame < len(poses):
        raise ValueError(f"reference_frame {reference_frame} outside 0..{len(poses) - 1}")
    ref_inv = np.linalg.inv(poses[reference_frame])
    poses_world = ref_inv[None] @ poses
    points_cam = np.asarray(points_cam)
    return transform(points_cam.astype(np.result_type(points_cam.dtype, np.float32)), poses_world), poses_world


def normalize_scale(points: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, float]:
    """Divide by the median norm of the valid points (robust to outliers and holes).
    Returns (points / scale, scale); scale is 1 when nothing usable is valid."""
    sel = points[valid]
    if len(sel) > 1_000_000:  # a strided subsample estimates the median to well under 0.1 %
        sel = sel[:: len(sel) // 1_000_000]
    norms = np.sqrt((sel.astype(np.float64) ** 2).sum(axis=-1)) if sel.size else np.zeros(0)
    norms = norms[np.isfinite(norms) & (norms > 0)]
    scale = float(np.median(norms)) if norms.size else 1.0
    return points / scale, scale


def finalize(
    points_cam: np.ndarray,
    valid: np.ndarray,
    intrinsics: np.ndarray,
    poses: np.ndarray,
    *,
    metric: bool,
    source: str,
    reference_frame: int = 0,
    base_scale: float = 1.0,
):
    """Shared tail of every backend: canonical frame, normalised, invalid points zeroed (finite)."""
    from model.geometry.types import PointMaps

    world, poses_w = canonicalize(points_cam, poses, reference_frame)
    valid = valid & np.isfinite(world).all(axis=-1)
    world = np.where(valid[..., None], world, world.dtype.type(0))
    world, scale = normalize_scale(world, valid)
    poses_w = poses_w.copy()
    poses_w[:, :3, 3] /= scale
    return PointMaps(
        points=world.astype(np.float32),
        valid=valid,
        intrinsics=np.asarray(intrinsics, dtype=np.float32),
        poses=poses_w.astype(np.float32),
        scale=float(scale * base_scale),
        metric=metric,
        source=source,
    )
