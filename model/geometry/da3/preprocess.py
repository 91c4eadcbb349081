"""Depth Anything 3's input pre-processing, as the official `InputProcessor` does it ("upper_bound_resize").

Per frame, on uint8 pixels, with OpenCV (the library the official code uses, so the resampling kernels are
the same ones, not look-alikes):
1. boundary resize: the long side to `process_res`, each side `int(round(side * scale))` (Python's round),
   INTER_CUBIC when enlarging (scale > 1), INTER_AREA when shrinking; skipped when the long side already is
   `process_res`;
2. each side to its NEAREST multiple of the patch (14), a tie going UP (315 -> 322, 287 -> 294), by a second
   resize: INTER_CUBIC if either side grows, INTER_AREA otherwise; skipped when both already are multiples;
3. /255 and ImageNet normalisation in float32.
The pixels stay uint8 between the two resizes (the official code holds a PIL image there).
One deliberate difference: a side never drops below one patch (the official code would give 1 pixel there,
which the network cannot take; only frames with an aspect ratio beyond 36:1 get that far).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def boundary_size(h: int, w: int, process_res: int) -> tuple[int, int]:
    """Step 1's size: the long side scaled to `process_res`, Python's round on each side."""
    if max(h, w) == process_res:
        return h, w
    s = process_res / float(max(h, w))
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


def nearest_multiple(x: int, patch: int) -> int:
    """The nearest multiple of `patch`; a tie goes up (the official `_make_divisible_by_resize`)."""
    down = (x // patch) * patch
    up = down + patch
    return max(patch, up if up - x <= x - down else down)


def network_size(h: int, w: int, process_res: int, patch: int = 14) -> tuple[int, int]:
    """The (height, width) the network sees for an h x w frame."""
    bh, bw = boundary_size(h, w, process_res)
    return nearest_multiple(bh, patch), nearest_multiple(bw, patch)


def _resize(img: np.ndarray, h: int, w: int, enlarge: bool) -> np.ndarray:
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC if enlarge else cv2.INTER_AREA)


def resize_frame(frame: np.ndarray, process_res: int, patch: int = 14) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3] at `network_size`, through the official two resizes."""
    h, w = frame.shape[:2]
    bh, bw = boundary_size(h, w, process_res)
    img = np.ascontiguousarray(frame)
    if (bh, bw) != (h, w):
        img = _resize(img, bh, bw, enlarge=process_res / float(max(h, w)) > 1.0)
    nh, nw = nearest_multiple(bh, patch), nearest_multiple(bw, patch)
    if (nh, nw) != (bh, bw):
        img = _resize(img, nh, nw, enlarge=nh > bh or nw > bw)
    return img


def resize_frames(frames: np.ndarray, process_res: int, patch: int = 14) -> np.ndarray:
    """uint8 [F, H, W, 3] -> uint8 [F, h, w, 3] (all frames of a request share one size)."""
    return np.stack([resize_frame(f, process_res, patch) for f in frames])


def normalise(u8: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [F, h, w, 3] -> float32 [1, F, 3, h, w], /255 and ImageNet mean/std (on `device`)."""
    x = torch.from_numpy(u8).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN, device=x.device)[:, None, None]
    std = torch.tensor(STD, device=x.device)[:, None, None]
    return ((x - mean) / std)[None]
