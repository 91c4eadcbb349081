"""One region's 3D points: gathered from its mask on every frame that carries it, then cleaned.

Cleaning rules, in order (reported verbatim in `RegionMeasurement.cleaning`):
1. valid depth only (`PointMaps.valid`);
2. erosion at depth edges: a "jump" is a neighbour (in the full image, mask or not) that is invalid
   or lies at a range from the camera differing by more than `EDGE_REL` of the pixel's own range. A
   mask pixel that jumps against both of its neighbours along one image axis (up and down, or left
   and right) with its range between theirs (or next to a pixel without depth) is dropped: that is a
   flying pixel, mixed between the object and what lies behind it, the main error source of region
   point sets. A true surface pixel on the silhouette jumps only towards the background and is kept,
   so sizes are not shrunk by a rim (a plane seen at 80 degrees incidence changes range by ~1 % per
   pixel at 500 px focal length, well under `EDGE_REL`);
3. confidence (when the backend gives one): pixels below half the region's median confidence are
   dropped (a scale-free rule: backends' confidence units differ);
4. separated outliers (an order-statistics rule): with d = distance of each point from the region's
   coordinate-wise median, sorted, the first gap in d wider than `GAP_REL` (5 %) of the typical camera
   range, past the nearest half of the points, cuts off every point beyond it: a separate surface
   (mask spill onto the background) or stray points. Unlike a MAD fence it never trims a continuous
   surface, however unevenly the views sample it (a box top seen at a grazing angle from one frame
   holds few points yet belongs to the box).

Speed: masks are never copied at full size; when a mask holds more pixels than a frame's share of
`MAX_POINTS`, it is read on a regular pixel grid (stride s in both directions), so gathering costs
O(points kept), not O(pixels in the mask).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from model.geometry.types import PointMaps
from model.inputs import RegionMask

MAX_POINTS = 12_000  # per region, over all its frames: ~110 x 110 samples, extents to well under 1 %
EDGE_REL = 0.04
GAP_REL = 0.05
CONF_FRACTION = 0.5

CLEANING = (f"valid depth; flying pixels at depth edges dropped (range between both neighbours along an image axis, each "
            f"> {EDGE_REL:.0%} away or without depth); "
            f"confidence < {CONF_FRACTION} x region median dropped (when given); outliers: sorted distance from the "
            f"median point beyond the first gap > {GAP_REL:.0%} of the camera range; grid-subsampled to <= {MAX_POINTS} points")


@dataclass
class RegionPoints:
    points: np.ndarray  # float64 [N, 3], world frame, point-map units
    total: int  # mask pixels over all frames (before subsampling and cleaning)
    frames: list[int]
    reason: str | None  # why there is nothing to measure, when `points` is empty


def _grid_pixels(mask: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, cols, mask pixel count): the mask read on a regular grid of at most ~`budget` pixels."""
    count = int(np.count_nonzero(mask))
    if count == 0:
        return np.empty(0, np.intp), np.empty(0, np.intp), 0
    stride = max(1, math.ceil(math.sqrt(count / max(budget, 1))))
    ys, xs = np.nonzero(mask[::stride, ::stride])
    return ys * stride, xs * stride, count


def _clean_pixels(pm: PointMaps, fs: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points of the valid, non-flying pixels among (fs, ys, xs), their ranges from their camera, keep mask)."""
    _, h, w = pm.valid.shape
    p = pm.points[fs, ys, xs].astype(np.float64)
    centre = pm.poses[fs, :3, 3].astype(np.float64)
    r = np.sqrt(((p - centre) ** 2).sum(axis=1))
    side = []  # per neighbour: (jumps, invalid, signed range difference)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny = np.minimum(np.maximum(ys + dy, 0), h - 1)
        nx = np.minimum(np.maximum(xs + dx, 0), w - 1)
        rn = np.sqrt(((pm.points[fs, ny, nx].astype(np.float64) - centre) ** 2).sum(axis=1))
        invalid = ~pm.valid[fs, ny, nx]
        side.append((invalid | (np.abs(rn - r) > EDGE_REL * r), invalid, r - rn))
    # A flying pixel sits between two depth levels: along one image axis it jumps against both
    # neighbours and its range lies between theirs (or one of them has no depth). A true surface pixel
    # on a silhouette jumps only towards the background, and a one-pixel sliver of an object (the tip
    # of a box's far corner) is nearer than both neighbours: both stay.
    ok = np.ones(len(r), dtype=bool)
    for (j1, i1, d1), (j2, i2, d2) in ((side[0], side[1]), (side[2], side[3])):
        ok &= ~(j1 & j2 & (i1 | i2 | (d1 * d2 < 0)))
    return p[ok], r[ok], ok


def _drop_separated(pts: np.ndarray, typical_range: float) -> np.ndarray:
    """Rule 4: sort the points by distance from the coordinate-wise median point; the first gap wider
    than GAP_REL x the typical camera range, after at least half of the points, cuts off everything
    beyond it (a separate surface: mask spill onto the background, stray points)."""
    med = np.median(pts, axis=0)
    d = np.sqrt(((pts - med) ** 2).sum(axis=1))
    order = np.argsort(d)
    gaps = np.diff(d[order])
    half = len(d) // 2
    wide = np.nonzero(gaps[half:] > GAP_REL * typical_range)[0]
    if len(wide) == 0:
        return pts
    return pts[order[:half + int(wide[0]) + 1]]


def gather(pm: PointMaps, masks: list[RegionMask], confidence: np.ndarray | None = None) -> RegionPoints:
    """All frames' masked points of one region, cleaned (see the module docstring)."""
    frames = sorted({int(m.frame) for m in masks})
    budget = max(64, MAX_POINTS // max(len(masks), 1))
    fs_l, ys_l, xs_l, total = [], [], [], 0
    for m in masks:
        ys, xs, count = _grid_pixels(np.asarray(m.mask, dtype=bool), budget)
        total += count
        fs_l.append(np.full(ys.size, int(m.frame), np.intp))
        ys_l.append(ys)
        xs_l.append(xs)
    if total == 0:
        return RegionPoints(np.empty((0, 3)), 0, frames, "the mask is empty")
    fs, ys, xs = np.concatenate(fs_l), np.concatenate(ys_l), np.concatenate(xs_l)
    keep = pm.valid[fs, ys, xs]
    if not keep.any():
        return RegionPoints(np.empty((0, 3)), total, frames, "no valid depth inside the mask")
    fs, ys, xs = fs[keep], ys[keep], xs[keep]
    pts, ranges, ok = _clean_pixels(pm, fs, ys, xs)
    if len(pts) == 0:
        return RegionPoints(np.empty((0, 3)), total, frames,
                            "every masked pixel with depth is a flying pixel at a depth edge (too thin to measure)")
    if confidence is not None:
        c = np.asarray(confidence[fs[ok], ys[ok], xs[ok]], dtype=np.float64)
        keep = c >= CONF_FRACTION * np.median(c)
        pts, ranges = pts[keep], ranges[keep]
    if len(pts) >= 8:
        pts = _drop_separated(pts, float(np.median(ranges)))
    if len(pts) < 4:
        return RegionPoints(np.empty((0, 3)), total, frames, f"only {len(pts)} points survive cleaning (need 4)")
    return RegionPoints(pts, total, frames, None)
