"""What a measurement is: plain dataclasses, JSON-ready through `to_dict` (every length says its unit and scale).

Frames and axes. Positions (`centroid`, `box.center`) are in the job's world frame (the reference
camera's OpenCV axes: x right, y down, z forward), in the measurement's length unit: metres when
`scale == "metric"`, otherwise the point map's normalised units (median point distance 1; "relative").
Directions and the words left/right, above/below, in front/behind are read in the gravity frame of the
reference view: "up" (see `UpEstimate`), "right" = the reference camera's x axis made horizontal,
"forward" = its viewing direction made horizontal (away from the viewer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from model.errors import ModelInputError

Dimension = Literal["width", "height", "depth", "longest"]
DIMENSIONS: tuple[str, ...] = ("width", "height", "depth", "longest")


@dataclass(frozen=True)
class ScaleHint:
    """One known length: region `region`'s `dimension` is `metres` long. Rescales a relative scene
    (or overrides a metric one) so that this measurement equals it. Invalid values raise
    `ModelInputError` code `bad_scale_hint` (a client error)."""

    region: int
    dimension: Dimension
    metres: float

    def __post_init__(self) -> None:
        if self.dimension not in DIMENSIONS:
            raise ModelInputError("bad_scale_hint", f"scale_hint dimension must be one of {', '.join(DIMENSIONS)}")
        if not isinstance(self.metres, (int, float)) or not math.isfinite(self.metres) or self.metres <= 0:
            raise ModelInputError("bad_scale_hint", f"scale_hint metres must be a finite number > 0, got {self.metres!r}")
        if not isinstance(self.region, int) or self.region < 0:
            raise ModelInputError("bad_scale_hint", f"scale_hint region must be an index >= 0, got {self.region!r}")


@dataclass
class UpEstimate:
    """The gravity direction used for heights and the horizontal plane, in world coordinates (unit vector).

    method "horizontal plane": normal of the dominant roughly-horizontal plane (RANSAC on scene points),
    oriented against the reference camera's image-down axis; `plane_inliers` points support it.
    method "reference camera": no such plane was found; up = the reference camera's -y axis (image up)."""

    vector: list[float]
    method: Literal["horizontal plane", "reference camera"]
    plane_inliers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"vector": [round(v, 6) for v in self.vector], "method": self.method, "plane_inliers": self.plane_inliers}


@dataclass
class OrientedBox:
    """A gravity-aligned box: `axes` rows are the world-frame unit vectors of its width, height (= up)
    and depth directions; `size` = (width, height, depth) along them; `yaw` = angle (degrees) of the width
    axis from the reference view's horizontal right axis, turning towards forward, in (-45, 45]."""

    center: list[float]
    size: list[float]
    yaw: float  # degrees
    axes: list[list[float]]


@dataclass
class RegionMeasurement:
    region: int
    available: bool
    reason: str | None = None
    centroid: list[float] | None = None  # mean of the cleaned points
    box: OrientedBox | None = None
    width: float | None = None  # along the box's horizontal axis nearer the reference view's left-right
    height: float | None = None  # along up
    depth: float | None = None  # the other horizontal axis
    longest: float | None = None  # max(width, height, depth): VSI-Bench's "object size"
    volume: float | None = None  # width * height * depth (SpatialRGPT's big/small compares volumes)
    points_used: int = 0
    points_total: int = 0
    frames: list[int] = field(default_factory=list)
    cleaning: str = ""


@dataclass
class PairMeasurement:
    """Region b relative to region a (`direction` says where B is as seen from A in the reference view;
    `bigger`/`taller`/`wider` say whether A is bigger/taller/wider than B)."""

    a: int
    b: int
    available: bool
    reason: str | None = None
    center_distance: float | None = None
    closest_distance: float | None = None
    horizontal_distance: float | None = None
    vertical_distance: float | None = None
    # Signed offsets of B's box centre from A's in the gravity frame: +right, +up, +forward (away).
    offset_right: float | None = None
    offset_up: float | None = None
    offset_forward: float | None = None
    direction: dict[str, Any] | None = None
    bigger: bool | None = None
    taller: bool | None = None
    wider: bool | None = None


_LENGTHS_REGION = ("width", "height", "depth", "longest")
_LENGTHS_PAIR = ("center_distance", "closest_distance", "horizontal_distance", "vertical_distance",
                 "offset_right", "offset_up", "offset_forward")


def _r(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(float(v), nd)


def _vec(v: list[float] | None) -> list[float] | None:
    return None if v is None else [round(float(x), 4) for x in v]


@dataclass
class Measurements:
    scale: Literal["metric", "relative"]
    unit: Literal["m"] | None
    source: str
    up: UpEstimate
    regions: list[RegionMeasurement]
    pairs: list[PairMeasurement]

    def region(self, k: int) -> RegionMeasurement | None:
        return self.regions[k] if 0 <= k < len(self.regions) else None

    def pair(self, a: int, b: int) -> PairMeasurement | None:
        """Pair (a, b) as measured, or derived from (b, a) by swapping roles (offsets negated)."""
        for p in self.pairs:
            if (p.a, p.b) == (a, b):
                return p
        for p in self.pairs:
            if (p.a, p.b) == (b, a):
                return invert_pair(p)
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; every length is a `{"value", "unit", "scale"}` object (unit None when relative)."""

        def length(v: float | None) -> dict[str, Any] | None:
            return None if v is None else {"value": _r(v), "unit": self.unit, "scale": self.scale}

        def volume(v: float | None) -> dict[str, Any] | None:
            return None if v is None else {"value": _r(v, 6), "unit": "m^3" if self.unit else None, "scale": self.scale}

        regions = []
        for r in self.regions:
            d: dict[str, Any] = {"region": r.region, "available": r.available, "reason": r.reason,
                                 "points_used": r.points_used, "points_total": r.points_total, "frames": r.frames,
                                 "cleaning": r.cleaning, "position_unit": self.unit, "scale": self.scale,
                                 "centroid": _vec(r.centroid)}
            d.update({k: length(getattr(r, k)) for k in _LENGTHS_REGION})
            d["volume"] = volume(r.volume)
            d["box"] = None if r.box is None else {
                "center": _vec(r.box.center), "size": _vec(r.box.size), "yaw_deg": _r(r.box.yaw, 2),
                "axes": [_vec(a) for a in r.box.axes], "unit": self.unit, "scale": self.scale}
            regions.append(d)
        pairs = []
        for p in self.pairs:
            d = {"a": p.a, "b": p.b, "available": p.available, "reason": p.reason}
            d.update({k: length(getattr(p, k)) for k in _LENGTHS_PAIR})
            d.update(direction=p.direction, bigger=p.bigger, taller=p.taller, wider=p.wider)
            pairs.append(d)
        return {"scale": self.scale, "unit": self.unit, "source": self.source, "up": self.up.to_dict(),
                "frame": "world = reference camera (OpenCV: x right, y down, z forward)",
                "regions": regions, "pairs": pairs}


def invert_pair(p: PairMeasurement) -> PairMeasurement:
    """The same pair with A and B swapped: offsets negated, comparisons flipped, clock turned 6 hours."""
    if not p.available:
        return PairMeasurement(a=p.b, b=p.a, available=False, reason=p.reason)
    d = dict(p.direction or {})
    flip = {"left": "right", "right": "left", "above": "below", "below": "above",
            "in front of": "behind", "behind": "in front of"}
    for k in ("left_right", "above_below", "front_behind"):
        if k in d:
            d[k] = flip.get(d[k], d[k])
    if "clock" in d:
        d["clock"] = (int(d["clock"]) + 5) % 12 + 1

    def neg(v: float | None) -> float | None:
        return None if v is None else -v

    def notb(v: bool | None) -> bool | None:
        return None if v is None else not v

    return PairMeasurement(
        a=p.b, b=p.a, available=True, center_distance=p.center_distance, closest_distance=p.closest_distance,
        horizontal_distance=p.horizontal_distance, vertical_distance=p.vertical_distance,
        offset_right=neg(p.offset_right), offset_up=neg(p.offset_up), offset_forward=neg(p.offset_forward),
        direction=d, bigger=notb(p.bigger), taller=notb(p.taller), wider=notb(p.wider))
