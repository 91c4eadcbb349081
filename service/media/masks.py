"""Region annotations -> bool masks [H, W] on the displayed frame: mask PNGs (size-checked against the
frame before decoding) and boxes, rotated like the frames; `resize_mask` for downscaled frames."""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from service.media.images import load_image, open_image
from service.media.limits import MediaError, MediaLimits


def _rotate_mask(mask: np.ndarray, rotation: int) -> np.ndarray:
    if rotation % 90:
        raise MediaError("invalid_argument", f"rotation {rotation} is not a multiple of 90")
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(mask, k=k)) if k else mask


def _coded_size(size: tuple[int, int], rotation: int) -> tuple[int, int]:
    w, h = size
    return (h, w) if rotation % 180 else (w, h)


def mask_from_png(data: bytes, size: tuple[int, int], rotation: int = 0) -> np.ndarray:
    """Mask PNG -> bool [H, W] on the displayed frame of size `size` = (W, H).

    In region: any non-zero colour/grey value; with an alpha channel, also alpha > 0 (so both
    "white on black" and "paint on transparent" exports work). With `rotation` != 0 the PNG is in the
    coded (unrotated) frame, i.e. its size is (H, W) for 90/270, and is rotated like the frames.
    """
    expect = _coded_size(size, rotation)
    try:  # the exact-size check below is the pixel cap; a header over any cap is simply the wrong size
        img = open_image(data, MediaLimits(max_pixels=max(1, expect[0] * expect[1])))
    except MediaError as e:
        if e.code != "resolution_too_large":
            raise
        raise MediaError("mask_size_mismatch", f"mask is larger than the {expect[0]}x{expect[1]} frame") from None
    if img.format != "PNG":
        raise MediaError("invalid_mask", "masks must be PNG")
    if img.size != expect:
        raise MediaError(
            "mask_size_mismatch", f"mask is {img.size[0]}x{img.size[1]}, the frame is {expect[0]}x{expect[1]}"
        )
    load_image(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    arr = np.asarray(img)
    if arr.ndim == 2:
        mask = arr != 0
    else:
        # Channel by channel, in place: one bool plane of transient memory instead of a bool copy of
        # every channel (a 40 MP RGBA mask: 40 MB, not 160 MB on top of the pixels).
        alpha = img.mode in ("LA", "RGBA", "La", "RGBa")
        colour = arr.shape[-1] - 1 if alpha else arr.shape[-1]
        mask = arr[..., 0] != 0
        for c in range(1, colour):
            mask |= arr[..., c] != 0
        if alpha:
            mask &= arr[..., -1] != 0
    del arr, img
    return _rotate_mask(mask, rotation)


def mask_from_box(box: Iterable[float], size: tuple[int, int], rotation: int = 0) -> np.ndarray:
    """Box [x0, y0, x1, y1] in pixels (pixel u spans [u, u+1)) -> bool [H, W] on the displayed frame.

    Parts outside the frame are clipped; a box entirely outside is `box_out_of_frame`, a degenerate
    one `empty_box`. With `rotation` != 0 the box is in coded-frame coordinates.
    """
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise MediaError("invalid_box", "a box is four numbers [x0, y0, x1, y1]") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise MediaError("invalid_box", "box coordinates must be finite")
    if x1 <= x0 or y1 <= y0:
        raise MediaError("empty_box", f"box {[x0, y0, x1, y1]} has no area (need x1 > x0, y1 > y0)")
    w, h = _coded_size(size, rotation)
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        raise MediaError("box_out_of_frame", f"box {[x0, y0, x1, y1]} is outside the {w}x{h} frame")
    u0, v0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    u1, v1 = min(w, math.ceil(x1)), min(h, math.ceil(y1))
    mask = np.zeros((h, w), dtype=bool)
    mask[v0:v1, u0:u1] = True
    return _rotate_mask(mask, rotation)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to (W, H) (for frames decoded with `max_side`)."""
    h, w = mask.shape
    if (w, h) == tuple(size):
        return mask
    out_w, out_h = size
    rows = np.minimum((np.arange(out_h) + 0.5) * h / out_h, h - 1).astype(np.int64)
    cols = np.minimum((np.arange(out_w) + 0.5) * w / out_w, w - 1).astype(np.int64)
    return mask[rows[:, None], cols[None, :]]
