"""Metric scale for plain videos and images: relative point maps scaled by Depth Anything 3's metric model.

The multi-view backend (DA3 any-view) registers all frames in one world frame but only up to one
unknown scale; the single-image backend (DA-V2) is relative too. DA3METRIC-LARGE
(model/geometry/da3/metric_net.py) predicts, per frame, depth in metres given the focal length in
pixels (metres = output * mean(fx, fy) / 300, the official convention). Like the official "nested" model
(a DA3 any-view model scaled by the metric model), this module keeps the relative geometry and only
fixes its scale, so the frames stay registered to each other:

  per frame i:  z_i = depth of the point maps in camera i (normalised units, from the maps and poses)
                f_i = median over usable pixels of metres_i / z_i   (metres per normalised unit)
  scale        = median over frames of f_i

Usable pixels: valid in the point maps, not sky in the metric model's sky map (< 0.3), metric depth
> 0.01 m and z > 0 (the official nested alignment's thresholds). The official nested model fits one
least-squares factor over all frames' confident pixels instead; medians are what a single bad frame or
a few flying pixels cannot move. The uncertainty reported is the spread of the per-frame factors (median
absolute deviation over the median; 0 for one frame) and the pooled per-pixel ratios' half inter-quartile
range over the median (what a single image can say).

The focal length converting the metric model's output is the point maps' own intrinsics (the DA3
prediction for videos, the client's when given), taken to the metric network's input pixels. For the
single-image route a focal predicted by DA3 (`intrinsics_from`) replaces DA-V2's default field of view,
both for back-projection and for the metres; without it the default is used and `focal_source` says so.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.device import resolve_device, thread_stream
from model.geometry.da3 import preprocess as da3_preprocess
from model.geometry.da3.metric_net import SKY_THRESHOLD, load_da3_metric, metric_depth
from model.geometry.types import PointMaps

log = logging.getLogger(__name__)

METRIC_NAME = "da3-metric"
MIN_METRES = 1e-2  # official compute_alignment_mask: metric depth > 0.01
MIN_PIXELS = 16  # a frame with fewer usable pixels gives no factor


class MetricDepthModel:
    """DA3METRIC-LARGE (or a checkpoint of its layout) predicting metres for frames with known intrinsics."""

    name = METRIC_NAME

    def __init__(self, model_dir: str, device: str = "auto", process_res: int = 504, dtype: torch.dtype | None = None,
                 head_chunk: int = 8) -> None:
        self.model_dir = model_dir
        self.device = resolve_device(device)
        self.process_res = process_res
        self.head_chunk = head_chunk
        # As the any-view backend: backbone under bf16 autocast on GPUs (the official inference does), head float32.
        self.autocast = dtype if dtype is not None else (torch.bfloat16 if self.device.type == "cuda" else None)
        self.net = load_da3_metric(model_dir, self.device)

    @torch.inference_mode()
    def predict(self, frames: np.ndarray, intrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [F, H, W, 3] + intrinsics [F, 3, 3] in pixels of these frames -> (metres float32 [F, H, W],
        not-sky bool [F, H, W]), at the frames' size. Pre-processing is DA3's (official resize, 504 long side)."""
        f, h, w, _ = frames.shape
        u8 = da3_preprocess.resize_frames(np.asarray(frames, dtype=np.uint8), self.process_res,
                                          self.net.config.backbone.patch_size)
        nh, nw = u8.shape[1:3]
        with thread_stream(self.device):
            out = self.net(da3_preprocess.normalise(u8, self.device), autocast_dtype=self.autocast, head_chunk=self.head_chunk)
            K = torch.as_tensor(np.asarray(intrinsics, dtype=np.float64), device=self.device)
            # The focal must be in pixels of the image the network saw: frame pixels * (network / frame size).
            fx = (K[:, 0, 0] * (nw / w)).float()[:, None, None]
            fy = (K[:, 1, 1] * (nh / h)).float()[:, None, None]
            metres = metric_depth(out.depth[0], fx, fy)
            metres = F.interpolate(metres[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            sky = F.interpolate(out.sky[0][:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            return metres.cpu().numpy(), (sky < SKY_THRESHOLD).cpu().numpy()


@dataclass(frozen=True)
class MetricScale:
    metres_per_unit: float  # the point maps' new `scale`
    frame_factors: tuple[float, ...]  # per frame (NaN: too few usable pixels)
    frames_used: int
    pixels_used: int
    spread_frames_rel: float  # median |f_i - scale| / scale over frames (0 for one frame)
    spread_pixels_rel: float  # (q75 - q25) / 2 / median of all usable pixels' ratios
    focal_source: str

    def to_dict(self) -> dict[str, Any]:
        return {"model": METRIC_NAME, "metres_per_unit": self.metres_per_unit, "frames_used": self.frames_used,
                "pixels_used": self.pixels_used, "spread_frames_rel": self.spread_frames_rel,
                "spread_pixels_rel": self.spread_pixels_rel, "focal_source": self.focal_source,
                "frame_factors_m_per_unit": [None if not np.isfinite(v) else v for v in self.frame_factors]}


def camera_depth(pm: PointMaps) -> np.ndarray:
    """z of every point in its own frame's camera, normalised units [F, H, W] (0 where invalid)."""
    R = pm.poses[:, :3, :3].astype(np.float64)  # camera-to-world
    t = pm.poses[:, :3, 3].astype(np.float64)
    # camera point = R^T (X - t); its z is the dot product of (X - t) with R's third column.
    z = np.einsum("fhwc,fc->fhw", pm.points.astype(np.float64) - t[:, None, None, :], R[:, :, 2])
    return np.where(pm.valid, z, 0.0)


def metric_scale(pm: PointMaps, metres: np.ndarray, not_sky: np.ndarray, focal_source: str = "point maps") -> MetricScale | None:
    """The metres-per-unit factor of relative point maps from metric depth of the same frames (module
    docstring); None when no frame has enough usable pixels."""
    z = camera_depth(pm)
    usable = pm.valid & not_sky & np.isfinite(metres) & (metres > MIN_METRES) & (z > 0)
    factors, ratios = [], []
    for i in range(len(z)):
        m = usable[i]
        if int(m.sum()) < MIN_PIXELS:
            factors.append(float("nan"))
            continue
        r = metres[i][m].astype(np.float64) / z[i][m]
        factors.append(float(np.median(r)))
        ratios.append(r)
    good = np.asarray([v for v in factors if np.isfinite(v)])
    if not len(good):
        return None
    scale = float(np.median(good))
    pooled = np.concatenate(ratios)
    q25, q50, q75 = np.quantile(pooled, [0.25, 0.5, 0.75])
    return MetricScale(
        metres_per_unit=scale, frame_factors=tuple(factors), frames_used=len(good), pixels_used=int(len(pooled)),
        spread_frames_rel=float(np.median(np.abs(good - scale)) / scale), spread_pixels_rel=float((q75 - q25) / 2 / q50),
        focal_source=focal_source,
    )


def apply_metric_scale(pm: PointMaps, s: MetricScale) -> PointMaps:
    """The same (normalised) points, now metric: `scale` = metres per unit, source naming both models."""
    return dataclasses.replace(pm, scale=s.metres_per_unit, metric=True, source=f"{pm.source} + {METRIC_NAME}",
                               scale_info=s.to_dict())


class MetricScaledBackend:
    """A relative point-map backend whose results are put in metres by the metric model. Same protocol
    (`compute`, `compute_many`); its name names both, so cached relative maps are never served as metric."""

    def __init__(self, relative: Any, metric: MetricDepthModel, intrinsics_from: Any | None = None) -> None:
        self.relative = relative
        self.metric = metric
        self.intrinsics_from = intrinsics_from  # a backend with `predict(frames)["intrinsics"]` (DA3 any-view)
        self.name = f"{relative.name} + {metric.name}"
        self.merges_jobs = getattr(relative, "merges_jobs", True)
        self.overlaps = getattr(relative, "overlaps", False)
        self.device = getattr(relative, "device", metric.device)

    def _focal_source(self, given: bool) -> str:
        from model.geometry.multiview import MultiViewBackend

        if given:
            return "given intrinsics"
        if self.intrinsics_from is not None:
            return f"predicted by {self.intrinsics_from.name}"
        if isinstance(self.relative, MultiViewBackend):
            return f"predicted by {self.relative.name}"
        return f"{self.relative.name}'s default field of view (no focal was predicted or given)"

    def compute(self, frames: np.ndarray, intrinsics: np.ndarray | None = None) -> PointMaps:
        return self.compute_many([frames], [intrinsics])[0]

    def compute_many(self, frames: list[np.ndarray], intrinsics: list[np.ndarray | None]) -> list[PointMaps]:
        if len(frames) != len(intrinsics):
            raise ValueError("one intrinsics entry (or None) per request")
        given = [k is not None for k in intrinsics]
        if self.intrinsics_from is not None:
            intrinsics = [k if k is not None else self.intrinsics_from.predict(fr)["intrinsics"] for fr, k in zip(frames, intrinsics)]
        out = []
        for fr, pm, g in zip(frames, self.relative.compute_many(frames, intrinsics), given):
            if pm.metric:  # already metric (a metric DA-V2 checkpoint): nothing to fix
                out.append(pm)
                continue
            metres, not_sky = self.metric.predict(fr, pm.intrinsics)
            s = metric_scale(pm, metres, not_sky, self._focal_source(g))
            if s is None:  # say so and stay relative: never a number from nothing
                log.warning("metric scale: no frame had %d usable pixels; point maps stay relative", MIN_PIXELS)
                out.append(dataclasses.replace(pm, scale_info={"model": METRIC_NAME, "unavailable": "no usable pixels"}))
            else:
                out.append(apply_metric_scale(pm, s))
        return out


def with_metric_scale(backends: dict[str, Any], metric: MetricDepthModel) -> dict[str, Any]:
    """The model routes' backends ("multiview", "single"), each scaled to metres by `metric`. The
    single-image route takes its focal from the multi-view model when that is loaded (one DA3 pass on the image)."""
    out = dict(backends)
    if "multiview" in backends:
        out["multiview"] = MetricScaledBackend(backends["multiview"], metric)
    if "single" in backends:
        out["single"] = MetricScaledBackend(backends["single"], metric, intrinsics_from=backends.get("multiview"))
    return out
