"""What every point-map source produces, and the protocol backends implement."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class PointMaps:
    """Per-pixel 3D points of F frames in one canonical world frame.

    Canonical frame = the reference camera (frame 0 unless told otherwise), OpenCV axes (x right,
    y down, z forward), divided by `scale` so the median distance of valid points is 1.
    """

    points: np.ndarray  # float32 [F, H, W, 3]
    valid: np.ndarray  # bool [F, H, W]
    intrinsics: np.ndarray  # float32 [F, 3, 3], pixels of these frames
    poses: np.ndarray  # float32 [F, 4, 4] camera-to-world in the canonical (normalised) frame
    scale: float  # metres per unit when `metric`, otherwise the (arbitrary) normalisation factor
    metric: bool
    source: str  # backend name, e.g. "rgbd", "depth-anything"
    # How a metric scale was obtained when it was not measured (model/geometry/metric.py: the metric model,
    # metres per unit, its spread across frames and pixels); None for exact RGB-D and relative maps.
    scale_info: dict[str, Any] | None = None

    @property
    def nbytes(self) -> int:
        return int(self.points.nbytes + self.valid.nbytes + self.intrinsics.nbytes + self.poses.nbytes)

    def metric_points(self) -> np.ndarray:
        """Points in metres (meaningful only when `metric`)."""
        return self.points * np.float32(self.scale)


@runtime_checkable
class PointMapBackend(Protocol):
    name: str

    def compute(self, frames: np.ndarray, intrinsics: np.ndarray | None = None) -> PointMaps:
        """frames uint8 [F, H, W, 3]; intrinsics [F, 3, 3] / [3, 3] or None (backend's default)."""
        ...

    def compute_many(
        self, frames: list[np.ndarray], intrinsics: list[np.ndarray | None]
    ) -> list[PointMaps]:
        """Several requests at once (the worker batches depth across jobs)."""
        ...
