"""Which frames of a video are decoded: uniform in time, plus the frames that regions were drawn on."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from service.media.limits import MediaError, MediaLimits
from service.media.probe import VideoInfo


def sample_indices(timestamps: np.ndarray, num_frames: int) -> np.ndarray:
    """Uniform in *time* (correct for variable frame rate): targets evenly spaced from the first to the
    last timestamp, each mapped to the nearest frame; duplicates (fewer frames than asked) dropped."""
    n = len(timestamps)
    if num_frames <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    if num_frames >= n:
        return np.arange(n, dtype=np.int64)
    targets = np.linspace(timestamps[0], timestamps[-1], num_frames)
    right = np.clip(np.searchsorted(timestamps, targets), 1, n - 1)
    left = right - 1
    nearest = np.where(targets - timestamps[left] <= timestamps[right] - targets, left, right)
    return np.unique(nearest).astype(np.int64)


def select_frames(info: VideoInfo, num_frames: int, must_include: Iterable[int], limits: MediaLimits) -> np.ndarray:
    if num_frames < 0:
        raise MediaError("invalid_argument", "num_frames must be >= 0")
    if num_frames > limits.max_frames:
        raise MediaError("too_many_frames", f"{num_frames} frames asked, the limit is {limits.max_frames}")
    extra = sorted({int(i) for i in must_include})
    for i in extra:
        if i < 0 or i >= info.frame_count:
            raise MediaError(
                "frame_out_of_range", f"frame {i} is outside the video (0..{info.frame_count - 1})"
            )
    chosen = np.union1d(sample_indices(info.timestamps, num_frames), np.asarray(extra, dtype=np.int64))
    if len(chosen) > limits.max_frames:
        raise MediaError(
            "too_many_frames",
            f"{len(chosen)} frames (sampled + region frames) exceed the limit of {limits.max_frames}",
        )
    if len(chosen) == 0:
        raise MediaError("invalid_argument", "no frames requested")
    return chosen.astype(np.int64)
