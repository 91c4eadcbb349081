"""Relations between two measured regions, in the gravity frame of the reference view.

Definitions (B relative to A; positions are box centres, see `boxes.py`):
- center_distance: |c_B - c_A|. SpatialRGPT-Bench's "direct distance" is answered with it (their data
  pipeline, AnjieCheng/SpatialRGPT dataset_pipeline/osdsynth/processor/pointcloud.py
  `calculate_distances_between_point_clouds`, averages nearest-neighbour distances of the two clouds
  instead; the bench itself was labelled from Omni3D 3D boxes).
- closest_distance: the smallest distance between a point of A and a point of B (each subsampled to
  `CLOSEST_POINTS` near each other, see `closest_distance`; scipy's cKDTree when
  installed, else chunked numpy). VSI-Bench's absolute distance
  ("Measuring from the closest point of each object ..."; its ground truth is the minimum distance
  between points sampled inside the two objects' oriented boxes, and its object size is the longest
  side of the object's oriented box: the question-generation definitions of VSI-Bench, Yang et al.,
  "Thinking in Space", 2024, as restated in Spatial-MLLM's appendix B).
- vertical_distance: |offset along up| of the centres (SpatialRGPT's `vertical_distance_data`, centre
  variant: |dy| of the box centres in their gravity-aligned frame).
- horizontal_distance: the centres' distance in the horizontal plane, sqrt(dright^2 + dforward^2)
  (SpatialRGPT's pipeline, centre variant, keeps only the left-right component |dx|; we report the
  ground-plane distance so that direct^2 = horizontal^2 + vertical^2).
- direction: left_right / above_below / front_behind of B's centre from A's ("aligned", "level",
  "same depth" within `ALIGN_FRACTION` of the two boxes' mean extent on that axis), and the clock
  position of B seen from A on the ground plane with 12 o'clock = forward (away from the viewer),
  3 = right, 6 = towards the viewer, 9 = left (SpatialRGPT `calculate_angle_clockwise` on (x, z);
  theirs floors the angle to the hour, we round to the nearest hour).
- bigger / taller / wider: A's box volume / height / width greater than B's (SpatialRGPT's
  small_predicate compares box volumes, short_predicate heights, thin_predicate widths).

SpatialRGPT-Bench's qualitative categories, as their data pipeline defines them
(dataset_pipeline/osdsynth/processor/instruction.py; their frame: gravity-aligned camera, x left,
y up, z forward), and what answers them here:
- left/right_{predicate,choice}: centre x of A vs B -> `offset_right` (B's centre right of A's => A is left);
- below/above: centre y -> `offset_up`;
- behind/front: theirs compares the nearest depth (min z) of the two clouds; we compare the box
  centres along forward (`offset_forward`), consistent with the clock direction;
- tall/short: height (AABB extent along y) -> `taller`; wide/thin: width (extent along x) -> `wider`;
  big/small: AABB volume -> `bigger` (oriented-box volume here).
"""
from __future__ import annotations

import math

import numpy as np

from model.measure.gravity import GravityFrame
from model.measure.types import PairMeasurement, RegionMeasurement

CLOSEST_POINTS = 800
COARSE_POINTS = 300
ALIGN_FRACTION = 0.1

try:  # optional accelerator; the numpy path gives the same answer
    from scipy.spatial import cKDTree as _KDTree
except ImportError:  # pragma: no cover - depends on the environment
    _KDTree = None


def _subsample(p: np.ndarray, n: int) -> np.ndarray:
    return p if len(p) <= n else p[np.linspace(0, len(p) - 1, n).astype(int)]


def _min_pairwise(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest |a_i - b_j| (chunked; the three coordinates as multiply-adds, no BLAS call per chunk)."""
    if len(a) == 0 or len(b) == 0:
        return math.inf
    if _KDTree is not None:
        return float(_KDTree(b).query(a, k=1)[0].min())
    best = math.inf
    for i in range(0, len(a), 256):
        c = a[i:i + 256]
        d2 = (c[:, 0:1] - b[:, 0]) ** 2 + (c[:, 1:2] - b[:, 1]) ** 2 + (c[:, 2:3] - b[:, 2]) ** 2
        best = min(best, float(d2.min()))
    return math.sqrt(best)


def _to_box(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Distance of each point to the axis-aligned box [lo, hi] (0 inside)."""
    return np.linalg.norm(np.maximum(np.maximum(lo - p, p - hi), 0.0), axis=1)


def closest_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Closest-point distance of two point sets. A coarse pass on `COARSE_POINTS` of each gives an
    upper bound d0; only points within d0 of the other set's bounding box can do better, and the
    fine pass compares those (up to `CLOSEST_POINTS` of each)."""
    d0 = _min_pairwise(_subsample(a, COARSE_POINTS), _subsample(b, COARSE_POINTS))
    ca = a[_to_box(a, b.min(axis=0), b.max(axis=0)) <= d0]
    cb = b[_to_box(b, a.min(axis=0), a.max(axis=0)) <= d0]
    return min(d0, _min_pairwise(_subsample(ca, CLOSEST_POINTS), _subsample(cb, CLOSEST_POINTS)))


def clock_hour(d_right: float, d_forward: float) -> int:
    """Clock position of a ground-plane offset: 12 = forward, 3 = right, 6 = back, 9 = left."""
    angle = math.degrees(math.atan2(d_right, d_forward)) % 360.0  # clockwise from forward, seen from above
    hour = int(round(angle / 30.0)) % 12
    return 12 if hour == 0 else hour


def _word(delta: float, tol: float, pos: str, neg: str, same: str) -> str:
    if abs(delta) <= tol:
        return same
    return pos if delta > 0 else neg


def measure_pair(ra: RegionMeasurement, rb: RegionMeasurement, pa: np.ndarray, pb: np.ndarray,
                 frame: GravityFrame, length_factor: float) -> PairMeasurement:
    """`pa`, `pb`: cleaned points (point-map units); `ra`, `rb`: their measurements (already scaled
    by `length_factor`); the result is in the measurements' unit."""
    if not (ra.available and rb.available and ra.box and rb.box):
        missing = [r.region for r in (ra, rb) if not r.available]
        return PairMeasurement(a=ra.region, b=rb.region, available=False,
                               reason="; ".join(f"region {k} is not measurable ({(ra if k == ra.region else rb).reason})"
                                                for k in missing) or "a region has no box")
    ca, cb = np.asarray(ra.box.center), np.asarray(rb.box.center)
    off = frame.matrix @ (cb - ca)  # right, up, forward (world units already scaled)
    dr, du, df = (float(x) for x in off)
    sa, sb = np.asarray(ra.box.size), np.asarray(rb.box.size)
    mean_w, mean_h, mean_d = (sa + sb) / 2
    direction = {
        "left_right": _word(dr, ALIGN_FRACTION * mean_w, "right", "left", "aligned"),
        "above_below": _word(du, ALIGN_FRACTION * mean_h, "above", "below", "level"),
        "front_behind": _word(df, ALIGN_FRACTION * mean_d, "behind", "in front of", "same depth"),
        "clock": clock_hour(dr, df),
    }
    return PairMeasurement(
        a=ra.region, b=rb.region, available=True,
        center_distance=float(np.linalg.norm(cb - ca)),
        closest_distance=closest_distance(pa, pb) * length_factor,
        horizontal_distance=math.hypot(dr, df), vertical_distance=abs(du),
        offset_right=dr, offset_up=du, offset_forward=df, direction=direction,
        bigger=bool(ra.volume > rb.volume), taller=bool(ra.height > rb.height), wider=bool(ra.width > rb.width))
