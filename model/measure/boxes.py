"""A gravity-aligned oriented box around one region's points.

Height = the extent along up. The footprint (the points projected on the horizontal plane) gets the
minimum-area enclosing rectangle over yaw: a coarse search at 1 degree over [-45, 45), refined at
0.05 degree around the best angle (exact for the rectangular footprints of furniture and boxes, and,
unlike principal axes, not pulled by which faces the cameras happened to see). Extents come from
inner quantiles extrapolated to the edge (see `_range`), so neither stray points nor depth noise
stretch a box.
Width is the rectangle side nearer the reference view's left-right axis, depth the other one
(SpatialRGPT's width is the extent along that left-right axis; equal for boxes facing the camera).

Limits, stated rather than hidden: a box is fitted to the surfaces the frames saw. From one view the
hidden back of an object is not measured (its depth, and so its centre, come from the visible faces);
a surface seen at a grazing angle is sampled coarsely (a box top 6 m away at 10 degrees elevation spans
~3 pixel rows at 320x240, one row being ~10 % of its depth). Jobs with several views fill both in.
"""
from __future__ import annotations

import numpy as np

from model.measure.gravity import GravityFrame
from model.measure.types import OrientedBox

TRIM = 0.25  # the outermost quantile (percent from each end) an extent may reach
_SEARCH_POINTS = 1500


def _extents(xz: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Footprint area of the enclosing rectangle at each angle (radians) -> [len(angles)]."""
    c, s = np.cos(angles), np.sin(angles)
    u = xz[:, :1] * c + xz[:, 1:] * s  # along the rotated width axis
    v = -xz[:, :1] * s + xz[:, 1:] * c
    return (u.max(0) - u.min(0)) * (v.max(0) - v.min(0))


def _range(x: np.ndarray) -> tuple[float, float]:
    """Both ends of one extent. Each end is the line through two inner quantiles (1 % and 5 % from
    that end) extrapolated to 0 %, clamped between the `TRIM` % quantile and the 1 % one. For a
    surface sampled evenly along the axis (plus faces piled at the ends) that line meets the true edge,
    with or without symmetric depth noise, whereas a plain outer quantile lands in the noise's tail;
    the clamp bounds the error on unevenly sampled shapes (a sphere's rim) to 1 % of the points."""
    q_lo, q1, q2, r2, r1, q_hi = np.percentile(x, [TRIM, 1.0, 5.0, 95.0, 99.0, 100 - TRIM])
    lo = min(max(q1 - (q2 - q1) / 4.0, q_lo), q1)
    hi = max(min(r1 + (r1 - r2) / 4.0, q_hi), r1)
    return float(lo), float(hi)


def fit_box(points: np.ndarray, frame: GravityFrame) -> OrientedBox:
    local = frame.to_local(points)  # columns: right, up, forward
    xz = local[:, [0, 2]]
    search = xz if len(xz) <= _SEARCH_POINTS else xz[np.linspace(0, len(xz) - 1, _SEARCH_POINTS).astype(int)]
    search = search - search.mean(axis=0)
    coarse = np.radians(np.arange(-45.0, 45.0, 1.0))
    best = coarse[int(np.argmin(_extents(search, coarse)))]
    fine = best + np.radians(np.arange(-1.0, 1.0001, 0.05))
    yaw = float(fine[int(np.argmin(_extents(search, fine)))])
    yaw = (yaw + np.pi / 4) % (np.pi / 2) - np.pi / 4  # into [-45, 45) degrees
    c, s = np.cos(yaw), np.sin(yaw)
    u = xz[:, 0] * c + xz[:, 1] * s
    v = -xz[:, 0] * s + xz[:, 1] * c
    (u0, u1), (h0, h1), (v0, v1) = _range(u), _range(local[:, 1]), _range(v)
    cu, ch, cv = (u0 + u1) / 2, (h0 + h1) / 2, (v0 + v1) / 2
    # Back to the gravity frame, then the world.
    centre_local = np.array([cu * c - cv * s, ch, cu * s + cv * c])
    width_axis = frame.to_world(np.array([c, 0.0, s])) - frame.origin
    depth_axis = frame.to_world(np.array([-s, 0.0, c])) - frame.origin
    return OrientedBox(
        center=frame.to_world(centre_local).tolist(),
        size=[u1 - u0, h1 - h0, v1 - v0],
        yaw=float(np.degrees(yaw)),
        axes=[width_axis.tolist(), frame.up.tolist(), depth_axis.tolist()],
    )
