"""Pinhole intrinsics (OpenCV convention: pixel centres at integer coordinates)."""
from __future__ import annotations

import math

import numpy as np

DEFAULT_FOV_X_DEG = 60.0  # typical phone main camera (~26 mm equivalent gives ~65-70 deg); used when unknown


def intrinsics_from_fov(width: int, height: int, fov_x_deg: float = DEFAULT_FOV_X_DEG) -> np.ndarray:
    """Square pixels, principal point at the image centre, horizontal field of view `fov_x_deg`."""
    if not 0.0 < fov_x_deg < 180.0:
        raise ValueError(f"fov_x_deg must be in (0, 180), got {fov_x_deg}")
    f = (width / 2.0) / math.tan(math.radians(fov_x_deg) / 2.0)
    return np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]], np.float64)


def broadcast_intrinsics(K: np.ndarray, num_frames: int) -> np.ndarray:
    """[3, 3] or [F, 3, 3] -> [F, 3, 3] float64."""
    K = np.asarray(K, dtype=np.float64)
    if K.shape == (3, 3):
        return np.broadcast_to(K, (num_frames, 3, 3)).copy()
    if K.shape != (num_frames, 3, 3):
        raise ValueError(f"intrinsics must be [3,3] or [{num_frames},3,3], got {list(K.shape)}")
    return K.copy()


def scale_intrinsics(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Intrinsics after resizing the image by (sx, sy) (pixel-centre convention preserved)."""
    S = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
    return S @ np.asarray(K, dtype=np.float64)


def rotate_intrinsics(K: np.ndarray, rotation: int, size: tuple[int, int]) -> np.ndarray:
    """Intrinsics of `np.rot90(image, k=rotation // 90)` (CCW) of an image of size (W, H), as a
    standard pinhole K (no skew). The rotated image is a camera rolled about its optical axis: per
    90 deg CCW, x_new = y_old and y_new = -x_old (rotate poses by the same roll if you have them)."""
    K = np.asarray(K, dtype=np.float64).copy()
    w, h = size
    for _ in range((rotation // 90) % 4):
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        # New pixel (u', v') = (v, W - 1 - u): the old row axis becomes the new column axis.
        K = np.array([[fy, 0.0, cy], [0.0, fx, w - 1.0 - cx], [0.0, 0.0, 1.0]])
        w, h = h, w
    return K
