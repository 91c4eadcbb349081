"""Trajectory error metrics (TUM RGB-D benchmark conventions): Umeyama alignment, ATE, RPE.

Poses are camera-to-world 4x4 matrices. ATE compares camera centres after the best rigid (SE(3), or
Sim(3) with `with_scale`) alignment of the estimate onto the ground truth; RPE compares the relative
motion between frames i and i+delta, so it needs no alignment at all.
"""
from __future__ import annotations

import numpy as np


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """R, t, s minimising sum |dst - (s R src + t)|^2 over point sets [N, 3] (Umeyama 1991).
    The reflection case is corrected (det R = +1)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1.0
    R = U @ D @ Vt
    var_s = (xs**2).sum() / len(src)
    s = float(np.trace(np.diag(S) @ D) / var_s) if with_scale and var_s > 0 else 1.0
    t = mu_d - s * R @ mu_s
    return R, t, s


def rotation_angle_deg(R: np.ndarray) -> np.ndarray:
    """Angle of rotation matrices [..., 3, 3] in degrees (numerically safe near 0 and 180)."""
    c = (np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def ate(est_c2w: np.ndarray, gt_c2w: np.ndarray, with_scale: bool = False) -> dict[str, float]:
    """Absolute trajectory error of camera centres after aligning `est` onto `gt` (metres)."""
    p_est, p_gt = est_c2w[:, :3, 3], gt_c2w[:, :3, 3]
    R, t, s = umeyama(p_est, p_gt, with_scale)
    err = np.linalg.norm(p_gt - (s * p_est @ R.T + t), axis=1)
    return {"rmse": float(np.sqrt((err**2).mean())), "mean": float(err.mean()), "max": float(err.max()), "scale": s}


def rpe(est_c2w: np.ndarray, gt_c2w: np.ndarray, delta: int = 1) -> dict[str, float]:
    """Relative pose error over frame pairs (i, i+delta): E = (G_i^-1 G_j)^-1 (P_i^-1 P_j);
    translation RMSE in metres, rotation RMSE in degrees."""
    inv = np.linalg.inv
    errs = [
        inv(inv(gt_c2w[i]) @ gt_c2w[i + delta]) @ (inv(est_c2w[i]) @ est_c2w[i + delta])
        for i in range(len(gt_c2w) - delta)
    ]
    E = np.array(errs)
    trans = np.linalg.norm(E[:, :3, 3], axis=1)
    rot = rotation_angle_deg(E[:, :3, :3])
    return {
        "trans_rmse": float(np.sqrt((trans**2).mean())),
        "rot_rmse_deg": float(np.sqrt((rot**2).mean())),
        "trans_max": float(trans.max()),
        "rot_max_deg": float(rot.max()),
        "pairs": len(E),
    }
