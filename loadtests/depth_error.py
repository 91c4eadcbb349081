"""Point-map error and speed of the depth levers against the exact path (issue 15), on the TUM RGB-D fixture.

`python -m loadtests.depth_error [--device auto|cpu|cuda] [--shapes tiny|real] [--frames N] [--repeats R]
                                 [--compile] [--out DIR]`

Both model backends, each lever alone against that backend's exact path, on the same frames (the 640x480
TUM RGB-D fixture frames in tests/data/rgbd/color, repeated up to --frames):
- Depth Anything V2 (`single`): exact = float32 weights, eager attention, the checkpoint's processor size.
  Levers: SDPA attention (float32), bf16 weights + SDPA (the GPU default), processor size 392
  (SR3D_DEPTH_INPUT_SIZE), torch.compile (SR3D_DEPTH_COMPILE, with --compile).
- Depth Anything 3 (`multiview`): exact = float32, long side 504. Levers: bf16 autocast of the backbone (the
  GPU default), long side 392 and 280 (SR3D_MULTIVIEW_PROCESS_RES), torch.compile (with --compile).

The random DA-V2 gets variance-preserving weights first (`spread_weights`: with transformers' init its output
is constant and every error would read 0). Error, over pixels valid in both (points are in each backend's normalised canonical frame: median distance 1):
point error ||p - p_exact|| (mean, p50, p90, in those units), relative depth error |z - z_exact| / z_exact
(mean, p50, p90), the share of pixels whose validity differs, and the patch point error: the same distance
between the 32x32 per-frame patch means the model's 3D position encoding actually receives (`model_patches`). Speed: seconds per request (whole `compute`:
network, geometry, host copy; median of --repeats after one warm-up call) and the speed-up over the exact path.

THE ERRORS HERE DO NOT JUDGE QUALITY: the models have random weights (`tiny` = the demo models, `real` = the
published shapes). They show that each lever does what it says (a no-op is ~0, a lossy one is not) and bound the
numeric difference; how much a lever costs in depth quality must be measured with the real weights
(SR3D_DEPTH_MODEL / SR3D_MULTIVIEW_MODEL) against ground truth. Prints JSON; --out DIR writes DIR/depth_error.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.scenarios import FIXTURES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--shapes", default="tiny", choices=["tiny", "real"],
                   help="tiny demo models, or random weights in the DA-V2-Large / DA3-Base shapes")
    p.add_argument("--frames", type=int, default=10, help="frames per request (the 10 fixture frames, repeated)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (compiles on the warm-up call)")
    p.add_argument("--out")


def tum_frames(n: int) -> np.ndarray:
    from PIL import Image

    files = sorted((FIXTURES / "rgbd" / "color").glob("*.png"))
    frames = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return np.stack([frames[i % len(frames)] for i in range(n)])


def spread_weights(directory: Path, seed: int = 1) -> None:
    """Re-draw a random DA-V2's weight matrices with variance-preserving scale (std 1/sqrt(fan-in)).

    transformers' init (std 0.02) leaves a random DA-V2's output constant to ~1e-7 (the ReLU head then
    outputs its bias), so every lever would show an error of exactly 0; with these weights the output varies
    across the image and the comparison means something numerically."""
    import torch
    from transformers import AutoModelForDepthEstimation

    model = AutoModelForDepthEstimation.from_pretrained(str(directory), local_files_only=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
        model.head.conv3.bias.fill_(1.0)
    model.save_pretrained(str(directory))


def compare(pm: Any, ref: Any) -> dict[str, Any]:
    """Errors of one PointMaps against the exact path's, over pixels valid in both."""
    both = pm.valid & ref.valid
    d = np.linalg.norm(pm.points[both] - ref.points[both], axis=-1)
    z, zr = pm.points[..., 2][both], ref.points[..., 2][both]
    ok = np.abs(zr) > 1e-6
    rel = np.abs(z[ok] - zr[ok]) / np.abs(zr[ok])

    def stats(x: np.ndarray) -> dict[str, float | None]:
        if x.size == 0:
            return {"mean": None, "p50": None, "p90": None}
        return {"mean": round(float(x.mean()), 6), "p50": round(float(np.percentile(x, 50)), 6),
                "p90": round(float(np.percentile(x, 90)), 6)}

    pp, pv = model_patches(pm)
    rp, rv = model_patches(ref)
    pboth = pv & rv
    return {"point_error": stats(d), "rel_depth_error": stats(rel),
            "valid_mismatch": round(float((pm.valid != ref.valid).mean()), 6), "pixels_compared": int(both.sum()),
            "patch_point_error": stats(np.linalg.norm(pp[pboth] - rp[pboth], axis=-1)),
            "patches_compared": int(pboth.sum())}


def model_patches(pm: Any) -> tuple[np.ndarray, np.ndarray]:
    """What the model consumes of a video's point maps: the model's own tiling of a video (one 448 tile per frame,
    `model.tiling.tile_query` at NVILA-Lite-8B's sizes), then the mean valid point per 14-px patch
    (`model.pos3d.pool_points_to_patches`), as the plugin's prepare_item does. A lever's error here is the one
    that reaches the 3D position encoding."""
    from model.checkpoint import nvila_lite_8b_config
    from model.inputs import SpatialQuery
    from model.pos3d import pool_points_to_patches
    from model.tiling import tile_query

    cfg = nvila_lite_8b_config()
    f, h, w = pm.points.shape[:3]
    query = SpatialQuery(frames=np.zeros((f, h, w, 3), np.uint8), question="", pointmaps=pm.points,
                         pointmap_valid=pm.valid, is_video=True)
    tiled = tile_query(query, cfg)
    mean, ok = pool_points_to_patches(tiled.points, tiled.point_valid, cfg.patch_size)
    return mean.numpy(), ok.numpy()


def timed(backend: Any, frames: np.ndarray, repeats: int, sync: Callable[[], None]) -> tuple[Any, float]:
    pm = backend.compute(frames)  # warm-up (and the compile, for a compiled backend)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pm = backend.compute(frames)
        sync()
        times.append(time.perf_counter() - t0)
    return pm, statistics.median(times)


def run(args: argparse.Namespace) -> int:
    import torch

    from model.device import resolve_device
    from model.geometry import DepthAnythingBackend
    from model.geometry.da3 import build_random_da3, build_tiny_da3
    from model.geometry.depth_anything import build_large_shaped_depth_model, build_tiny_depth_model
    from model.geometry.multiview import MultiViewBackend

    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    frames = tum_frames(args.frames)
    gpu_default = torch.bfloat16 if device.type == "cuda" else torch.float32
    report: dict[str, Any] = {
        "device": str(device), "torch": torch.__version__, "shapes": args.shapes,
        "frames": list(frames.shape), "media": "TUM RGB-D fr1_rpy fixture frames (tests/data/rgbd/color)",
        "note": "random weights: these errors show what each lever changes numerically, NOT depth quality; "
                "judge quality with the real checkpoints against ground truth",
        "backends": {},
    }
    with tempfile.TemporaryDirectory(prefix="sr3d-depth-error-") as tmp:
        dv2, da3 = Path(tmp) / "dav2", Path(tmp) / "da3"
        if args.shapes == "tiny":
            build_tiny_depth_model(str(dv2))
            build_tiny_da3(da3)
        else:
            build_large_shaped_depth_model(str(dv2))
            build_random_da3(da3, "da3-base")
        spread_weights(dv2)

        single: list[tuple[str, dict[str, Any], Callable[[], Any]]] = [
            ("exact", {"dtype": "float32", "attention": "eager"},
             lambda: DepthAnythingBackend(str(dv2), device=str(device), dtype=torch.float32, attention="eager")),
            ("sdpa", {"dtype": "float32", "attention": "sdpa"},
             lambda: DepthAnythingBackend(str(dv2), device=str(device), dtype=torch.float32, attention="sdpa")),
            ("sdpa+default dtype", {"dtype": str(gpu_default), "attention": "sdpa"},
             lambda: DepthAnythingBackend(str(dv2), device=str(device), attention="sdpa")),
            ("input 392", {"SR3D_DEPTH_INPUT_SIZE": 392, "dtype": str(gpu_default), "attention": "sdpa"},
             lambda: DepthAnythingBackend(str(dv2), device=str(device), attention="sdpa", input_size=392)),
        ]
        if args.compile:
            single.append(("compile", {"SR3D_DEPTH_COMPILE": True, "dtype": str(gpu_default), "attention": "sdpa"},
                           lambda: DepthAnythingBackend(str(dv2), device=str(device), attention="sdpa", compile=True)))

        def mv(res: int = 504, autocast: torch.dtype | None = None, compile: bool = False) -> Any:
            b = MultiViewBackend(str(da3), device=str(device), process_res=res, compile=compile)
            b.autocast = autocast  # None = float32 throughout (the exact path; the GPU default is bf16)
            return b

        multi: list[tuple[str, dict[str, Any], Callable[[], Any]]] = [
            ("exact", {"autocast": None, "process_res": 504}, lambda: mv()),
            ("bf16 autocast", {"autocast": "bfloat16", "process_res": 504}, lambda: mv(autocast=torch.bfloat16)),
            ("process_res 392", {"SR3D_MULTIVIEW_PROCESS_RES": 392, "autocast": str(gpu_default)},
             lambda: mv(392, None if device.type == "cpu" else torch.bfloat16)),
            ("process_res 280", {"SR3D_MULTIVIEW_PROCESS_RES": 280, "autocast": str(gpu_default)},
             lambda: mv(280, None if device.type == "cpu" else torch.bfloat16)),
        ]
        if args.compile:
            multi.append(("compile", {"SR3D_DEPTH_COMPILE": True, "autocast": str(gpu_default)},
                          lambda: mv(autocast=None if device.type == "cpu" else torch.bfloat16, compile=True)))

        for name, variants in (("depth-anything-v2", single), ("depth-anything-3", multi)):
            rows, ref, t_ref = [], None, None
            for label, settings, make in variants:
                backend = make()
                pm, s = timed(backend, frames, args.repeats, sync)
                del backend
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if ref is None:
                    ref, t_ref = pm, s
                rows.append({"lever": label, "settings": settings, "s_per_request": round(s, 4),
                             "speedup_vs_exact": round(t_ref / s, 3) if s else None, "error_vs_exact": compare(pm, ref)})
                print(json.dumps({"backend": name, "lever": label, "s": round(s, 4)}), file=sys.stderr)
                report["backends"][name] = rows
                _save(report, args.out)  # after every lever: a run cut short keeps what it measured
    print(json.dumps(report, indent=2))
    return 0


def _save(report: dict[str, Any], out: str | None) -> None:
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "depth_error.json").write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
