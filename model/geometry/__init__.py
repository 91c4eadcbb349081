"""Geometry: per-pixel 3D point maps in one canonical frame (depth backends, RGB-D, intrinsics, cache)."""
from model.geometry.cache import CacheKey, PointMapCache, cache_key
from model.geometry.intrinsics import (
    DEFAULT_FOV_X_DEG,
    intrinsics_from_fov,
    rotate_intrinsics,
    scale_intrinsics,
)
from model.geometry.project import backproject, canonicalize, normalize_scale
from model.geometry.rgbd import RGBDScene, SceneError, load_scene_npz, pointmaps_from_rgbd
from model.geometry.types import PointMapBackend, PointMaps


def __getattr__(name: str):
    # The depth-model backend imports torch/transformers: load it only when asked for.
    if name in ("DepthAnythingBackend", "build_tiny_depth_model", "build_large_shaped_depth_model", "disparity_to_depth"):
        from model.geometry import depth_anything

        return getattr(depth_anything, name)
    raise AttributeError(name)


__all__ = [
    "CacheKey", "PointMapCache", "cache_key", "DEFAULT_FOV_X_DEG", "intrinsics_from_fov",
    "rotate_intrinsics", "scale_intrinsics", "backproject", "canonicalize", "normalize_scale",
    "RGBDScene", "SceneError", "load_scene_npz", "pointmaps_from_rgbd", "PointMapBackend", "PointMaps",
    "DepthAnythingBackend", "build_tiny_depth_model", "build_large_shaped_depth_model", "disparity_to_depth",
]
