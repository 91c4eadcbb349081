"""Media + depth benchmark: decode time (32 frames of generated 720p/1080p H.264) and depth frames/s.

Compares, within one run: isolated (killable child process) vs in-process decode, full size vs
`max_side=640`, keyframe seeking vs decoding every frame on a long clip (`--long-seconds`), and depth
batch size 1 vs N. The depth run is also split into its stages for one
request: host-to-device copy of the uint8 frames, the image processor (resize + normalise, on the
device), the network, resize to the frame size, geometry (disparity -> depth -> points -> canonical
-> scaled, on the device) and the host copy of the float32 point maps + validity (through pinned
memory, as `finalize` does, and the plain pageable `.cpu()` for comparison); on a GPU the post-processing (resize + geometry) is timed on
the CPU too, for the ratio. It also times 4 requests in one `compute_many` (what the worker's
PointMapBatcher sends) against 4 separate calls, and the network at a smaller processor size.
Depth frames are --depth-size (default 640x480, the engine bench's workload) random uint8 frames.
`--real-shapes` uses random weights in the Depth-Anything-V2-Large shape (meant for the GPU
machine; on CPU use `--frames 2`).

`backends` compares the two point-map backends a video can take, as the worker builds them, on the
same request (--frames frames of --depth-size): per-frame Depth Anything V2 (DepthAnythingBackend
defaults) against the multi-view Depth Anything 3 port (MultiViewBackend defaults: 504 px long
side, all frames in one pass): seconds per request and peak GPU memory. `--real-shapes` gives them
random weights in the DA-V2-Large and DA3 `--multiview-preset` (default da3-base) shapes; without it
both are the tiny random models (a CPU smoke run).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.report import save_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="directory for media.json + media.png")
    p.add_argument("--frames", type=int, default=32, help="frames sampled per decode / depth run")
    p.add_argument("--source-seconds", type=float, default=5.0, help="length of the generated clips (30 fps)")
    p.add_argument("--long-seconds", type=float, default=60.0,
                   help="length of the long clips (30 fps) on which keyframe seeking is compared with decoding every frame")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--real-shapes", action="store_true", help="Depth-Anything-V2-Large-shaped random weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8, help="depth batch size compared against 1")
    p.add_argument("--depth-size", default="640x480", help="WxH of the depth benchmark's frames")
    p.add_argument("--small-input-size", type=int, default=392, help="processor size compared against the checkpoint's")
    p.add_argument("--skip-decode", action="store_true", help="depth only")
    p.add_argument("--skip-depth", action="store_true", help="skip the DA-V2 batch/stage detail (backends only)")
    p.add_argument("--skip-backends", action="store_true", help="skip the DA-V2 vs DA3 multi-view comparison")
    p.add_argument("--multiview-preset", default="da3-base", choices=["da3-small", "da3-base", "da3-large", "da3-giant"],
                   help="DA3 shape for --real-shapes")


def make_clip(path: Path, width: int, height: int, seconds: float, fps: int = 30) -> Path:
    """Moving gradient + noise, libx264 ultrafast, keyframe every second (a typical phone-ish GOP)."""
    import av  # here, not at the top: the backends comparison runs where PyAV is not installed

    out = av.open(str(path), "w")
    s = out.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = width, height, "yuv420p"
    s.options = {"preset": "ultrafast", "g": str(fps), "crf": "23"}
    s.codec_context.time_base = Fraction(1, fps)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 32, (height, width, 1), dtype=np.uint8)
    for i in range(int(seconds * fps)):
        img = ((x + y * 0.5 + i * 4) % 256).astype(np.uint8) + noise
        frame = av.VideoFrame.from_ndarray(np.broadcast_to(img, (height, width, 3)).copy(), format="rgb24")
        for p in s.encode(frame):
            out.mux(p)
    for p in s.encode():
        out.mux(p)
    out.close()
    return path


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_decode(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from service.media.decode_child import decode_video
    from service.media.limits import MediaLimits

    # The generated clips are noisy (large for their length): the upload cap is not what is measured here.
    limits = MediaLimits(max_frames=max(64, args.frames), max_bytes=4 << 30)
    result: dict[str, Any] = {}
    for name, (w, h) in {"720p": (1280, 720), "1080p": (1920, 1080)}.items():
        t = time.perf_counter()
        clip = make_clip(tmp / f"{name}.mp4", w, h, args.source_seconds)
        encode_s = time.perf_counter() - t
        decode_video(clip, 2, limits)  # warm the forkserver
        row = {
            "source_frames": int(args.source_seconds * 30),
            "encode_s": round(encode_s, 3),
            "isolated_s": _time(lambda: decode_video(clip, args.frames, limits), args.repeats),
            "in_process_s": _time(lambda: decode_video(clip, args.frames, limits, isolate=False), args.repeats),
            "isolated_max_side_640_s": _time(lambda: decode_video(clip, args.frames, limits, max_side=640), args.repeats),
        }
        # Long uploads: the sampled frames are sparser than the keyframes, so seeking skips most of the video
        long_clip = make_clip(tmp / f"{name}-long.mp4", w, h, args.long_seconds)
        sampled = decode_video(long_clip, args.frames, limits)
        row["long_source_frames"] = int(args.long_seconds * 30)
        row["long_frames_decoded"] = sampled.frames_decoded
        row["long_isolated_s"] = _time(lambda: decode_video(long_clip, args.frames, limits), args.repeats)
        row["long_isolated_no_seek_s"] = _time(lambda: decode_video(long_clip, args.frames, limits, seek=False), args.repeats)
        row["long_seek_speedup"] = round(row["long_isolated_no_seek_s"] / row["long_isolated_s"], 3)
        row["isolation_overhead_ratio"] = round(row["isolated_s"] / row["in_process_s"], 3)
        row["max_side_640_speedup"] = round(row["isolated_s"] / row["isolated_max_side_640_s"], 3)
        row["frames_per_s_isolated"] = round(args.frames / row["isolated_s"], 1)
        result[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
    return result


def bench_depth(tmp: Path, frames: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from model.geometry.depth_anything import (
        DepthAnythingBackend,
        build_large_shaped_depth_model,
        build_tiny_depth_model,
    )

    model_dir = str(tmp / "depth")
    (build_large_shaped_depth_model if args.real_shapes else build_tiny_depth_model)(model_dir)
    out: dict[str, Any] = {"model": "da-v2-large-shaped" if args.real_shapes else "tiny", "frames": len(frames),
                           "frame_size": list(frames.shape[1:3])}
    for bs in (1, args.batch_size):
        backend = DepthAnythingBackend(model_dir, device=args.device, batch_size=bs)
        backend.predict([frames[:1]])  # warm-up (allocator, cuDNN autotune)

        def once() -> None:
            backend.compute(frames)
            if backend.device.type == "cuda":
                torch.cuda.synchronize()

        seconds = _time(once, args.repeats)
        out[f"batch_{bs}"] = {"seconds": round(seconds, 4), "frames_per_s": round(len(frames) / seconds, 2)}
        out["device"] = str(backend.device)
        if bs == args.batch_size:
            out["stages"] = bench_stages(backend, frames, args.repeats)
        del backend
    out["small_input"] = bench_input_size(model_dir, frames, args, out["stages"]["network_s"])
    out["batching_speedup"] = round(out[f"batch_{args.batch_size}"]["frames_per_s"] / out["batch_1"]["frames_per_s"], 3)
    return out


def bench_stages(backend: Any, frames: np.ndarray, repeats: int) -> dict[str, Any]:
    """Seconds per stage of `compute` for one request (median of `repeats`, device synchronised)."""
    import torch

    from model.geometry.project import to_host

    sync = torch.cuda.synchronize if backend.device.type == "cuda" else (lambda: None)
    size = tuple(frames.shape[1:3])

    def timed(fn) -> float:
        return _time(lambda: (fn(), sync()), repeats)

    x = torch.from_numpy(frames).to(backend.device).permute(0, 3, 1, 2)
    pixels = backend.preprocess(x)
    raw = backend.network(pixels)
    pred = backend.resize(raw, size)
    pm = backend.pointmaps_from_prediction(pred)
    points = torch.from_numpy(pm.points).to(backend.device)
    valid = torch.from_numpy(pm.valid).to(backend.device)
    row: dict[str, Any] = {
        "network_input_size": list(pixels.shape[2:]),
        "raw_size": list(raw.shape[1:]),
        "h2d_s": timed(lambda: torch.from_numpy(frames).to(backend.device)),
        "processor_s": timed(lambda: backend.preprocess(x)),
        "network_s": timed(lambda: backend.network(pixels)),
        "forward_s": timed(lambda: backend.forward(frames)),  # h2d + processor + network, in batch_size chunks
        "resize_s": timed(lambda: backend.resize(raw, size)),
        "geometry_s": timed(lambda: backend.pointmaps_from_prediction(pred)),  # ends in the host copy
        "host_copy_s": timed(lambda: (to_host(points), to_host(valid))),  # what geometry ends in
        "host_copy_pageable_s": timed(lambda: (points.cpu(), valid.cpu())),  # the plain .cpu() it replaced
        "compute_s": timed(lambda: backend.compute(frames)),
    }
    row["geometry_on_device_s"] = row["geometry_s"] - row["host_copy_s"]
    row["host_copy_mb"] = (pm.points.nbytes + pm.valid.nbytes) / 1e6
    row["postprocess_s"] = row["resize_s"] + row["geometry_s"]
    row["postprocess_share"] = row["postprocess_s"] / row["compute_s"]
    many = [frames] * 4
    row["compute_many_4_requests_s"] = timed(lambda: backend.compute_many(many, [None] * 4))
    row["compute_4_separate_s"] = timed(lambda: [backend.compute(f) for f in many])
    row["compute_many_4_speedup"] = row["compute_4_separate_s"] / row["compute_many_4_requests_s"]
    if backend.device.type != "cpu":  # the same torch code on the host, from the raw output
        row["postprocess_cpu_s"] = timed(lambda: backend.pointmaps_from_prediction(backend.resize(raw.cpu(), size)))
        row["postprocess_cpu_over_device"] = row["postprocess_cpu_s"] / row["postprocess_s"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def bench_input_size(model_dir: str, frames: np.ndarray, args: argparse.Namespace, default_s: float) -> dict[str, Any]:
    """The network at a smaller processor size (fewer tokens) vs the checkpoint's: the GPU-time lever."""
    import torch

    from model.geometry.depth_anything import DepthAnythingBackend

    backend = DepthAnythingBackend(model_dir, device=args.device, batch_size=len(frames),
                                   input_size=args.small_input_size)
    sync = torch.cuda.synchronize if backend.device.type == "cuda" else (lambda: None)
    pixels = backend.preprocess(torch.from_numpy(frames).to(backend.device).permute(0, 3, 1, 2))
    backend.network(pixels)  # warm-up at this shape
    seconds = _time(lambda: (backend.network(pixels), sync()), args.repeats)
    return {"input_size": args.small_input_size, "network_input_size": list(pixels.shape[2:]),
            "network_s": round(seconds, 4), "speedup_vs_default": round(default_s / seconds, 3)}


def bench_backends(tmp: Path, frames: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """One request (all `frames`) through each video backend: median seconds, peak GPU memory."""
    import torch

    from model.geometry.da3 import build_random_da3, build_tiny_da3
    from model.geometry.depth_anything import DepthAnythingBackend, build_large_shaped_depth_model, build_tiny_depth_model
    from model.geometry.multiview import MultiViewBackend

    dv2_dir, da3_dir = tmp / "backend-dav2", tmp / "backend-da3"
    if args.real_shapes:
        build_large_shaped_depth_model(str(dv2_dir))
        build_random_da3(da3_dir, args.multiview_preset)
    else:
        build_tiny_depth_model(str(dv2_dir))
        build_tiny_da3(da3_dir)
    makers = {
        "single_view_da_v2": ("da-v2-large-shaped" if args.real_shapes else "tiny",
                              lambda: DepthAnythingBackend(str(dv2_dir), device=args.device)),
        "multiview_da3": (f"{args.multiview_preset}-shaped" if args.real_shapes else "tiny",
                          lambda: MultiViewBackend(str(da3_dir), device=args.device)),
    }
    out: dict[str, Any] = {"frames": len(frames), "frame_size": list(frames.shape[1:3])}
    for name, (shape, make) in makers.items():
        backend = make()
        cuda = backend.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        params = sum(p.numel() for p in (backend.model if hasattr(backend, "model") else backend.net).parameters())
        backend.compute(frames)  # warm-up at this shape (allocator, kernels)
        sync()
        row: dict[str, Any] = {"weights": shape, "params_m": round(params / 1e6, 1), "device": str(backend.device)}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            row["resident_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        row["s_per_request"] = round(_time(lambda: (backend.compute(frames), sync()), args.repeats), 4)
        if cuda:
            row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            row["peak_over_resident_mb"] = round(row["peak_gpu_mb"] - row["resident_mb"], 1)
        row["frames_per_s"] = round(len(frames) / row["s_per_request"], 2)
        out[name] = row
        del backend
        if cuda:
            torch.cuda.empty_cache()
    out["multiview_over_single_view_time"] = round(
        out["multiview_da3"]["s_per_request"] / out["single_view_da_v2"]["s_per_request"], 3)
    return out


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="sr3d-bench-media-") as d:
        tmp = Path(d)
        report: dict[str, Any] = {"frames": args.frames}
        if not args.skip_decode:
            report["decode"] = bench_decode(tmp, args)
        w, h = (int(v) for v in args.depth_size.lower().split("x"))
        frames = np.random.default_rng(0).integers(0, 256, (args.frames, h, w, 3), dtype=np.uint8)
        if not args.skip_depth:
            report["depth"] = bench_depth(tmp, frames, args)
        if not args.skip_backends:
            report["backends"] = bench_backends(tmp, frames, args)
    save_report(args.out, "media", report, _plot)
    return 0


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("decode", "depth", "stages", "backends") if k in report or (k == "stages" and "depth" in report)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "decode":
            names = list(report["decode"])
            keys = ["isolated_s", "in_process_s", "isolated_max_side_640_s", "long_isolated_s", "long_isolated_no_seek_s"]
            for i, k in enumerate(keys):
                ax.bar(np.arange(len(names)) + i * 0.16, [report["decode"][n][k] for n in names], width=0.16, label=k)
            ax.set_xticks(np.arange(len(names)) + 0.32, names)
            ax.set_ylabel(f"seconds for {report['frames']} frames")
            ax.set_title("decode")
            ax.legend(fontsize=8)
        elif panel == "depth":
            depth = report["depth"]
            keys = [k for k in depth if k.startswith("batch_") and isinstance(depth[k], dict)]
            ax.bar(keys, [depth[k]["frames_per_s"] for k in keys])
            ax.set_ylabel("frames/s")
            ax.set_title(f"depth ({depth['model']}, {depth['device']})")
        elif panel == "stages":
            depth = report["depth"]
            stages = depth["stages"]
            names = [k for k in ("h2d_s", "processor_s", "network_s", "resize_s", "geometry_on_device_s", "host_copy_s",
                                 "postprocess_cpu_s") if k in stages]
            ax.bar(names, [stages[k] for k in names])
            ax.set_ylabel(f"seconds for {depth['frames']} frames")
            ax.set_title("depth stages (postprocess_cpu_s = resize + geometry on host)", fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
        else:
            b = report["backends"]
            names = ["single_view_da_v2", "multiview_da3"]
            bars = ax.bar([f"{n}\n({b[n]['weights']})" for n in names], [b[n]["s_per_request"] for n in names])
            for bar, n in zip(bars, names):
                mem = b[n].get("peak_gpu_mb")
                ax.annotate(f"{b[n]['s_per_request']:.3g} s" + (f"\npeak {mem / 1024:.2f} GiB" if mem else ""),
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
            ax.set_ylabel(f"seconds per request ({b['frames']} frames {b['frame_size'][1]}x{b['frame_size'][0]})")
            ax.set_title(f"video point-map backends ({b['single_view_da_v2']['device']})")
            ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
