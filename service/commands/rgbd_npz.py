"""`sr3d rgbd-npz DIR --out scene.npz [--video frames.mp4] [--no-poses]`: pack an RGB-D folder into
the scene `.npz` that `sr3d pointmaps --rgbd` and the API's `scene` part take, and optionally its colour
frames into a video whose frame k is the folder's frame k (the npz's frame_indices then say 0..F-1),
so the pair can be sent as they are.

The folder is the layout of the shipped `tests/data/rgbd` (TUM RGB-D fr1_rpy, 10 frames):
  cameras.json   intrinsics.K (3x3 pinhole), depth.scale (PNG units per metre, 5000 for TUM), and
                 frames: [{depth: "depth/0000.png", color: "color/0000.png" (for --video),
                           T_world_cam: 4x4 camera-to-world (OpenCV axes),
                           video_frame_index...: the frame of the related video this depth belongs to}]
  depth/*.png    16-bit depth, 0 = no measurement
The npz keeps the depth as uint16 with `depth_scale` (the original bytes, a quarter of float32's size).
`--no-poses` leaves the poses out, so the service recovers them (the `pose_recovery` backend).
Reading files and stacking arrays only: no geometry here (model/geometry/rgbd.py checks the result).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

# The key of a frame's index in the related video: TUM's folder names the video in the key
# ("video_frame_index_in_tum_fr1_rpy_office_10s_mp4"); a plain "video_frame_index" is accepted too.
_FRAME_INDEX_PREFIX = "video_frame_index"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rgbd-npz", help="pack an RGB-D folder (cameras.json + depth/*.png, e.g. tests/data/rgbd) "
                                        "into the scene .npz that --rgbd and the API's `scene` part take")
    p.add_argument("folder", type=Path, help="folder with cameras.json and the depth PNGs it names")
    p.add_argument("--out", type=Path, required=True, help="the scene .npz to write")
    p.add_argument("--video", type=Path, default=None,
                   help="also write the colour frames as an H.264 .mp4 (5 fps), frame k = the folder's frame k")
    p.add_argument("--no-poses", action="store_true",
                   help="leave the camera poses out: the service then recovers them from the RGB-D frames")
    p.set_defaults(func=run)


class FolderError(ValueError):
    """The folder is not in the layout this command reads."""


def pack(folder: Path, poses: bool = True, sequential: bool = False) -> bytes:
    """The folder as npz bytes: depth [F,H,W] uint16, depth_scale, intrinsics [3,3], poses [F,4,4]
    (unless poses=False) and frame_indices [F]: 0..F-1 when `sequential` (the video write_video
    makes), else the related video's frames when every frame names one."""
    from PIL import Image

    try:
        cams: dict[str, Any] = json.loads((folder / "cameras.json").read_text())
        frames = cams["frames"]
        K = np.asarray(cams["intrinsics"]["K"], dtype=np.float64)
        scale = float(cams["depth"]["scale"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FolderError(f"{folder / 'cameras.json'}: not the expected layout ({type(e).__name__}: {e})") from None
    if not frames:
        raise FolderError(f"{folder / 'cameras.json'}: no frames")
    depth = []
    for f in frames:
        path = folder / f["depth"]
        with Image.open(path) as im:
            d = np.asarray(im)
        if d.dtype != np.uint16 and d.dtype != np.int32:
            raise FolderError(f"{path}: expected 16-bit depth, got {d.dtype}")
        depth.append(d.astype(np.uint16))
    arrays: dict[str, np.ndarray] = {"depth": np.stack(depth), "depth_scale": np.float64(scale), "intrinsics": K}
    if poses:
        arrays["poses"] = np.asarray([f["T_world_cam"] for f in frames], dtype=np.float64)
    index_keys = [next((k for k in f if k.startswith(_FRAME_INDEX_PREFIX)), None) for f in frames]
    if sequential:
        arrays["frame_indices"] = np.arange(len(frames), dtype=np.int64)
    elif all(index_keys):
        arrays["frame_indices"] = np.asarray([f[k] for f, k in zip(frames, index_keys)], dtype=np.int64)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def write_video(folder: Path, out: Path, fps: int = 5) -> int:
    """The frames' colour images as H.264 (yuv444p, crf 10: near-lossless colours for the cloud)."""
    import av
    from PIL import Image

    frames = json.loads((folder / "cameras.json").read_text())["frames"]
    with av.open(str(out), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.pix_fmt, stream.options = "yuv444p", {"crf": "10"}
        for k, f in enumerate(frames):
            with Image.open(folder / f["color"]) as im:
                rgb = np.asarray(im.convert("RGB"))
            if k == 0:
                stream.height, stream.width = rgb.shape[:2]
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return len(frames)


def run(args: argparse.Namespace) -> int:
    try:
        data = pack(args.folder, poses=not args.no_poses, sequential=args.video is not None)
        if args.video is not None:
            write_video(args.folder, args.video)
    except (FolderError, OSError, KeyError) as e:
        print(f"sr3d rgbd-npz: {e}", file=sys.stderr)
        return 2
    args.out.write_bytes(data)
    with np.load(io.BytesIO(data)) as z:
        n, h, w = z["depth"].shape
        what = "poses" if "poses" in z else "no poses (recovered by the service)"
        idx = f", video frames {z['frame_indices'].tolist()}" if "frame_indices" in z else ""
    video = f", colour frames -> {args.video}" if args.video is not None else ""
    print(f"{n} depth frames {w}x{h}, {what}{idx} -> {args.out} ({len(data)} bytes){video}")
    return 0
