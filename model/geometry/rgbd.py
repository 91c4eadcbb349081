"""Exact point maps from client-supplied RGB-D (depth + intrinsics + camera-to-world poses): no model."""
from __future__ import annotations

import io
import math
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.errors import CodedError
from model.geometry.intrinsics import broadcast_intrinsics
from model.geometry.project import backproject, finalize
from model.geometry.types import PointMaps

MAX_SCENE_FRAMES = 64
MAX_SCENE_PIXELS = 3840 * 2160
_DEPTH_DTYPES = {np.dtype(t) for t in ("uint16", "float16", "float32", "float64")}


class SceneError(CodedError, ValueError):
    """Invalid RGB-D scene upload (a client error); `code` is stable, the API layer picks the status."""


@dataclass
class RGBDScene:
    depth: np.ndarray  # float32 [F, H, W] metres, 0 = no measurement
    intrinsics: np.ndarray  # float64 [F, 3, 3]
    poses: np.ndarray | None  # float64 [F, 4, 4] camera-to-world, OpenCV camera axes; None = to be recovered
    frame_indices: np.ndarray | None = None  # int64 [F]: which video frames the depth maps belong to


# Decoded-size budget of a whole scene upload, checked from the .npy headers before any member is
# inflated (an npz of zeros compresses ~1000:1, so the upload size says nothing). 64 frames of
# 640x480 float32 is 79 MB; one 3840x2160 float64 frame is 66 MB.
MAX_SCENE_DECODED_BYTES = 256 << 20
# Depth pixels over all frames: what back-projection later holds at ~64 B/pixel (float64 depth,
# points, validity, normalised copy), so this caps the point-map stage at ~1.3 GB.
MAX_SCENE_DEPTH_PIXELS = 20_000_000


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def nbytes(self) -> int:
        # Python ints: a header shape whose product overflows int64 is just "too large", not a crash.
        return math.prod(self.shape) * self.dtype.itemsize


def _read_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _headers(zf: zipfile.ZipFile) -> dict[str, _Member]:
    """Shape and dtype of every array from its .npy header, before reading any data (zip-bomb safe)."""
    out = {}
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            continue
        with zf.open(info) as f:
            shape, fortran_order, dtype = _read_header(f)
        if any(int(n) < 0 for n in shape):
            raise ValueError(f"{info.filename}: negative dimension in {list(shape)}")
        out[info.filename[:-4]] = _Member(info, tuple(int(n) for n in shape), dtype, bool(fortran_order))
    return out


def _read_member(zf: zipfile.ZipFile, m: _Member) -> np.ndarray:
    """One array, inflated exactly to its header's size (a member longer or shorter is rejected)."""
    with zf.open(m.info) as f:
        _read_header(f)
        raw = f.read(m.nbytes + 1)
    if len(raw) != m.nbytes:
        raise SceneError("invalid_scene_file", f"{m.info.filename}: data is {len(raw)} bytes, its header says {m.nbytes}")
    order = "F" if m.fortran_order else "C"
    return np.frombuffer(raw, dtype=m.dtype).reshape(m.shape, order=order)


def _read_depth(zf: zipfile.ZipFile, m: _Member, shape: tuple[int, int, int], scale: float | None) -> np.ndarray:
    """Depth as float32 metres [F,H,W], inflated one frame at a time into the output array (no
    full-size float64 copy and no astype chain: peak = the float32 result + one source frame)."""
    f, h, w = shape
    out = np.empty((f, h, w), np.float32)
    if m.fortran_order and f > 1:  # frames are interleaved in Fortran order: no per-frame reads
        out[:] = _read_member(zf, m).reshape(shape, order="F")
    else:
        frame_bytes = h * w * m.dtype.itemsize
        with zf.open(m.info) as fh:
            _read_header(fh)
            for i in range(f):
                raw = fh.read(frame_bytes)
                if len(raw) != frame_bytes:
                    raise SceneError("invalid_scene_file", f"depth data ends at frame {i} of {f}")
                out[i] = np.frombuffer(raw, dtype=m.dtype).reshape((h, w), order="F" if m.fortran_order else "C")
    if scale is not None:
        out /= np.float32(scale)
    return out


def load_scene_npz(
    data: bytes,
    max_frames: int = MAX_SCENE_FRAMES,
    max_pixels: int = MAX_SCENE_PIXELS,
    max_decoded_bytes: int = MAX_SCENE_DECODED_BYTES,
    max_depth_pixels: int = MAX_SCENE_DEPTH_PIXELS,
) -> RGBDScene:
    """Validate and load an RGB-D scene npz. Keys: depth [F,H,W] (uint16 with depth_scale, or float
    metres), intrinsics [3,3] | [F,3,3]; optional poses [F,4,4] camera-to-world (absent: recovered, see
    model.geometry.routes), depth_scale (units per metre, e.g. 5000 for TUM), frame_indices [F]
    (original video frame of each depth map).

    Every size check runs on the headers, before any member is inflated: frames, pixels per frame,
    depth pixels overall and decoded bytes of all members together."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        headers = _headers(zf)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise SceneError("invalid_scene_file", f"not a numpy .npz file ({e})") from None
    for key in ("depth", "intrinsics"):
        if key not in headers:
            raise SceneError("scene_missing_key", f"scene npz needs key {key!r}")
    for key, m in headers.items():
        if m.dtype.hasobject:
            raise SceneError("scene_bad_dtype", f"{key} holds Python objects")
    decoded = sum(m.nbytes for m in headers.values())
    if decoded > max_decoded_bytes:
        raise SceneError("scene_too_large", f"the scene's arrays decode to {decoded} bytes > {max_decoded_bytes}")
    shape = headers["depth"].shape
    dtype = headers["depth"].dtype
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise SceneError("scene_bad_shape", f"depth must be [F,H,W], got {list(shape)}")
    f, h, w = shape
    if not (1 <= f <= max_frames) or h * w > max_pixels or h < 1 or w < 1 or f * h * w > max_depth_pixels:
        raise SceneError("scene_too_large", f"depth {list(shape)} exceeds {max_frames} frames / {max_pixels} px per "
                         f"frame / {max_depth_pixels} px in all")
    if dtype not in _DEPTH_DTYPES:
        raise SceneError("scene_bad_dtype", f"depth dtype {dtype} not in uint16/float16/float32/float64")
    for key, m in headers.items():
        if key != "depth" and math.prod(m.shape) > 16 * max_frames:
            raise SceneError("scene_bad_shape", f"{key} is too large: {list(m.shape)}")
    try:
        arrays = {k: _read_member(zf, m) for k, m in headers.items() if k != "depth"}
        scale = None
        if "depth_scale" in arrays:
            scale = float(np.asarray(arrays["depth_scale"], dtype=np.float64).reshape(-1)[0])
            if not np.isfinite(scale) or scale <= 0:
                raise SceneError("scene_bad_value", f"depth_scale must be > 0, got {scale}")
        elif dtype == np.uint16:
            raise SceneError("scene_missing_key", "uint16 depth needs depth_scale (units per metre, e.g. 5000)")
        depth = _read_depth(zf, headers["depth"], (f, h, w), scale)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise SceneError("invalid_scene_file", f"corrupt npz member ({e})") from None

    if not np.isfinite(depth).all() or (depth < 0).any():
        raise SceneError("scene_bad_value", "depth must be finite and >= 0 (0 = no measurement)")

    try:
        K = broadcast_intrinsics(arrays["intrinsics"], f)
    except ValueError as e:
        raise SceneError("scene_bad_shape", str(e)) from None
    if not np.isfinite(K).all() or (K[:, 0, 0] <= 0).any() or (K[:, 1, 1] <= 0).any():
        raise SceneError("scene_bad_value", "intrinsics need finite, positive focal lengths")
    if not np.allclose(K[:, 2], [0.0, 0.0, 1.0]):
        raise SceneError("scene_bad_value", "intrinsics' last row must be [0, 0, 1]")

    poses = _poses(arrays["poses"], f) if "poses" in arrays else None

    frame_indices = None
    if "frame_indices" in arrays:
        fi = np.asarray(arrays["frame_indices"]).reshape(-1)
        if fi.shape != (f,) or not np.issubdtype(fi.dtype, np.integer) or (fi < 0).any():
            raise SceneError("scene_bad_value", f"frame_indices must be {f} non-negative integers")
        if len(np.unique(fi)) != f or (np.diff(fi) <= 0).any():
            raise SceneError("scene_bad_value", "frame_indices must be strictly increasing")
        frame_indices = fi.astype(np.int64)
    return RGBDScene(depth=depth, intrinsics=K, poses=poses, frame_indices=frame_indices)


def _poses(raw: np.ndarray, f: int) -> np.ndarray:
    poses = np.asarray(raw, dtype=np.float64)
    if poses.shape == (4, 4) and f == 1:
        poses = poses[None]
    if poses.shape != (f, 4, 4):
        raise SceneError("scene_bad_shape", f"poses must be [{f},4,4], got {list(poses.shape)}")
    if not np.isfinite(poses).all() or not np.allclose(poses[:, 3], [0.0, 0.0, 0.0, 1.0]):
        raise SceneError("scene_bad_value", "poses must be finite with last row [0, 0, 0, 1]")
    R = poses[:, :3, :3]
    if not np.allclose(R @ R.transpose(0, 2, 1), np.eye(3), atol=1e-3) or not np.allclose(
        np.linalg.det(R), 1.0, atol=1e-3
    ):
        raise SceneError("scene_bad_value", "pose rotations must be proper rotations (R R^T = I, det 1)")
    return poses


def pointmaps_from_rgbd(
    depth: np.ndarray, intrinsics: np.ndarray, poses: np.ndarray, reference_frame: int = 0
) -> PointMaps:
    """Metric depth [F,H,W] (0 = hole) + K [3,3]|[F,3,3] + camera-to-world poses [F,4,4] -> PointMaps
    in the reference camera's frame, normalised; `scale` = metres per unit, `metric` True."""
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim == 2:
        depth = depth[None]
    K = broadcast_intrinsics(intrinsics, depth.shape[0])
    valid = np.isfinite(depth) & (depth > 0)
    points = backproject(np.where(valid, depth, 0.0), K)
    return finalize(points, valid, K, poses, metric=True, source="rgbd", reference_frame=reference_frame)
