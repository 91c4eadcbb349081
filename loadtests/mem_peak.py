"""Peak RSS of one hostile-but-small request, per stage, each in a fresh process (issue 14 items 2, 8).

    python -m loadtests.mem_peak SCENARIO [SCENARIO ...]

Prints one JSON line {scenario, baseline_mb, peak_mb, delta_mb, outcome, seconds}: baseline is the
process's peak RSS after imports, peak the peak after the scenario (resource.getrusage ru_maxrss),
so delta is what the request itself cost at its worst moment. Scenarios:

  scene_bomb       1 MB npz of zeros declaring 16 x 2160x3840 float64 depth -> load_scene_npz
  scene_max        the largest scene accepted (MAX_SCENE_DEPTH_PIXELS of float32 depth) -> load +
                   back-projection (pointmaps_from_rgbd), what a worker does with it
  image_huge       a 6000x6600 PNG photo -> Pipeline.decode (image + one box)
  mask_fanout      6000x6600 image + one 6000x6600 mask PNG named by 8 regions x 8 annotations
                   -> Pipeline.decode (the 170 KB request that peaked at 7.9 GB)
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _npz_bomb(frames: int = 16, h: int = 2160, w: int = 3840) -> bytes:
    """A deflated npz whose depth member is `frames` x h x w float64 zeros, written in 1 MiB pieces
    so that building it does not itself need the decoded size in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in (("intrinsics", np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])),
                          ("poses", np.tile(np.eye(4), (frames, 1, 1)))):
            with zf.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, arr)
        with zf.open("depth.npy", "w", force_zip64=True) as f:
            header = {"descr": "<f8", "fortran_order": False, "shape": (frames, h, w)}
            np.lib.format.write_array_header_2_0(f, header)
            zeros = bytes(1 << 20)
            left = frames * h * w * 8
            while left:
                n = min(left, len(zeros))
                f.write(zeros[:n])
                left -= n
    return buf.getvalue()


def _png(w: int, h: int, mode: str, fill: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    img = Image.new(mode, (w, h), fill)
    img.save(buf, format="PNG")
    return buf.getvalue()


async def _pipeline_decode(image: bytes, masks: dict[str, bytes], regions: list[list[Any]]) -> str:
    from service.blobs import DirBlobStore
    from service.pipeline import Pipeline
    from service.schemas import JobSpec
    from service.settings import Settings

    with tempfile.TemporaryDirectory() as d:
        settings = Settings(blob_store="dir", blob_dir=Path(d), data_dir=Path(d))
        blobs = DirBlobStore(Path(d), settings.max_upload_bytes, 3600)
        await blobs.put("j/media", image)
        for name, data in masks.items():
            await blobs.put(f"j/mask/{name}", data)
        spec = JobSpec.model_validate({
            "job_id": "j", "media_kind": "image", "media_blob": "j/media", "media_hash": "0" * 64,
            "media_filename": "a.png", "question": "q", "regions": regions, "created_at": time.time()})
        decoded = await Pipeline(settings, blobs, backend=None, cache=object()).decode(spec)
        return f"frames {list(decoded.frames.shape)}, {sum(len(r) for r in decoded.regions)} annotations"


def build(scenario: str, out: Path) -> None:
    """Write the scenario's request parts to `out/` (in the parent, so building them does not count)."""
    w, h = 6000, 6600
    if scenario == "scene_bomb":
        (out / "scene.npz").write_bytes(_npz_bomb())
    elif scenario == "scene_max":
        from model.geometry.rgbd import MAX_SCENE_DEPTH_PIXELS

        frames, sh, sw = 16, 960, 1280  # 19.7 M px <= MAX_SCENE_DEPTH_PIXELS
        assert frames * sh * sw <= MAX_SCENE_DEPTH_PIXELS
        with open(out / "scene.npz", "wb") as f:
            np.savez_compressed(f, depth=np.full((frames, sh, sw), 2.0, np.float32),
                                intrinsics=np.array([[900.0, 0, sw / 2], [0, 900, sh / 2], [0, 0, 1]]),
                                poses=np.tile(np.eye(4), (frames, 1, 1)))
    elif scenario in ("image_huge", "mask_fanout"):
        (out / "image.png").write_bytes(_png(w, h, "RGB", (90, 120, 30)))
        if scenario == "mask_fanout":
            (out / "mask.png").write_bytes(_png(w, h, "L", 255))
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


def run(scenario: str, parts: Path) -> dict[str, Any]:
    """In a fresh process: import everything, note the peak RSS, run the request, note it again."""
    from model.geometry import SceneError, load_scene_npz, pointmaps_from_rgbd
    import service.pipeline  # noqa: F401  (imports count to the baseline, not the request)

    files = {p.name: p.read_bytes() for p in parts.iterdir()}
    baseline = _rss_mb()
    t0 = time.perf_counter()
    try:
        if scenario == "scene_bomb":
            load_scene_npz(files["scene.npz"])
            outcome = "loaded"
        elif scenario == "scene_max":
            scene = load_scene_npz(files["scene.npz"])
            pm = pointmaps_from_rgbd(scene.depth, scene.intrinsics, scene.poses)
            outcome = f"point maps {list(pm.points.shape)}"
        elif scenario == "image_huge":
            box = [[{"frame": 0, "box": [10.0, 10.0, 500.0, 500.0]}]]
            outcome = asyncio.run(_pipeline_decode(files["image.png"], {}, box))
        else:
            regions = [[{"frame": 0, "mask_blob": "j/mask/m"} for _ in range(8)] for _ in range(8)]
            outcome = asyncio.run(_pipeline_decode(files["image.png"], {"m": files["mask.png"]}, regions))
    except SceneError as e:
        outcome = f"SceneError {e.code}"
    peak = _rss_mb()
    return {"scenario": scenario, "request_bytes": sum(len(b) for b in files.values()),
            "baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1), "delta_mb": round(peak - baseline, 1),
            "outcome": outcome, "seconds": round(time.perf_counter() - t0, 2)}


def measure(scenario: str) -> dict[str, Any]:
    """Build the parts here, run the request in a fresh interpreter, return its JSON line."""
    with tempfile.TemporaryDirectory() as d:
        build(scenario, Path(d))
        res = subprocess.run([sys.executable, "-m", "loadtests.mem_peak", "--child", d, scenario],
                             capture_output=True, text=True, timeout=600, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", nargs="+")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(run(args.scenario[0], args.child)))
        return
    for scenario in args.scenario:
        print(json.dumps(measure(scenario)))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
