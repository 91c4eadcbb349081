"""`measure_scene`: every region's box and every pair's relations, with the scale stated honestly.

Scale: metric point maps (`pm.metric`, e.g. RGB-D depth in metres) give metres (`pm.points * pm.scale`).
Otherwise lengths stay in the point map's normalised units, `scale="relative"`, `unit=None`; only
ratios and comparisons mean anything then. A `ScaleHint` (one known length) multiplies every length
so that the named region's dimension equals it, and `source` says so; it names a region that
cannot be measured -> the scene stays as it was and `source` says the hint was not applied.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np

from model.errors import ModelInputError
from model.geometry.types import PointMaps
from model.inputs import RegionMask
from model.measure.boxes import fit_box
from model.measure.gravity import estimate_up, gravity_frame
from model.measure.pairs import measure_pair
from model.measure.points import CLEANING, gather
from model.measure.types import Measurements, OrientedBox, RegionMeasurement, ScaleHint


def _source_name(pm: PointMaps) -> str:
    if pm.source == "rgbd":
        return "rgbd depth" if pm.metric else "rgbd depth (relative)"
    return f"{pm.source} ({'metric' if pm.metric else 'relative'})"


def _scaled(box: OrientedBox, k: float) -> OrientedBox:
    return OrientedBox(center=[c * k for c in box.center], size=[s * k for s in box.size], yaw=box.yaw,
                       axes=box.axes)


def measure_scene(pm: PointMaps, regions: list[list[RegionMask]], *, confidence: np.ndarray | None = None,
                  scale_hint: ScaleHint | None = None) -> Measurements:
    """Measure every region (its masks on all frames are one point set) and every pair (a < b).

    Raises ModelInputError("bad_scale_hint") when the hint names a region that is not in `regions`,
    and ModelInputError("bad_region_frame") when a mask names a frame the point maps do not have."""
    n_frames = pm.points.shape[0]
    if scale_hint is not None and not 0 <= scale_hint.region < len(regions):
        raise ModelInputError("bad_scale_hint",
                              f"scale_hint names region {scale_hint.region}, the request has {len(regions)} region(s)")
    for k, masks in enumerate(regions):
        for m in masks:
            if not 0 <= int(m.frame) < n_frames:
                raise ModelInputError("bad_region_frame", f"region {k} names frame {m.frame} of {n_frames}")
            if np.shape(m.mask) != pm.valid.shape[1:]:
                raise ModelInputError("mask_size_mismatch",
                                      f"region {k}: mask {np.shape(m.mask)} vs point maps {pm.valid.shape[1:]}")

    if confidence is not None and np.shape(confidence) != pm.valid.shape:
        raise ModelInputError("bad_pointmap", f"confidence {np.shape(confidence)} vs point maps {pm.valid.shape}")
    up = estimate_up(pm)
    frame = gravity_frame(pm, np.asarray(up.vector))
    factor = float(pm.scale) if pm.metric else 1.0
    scale, unit, source = ("metric", "m", _source_name(pm)) if pm.metric else ("relative", None, _source_name(pm))

    point_sets: list[np.ndarray] = []
    raw: list[RegionMeasurement] = []
    for k, masks in enumerate(regions):
        rp = gather(pm, masks, confidence)
        point_sets.append(rp.points)
        if rp.reason is not None:
            raw.append(RegionMeasurement(region=k, available=False, reason=rp.reason, points_total=rp.total,
                                         frames=rp.frames, cleaning=CLEANING))
            continue
        box = fit_box(rp.points, frame)
        raw.append(RegionMeasurement(region=k, available=True, centroid=rp.points.mean(axis=0).tolist(), box=box,
                                     points_used=len(rp.points), points_total=rp.total, frames=rp.frames,
                                     cleaning=CLEANING))

    if scale_hint is not None:
        target = raw[scale_hint.region]
        if target.available and target.box is not None:
            w, h, d = target.box.size
            measured = {"width": w, "height": h, "depth": d, "longest": max(w, h, d)}[scale_hint.dimension]
            if measured > 0:
                factor = scale_hint.metres / measured
                scale, unit = "metric", "m"
                source = (f"scaled by scale_hint on region {scale_hint.region} {scale_hint.dimension} "
                          f"({scale_hint.metres:g} m) from {_source_name(pm)}")
        else:
            source += f"; scale_hint not applied: region {scale_hint.region} is not measurable ({target.reason})"

    out: list[RegionMeasurement] = []
    for r in raw:
        if r.available and r.box is not None:
            box = _scaled(r.box, factor)
            w, h, d = box.size
            r.box, r.centroid = box, [c * factor for c in (r.centroid or [])]
            r.width, r.height, r.depth, r.longest, r.volume = w, h, d, max(w, h, d), w * h * d
        out.append(r)
    pairs = [measure_pair(out[a], out[b], point_sets[a], point_sets[b], frame, factor)
             for a, b in combinations(range(len(out)), 2)]
    return Measurements(scale=scale, unit=unit, source=source, up=up, regions=out, pairs=pairs)
