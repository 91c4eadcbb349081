"""Which point-map backend serves an input, and the depth-without-poses route.

Per-input default (setting "auto"):
  scene with depth + poses  -> "rgbd"           exact back-projection of the client's RGB-D
  scene with depth only     -> "pose_recovery"  poses recovered from the RGB-D frames (OpenCV)
  video                     -> "multiview"      Depth Anything 3: all frames in one registered frame
  image                     -> "single"         Depth Anything V2: one frame, its own camera
Any other setting forces that backend; "rgbd" / "pose_recovery" then need a scene that can feed
them (coded 422 otherwise), and "multiview" / "single" ignore an uploaded scene.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from model.geometry.pose_recovery import pointmaps_without_poses
from model.geometry.rgbd import SceneError
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
