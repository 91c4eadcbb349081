"""`sr3d pointmaps INPUT --out scene.npz`: decode -> point maps -> canonical frame, as the worker does
(the same backend choice: model/geometry/routes.py), plus an optional PLY cloud and PNG preview.
The output (printed line and the npz's `depth_model`) names what produced the points: the client's
RGB-D, a depth checkpoint directory, or the tiny random-weight demo model, whose points mean nothing."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from service.media.decode_child import decode_video
from service.media.images import decode_image
from service.media.limits import MediaError, MediaLimits

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pointmaps", help="compute canonical 3D point maps of a video or image (npz, optional PLY)")
    p.add_argument("input", help="video (mp4/mov/webm/mkv) or image (png/jpeg)")
    p.add_argument("--out", required=True, help="output .npz (frames, points, valid, intrinsics, poses, scale, ...)")
    p.add_argument("--ply", help="also write a coloured point cloud (binary PLY) and a PNG preview next to it")
    p.add_argument("--preview", help="PNG preview path (default: the --ply path with .png)")
    p.add_argument("--backend", default=None, choices=["auto", "multiview", "single", "rgbd", "pose_recovery"],
                   help="point-map backend (default: SR3D_POINTMAP_BACKEND, auto)")
    p.add_argument("--multiview-model", default=None,
                   help="Depth Anything 3 directory (default: SR3D_MULTIVIEW_MODEL, else the tiny random demo model)")
    # Defaults (None) come from the worker's settings: SR3D_NUM_FRAMES, SR3D_DEPTH_MODEL, SR3D_DEVICE.
    p.add_argument("--frames", type=int, default=None, help="frames to sample (default: SR3D_NUM_FRAMES)")
    p.add_argument("--max-side", type=int, default=640, help="downscale frames so the long side is at most this")
    p.add_argument("--depth-model", default=None,
                   help="Depth Anything V2 directory (default: SR3D_DEPTH_MODEL, else the tiny random demo model)")
    p.add_argument("--rgbd", help="RGB-D scene npz (depth, intrinsics[, poses, depth_scale, frame_indices]): exact "
                   "geometry with poses, recovered poses without (`sr3d rgbd-npz` packs a folder such as "
                   "tests/data/rgbd into one, with a matching video)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: SR3D_DEVICE)")
    p.add_argument("--ply-points", type=int, default=200_000, help="PLY subsample size")
    p.set_defaults(func=run)


def compute(args: argparse.Namespace, limits: MediaLimits):
    """The worker's path: frames (rotation applied) -> chosen backend -> canonical, normalised point maps.
    Returns frames, indices, timestamps, PointMaps, route, frames registered."""
    from model.geometry import load_scene_npz
    from model.geometry.routes import choose_route, registered_frames, scene_pointmaps

    scene = load_scene_npz(Path(args.rgbd).read_bytes()) if args.rgbd else None
    is_image = Path(args.input).suffix.lower() in _IMAGE_SUFFIXES
    if is_image:
        frames = decode_image(args.input, limits)[None]
        indices, timestamps = np.zeros(1, np.int64), np.zeros(1)
    else:
        if scene is not None:  # the depth maps fix which frames are used, at full resolution
            wanted = scene.frame_indices if scene.frame_indices is not None else np.arange(len(scene.depth))
            video = decode_video(args.input, 0, limits, must_include=wanted.tolist())
        else:
            video = decode_video(args.input, args.frames, limits, max_side=args.max_side)
        frames, indices, timestamps = video.frames, video.indices, video.timestamps
    route = choose_route(args.backend, is_video=not is_image, scene_depth=scene is not None,
                         scene_poses=scene is not None and scene.poses is not None)
    if route in ("rgbd", "pose_recovery"):
        routed = scene_pointmaps(route, scene.depth, scene.intrinsics, scene.poses, frames)
        if routed.unregistered:
            print(f"warning: frames {routed.unregistered} could not be registered (no valid points)", file=sys.stderr)
        return frames, indices, timestamps, routed.pointmaps, route, routed.registered
    if route == "multiview":
        from model.geometry.multiview import MultiViewBackend

        pm = MultiViewBackend(args.multiview_model, device=args.device).compute(frames)
        return frames, indices, timestamps, pm, route, registered_frames(route, len(frames))
    from model.geometry import DepthAnythingBackend

    pm = DepthAnythingBackend(args.depth_model, device=args.device).compute(frames)
    return frames, indices, timestamps, pm, route, registered_frames(route, len(frames))


_TINY_NOTE = "random weights: not metric, not meaningful (demo and tests only)"


def depth_model_of(route: str, args: argparse.Namespace) -> tuple[str, str]:
    """(what produced the points, what that means for them), for the output line and the npz."""
    if route == "rgbd":
        return f"RGB-D depth from {args.rgbd}", "metric, exact back-projection of the given depth and poses"
    if route == "pose_recovery":
        return f"RGB-D depth from {args.rgbd}", "metric depth, poses recovered from the frames"
    if route == "multiview":
        if args.multiview_model:
            return f"Depth Anything 3 at {args.multiview_model}", "relative scale (not metric)"
        return "the tiny random Depth Anything 3 demo model (SR3D_MULTIVIEW_MODEL unset)", _TINY_NOTE
    if args.depth_model:
        return f"Depth Anything V2 at {args.depth_model}", "its own scale (metric only for a metric checkpoint)"
    return "the tiny random Depth Anything V2 demo model (SR3D_DEPTH_MODEL unset)", _TINY_NOTE


def write_ply(path: str, points: np.ndarray, colors: np.ndarray, valid: np.ndarray, limit: int, seed: int = 0) -> int:
    """Binary little-endian PLY of a random subsample of the valid points, coloured by their pixels."""
    idx = np.flatnonzero(valid.reshape(-1))
    if len(idx) > limit:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=limit, replace=False))
    xyz = points.reshape(-1, 3)[idx].astype("<f4")
    rgb = colors.reshape(-1, 3)[idx].astype(np.uint8)
    rec = np.empty(len(idx), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
    rec["x"], rec["y"], rec["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    rec["r"], rec["g"], rec["b"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment sr3d pointmaps (canonical frame, normalised units)\n"
        f"element vertex {len(idx)}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(rec.tobytes())
    return len(idx)


def run(args: argparse.Namespace) -> int:
    from model.geometry import SceneError
    from service.pipeline import media_limits
    from service.commands.config import settings_or_exit
    from service.settings import WorkerSettings

    settings = settings_or_exit(WorkerSettings, "pointmaps")  # the worker's own path
    args.frames = settings.num_frames if args.frames is None else args.frames
    args.depth_model = settings.depth_model if args.depth_model is None else args.depth_model
    args.device = settings.device if args.device is None else args.device
    args.backend = settings.pointmap_backend if args.backend is None else args.backend
    args.multiview_model = settings.multiview_model if args.multiview_model is None else args.multiview_model

    try:
        frames, indices, timestamps, pm, route, registered = compute(args, media_limits(settings))
    except (MediaError, SceneError) as e:
        print(f"error: {e.code}: {e.message}", file=sys.stderr)
        return 2
    except OSError as e:  # an unreadable --rgbd file
        print(f"error: {e}", file=sys.stderr)
        return 2
    depth_model, depth_note = depth_model_of(route, args)
    np.savez_compressed(
        args.out, frames=frames, points=pm.points, valid=pm.valid, intrinsics=pm.intrinsics, poses=pm.poses,
        scale=np.float64(pm.scale), metric=np.bool_(pm.metric), source=np.str_(pm.source), backend=np.str_(route),
        frames_registered=np.int64(registered), depth_model=np.str_(depth_model), depth_model_note=np.str_(depth_note),
        frame_indices=indices, timestamps=timestamps,
    )
    n = write_ply(args.ply, pm.points, frames, pm.valid, args.ply_points) if args.ply else 0
    preview = args.preview or (str(Path(args.ply).with_suffix(".png")) if args.ply else None)
    if preview:
        from service.commands.cloud_preview import render_preview

        render_preview(pm.points, frames, pm.valid, pm.poses, preview)
    print(
        f"{len(frames)} frames {frames.shape[2]}x{frames.shape[1]}, {int(pm.valid.sum())} valid points, "
        f"backend {route} ({pm.source}), {registered}/{len(frames)} frames registered, "
        f"scale {pm.scale:.4g}{' m/unit' if pm.metric else ' (relative)'} -> {args.out}"
        + (f", {n} points -> {args.ply}" if args.ply else "") + (f", preview -> {preview}" if preview else "")
    )
    print(f"depth model: {depth_model}: {depth_note}")
    return 0
