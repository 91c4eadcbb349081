"""Which point-map backend serves an input, and the depth-without-poses route.

Per-input default (setting "auto"):
  scene with depth + poses  -> "rgbd"           exact back-projection of the client's RGB-D
  scene with depth only     -> "pose_recovery"  poses recovered from the RGB-D frames (OpenCV)
  video                     -> "multiview"      Depth Anything 3: all frames in one registered frame
  image                     -> "single"         Depth Anything V2: one frame, its own camera
Any other setting forces that backend; "rgbd" / "pose_recovery" then need a scene that can feed
them (coded 422 otherwise), and "multiview" / "single" ignore an uploaded scene.

Scale: "rgbd" and "pose_recovery" are metric (the client's depth). "multiview" and "single" are relative,
unless a DA3 metric model is configured (SR3D_METRIC_MODEL): then their backends are wrapped by
model/geometry/metric.py (`with_metric_scale`), same routes and geometry, scale in metres from that model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from model.geometry.pose_recovery import pointmaps_without_poses
from model.geometry.rgbd import SceneError, pointmaps_from_rgbd
from model.geometry.types import PointMaps

Route = Literal["multiview", "single", "rgbd", "pose_recovery"]
BackendSetting = Literal["auto", "multiview", "single", "rgbd", "pose_recovery"]
ROUTES: tuple[Route, ...] = ("multiview", "single", "rgbd", "pose_recovery")


def choose_route(setting: str, *, is_video: bool, scene_depth: bool, scene_poses: bool) -> Route:
    if setting == "auto":
        if scene_depth:
            return "rgbd" if scene_poses else "pose_recovery"
        return "multiview" if is_video else "single"
    if setting == "rgbd" and not (scene_depth and scene_poses):
        raise SceneError("backend_needs_scene", "the rgbd point-map backend needs a scene with depth, intrinsics and poses")
    if setting == "pose_recovery" and not scene_depth:
        raise SceneError("backend_needs_scene", "the pose_recovery point-map backend needs a scene with depth and intrinsics")
    if setting not in ROUTES:
        raise ValueError(f"unknown point-map backend {setting!r}; one of auto, {', '.join(ROUTES)}")
    return setting  # type: ignore[return-value]


def registered_frames(route: Route, num_frames: int) -> int:
    """Frames a model route places in the shared canonical frame: all of them for multi-view (and
    exact RGB-D), only the reference for single-view (every other frame is its own camera)."""
    return 1 if route == "single" else num_frames


@dataclass
class RoutedPointMaps:
    pointmaps: PointMaps
    route: Route
    registered: int  # frames placed in the shared canonical frame
    unregistered: list[int]  # frames that could not be placed (their points are all invalid)


def pointmaps_recovering_poses(depth: np.ndarray, intrinsics: np.ndarray, images: np.ndarray) -> RoutedPointMaps:
    """Metric depth [F,H,W] + K + colour frames [F,H,W,3] (same size as the depth) without poses ->
    point maps in the first registered frame's camera. A frame that cannot be registered keeps its
    slot with no valid point and is listed, never given a made-up pose."""
    pm, result = pointmaps_without_poses(depth, intrinsics, images)
    registered = np.asarray(result.registered, dtype=bool)
    return RoutedPointMaps(pm, "pose_recovery", int(registered.sum()), np.flatnonzero(~registered).tolist())


def scene_pointmaps(route: Route, depth: np.ndarray, intrinsics: np.ndarray, poses: np.ndarray | None,
                    images: np.ndarray | None) -> RoutedPointMaps:
    """A client's RGB-D scene through its route: "rgbd" = exact back-projection with the given poses,
    "pose_recovery" = poses recovered from the colour frames `images` (pixel-aligned with `depth`).
    One place for the worker and `sr3d pointmaps`; `images`, when given, must match the depth's size."""
    if images is not None and images.shape[:3] != depth.shape:
        raise SceneError("scene_size_mismatch", f"scene depth is {list(depth.shape)} (frames, H, W) but the frames are "
                         f"{list(images.shape[:3])}")
    if route == "rgbd":
        if poses is None:
            raise SceneError("scene_missing_key", "exact RGB-D geometry needs poses in the scene")
        return RoutedPointMaps(pointmaps_from_rgbd(depth, intrinsics, poses), "rgbd", len(depth), [])
    if route == "pose_recovery":
        if images is None:
            raise ValueError("pose recovery needs the colour frames")
        return pointmaps_recovering_poses(depth, intrinsics, images)
    raise ValueError(f"{route!r} is not a scene route")
