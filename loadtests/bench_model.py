"""SR-3D model stages: per-stage time and token counts for one 32-frame, 1-region request, and ratios.

`sr3d bench model [--config tiny|nvila-lite-8b] [--frames 32] [--device cpu|cuda] [--batch 4] [--out DIR]`
(also `python -m loadtests.bench_model ...`). One run measures, on random weights of the chosen shape
(nvila-lite-8b is allocated directly on the device in bf16, no CPU init; its text is tokenised with the tiny
demo tokenizer, so text token counts are approximate, visual token counts exact):
- prepare (validation + tiling + prompt, CPU), vision, 3D-PE, projector, regions, prefill, decode per token
  for one request (median of --repeats after a warm-up);
- ratios inside the run: 3D path vs 2D path (point maps on/off), and a batch of --batch requests in one
  `generate` vs the same requests one at a time (requests/s).
Prints JSON; with --out DIR writes model.json and model.png (matplotlib, Agg).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", choices=["tiny", "nvila-lite-8b"], default="tiny")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=4, help="requests per batched generate (ratio vs one at a time)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--out", type=Path, default=None)


def _query(frames: int, h: int, w: int, seed: int, with_points: bool = True):  # type: ignore[no-untyped-def]
    from model.inputs import RegionMask, SpatialQuery

    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), bool)
    mask[h // 4:h // 2, w // 3:w // 2] = True
    return SpatialQuery(
        frames=rng.integers(0, 255, (frames, h, w, 3), dtype=np.uint8),
        question="How far is <region0> from the camera? Please answer the question using a single word or phrase.",
        regions=[[RegionMask(frames // 2, mask)]],
        pointmaps=rng.standard_normal((frames, h, w, 3)).astype(np.float32) if with_points else None,
        is_video=frames > 1,
    )


def _model(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import torch

    from model.checkpoint import build_model, nvila_lite_8b_config, tiny_config
    from model.tokenizer_build import build_tokenizer

    tok = build_tokenizer()
    if args.config == "tiny":
        cfg, dtype = tiny_config(len(tok)), torch.float32
    else:
        cfg, dtype = nvila_lite_8b_config(), torch.bfloat16
    cfg.max_frames = max(cfg.max_frames, args.frames)
    torch.manual_seed(0)
    model = build_model(cfg, tok, args.device, dtype if args.device == "cuda" else torch.float32)
    torch.nn.init.normal_(model.pos3d.mlp[2].weight, std=0.02)  # a trained 3D-PE is non-zero
    return model


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def run(args: argparse.Namespace) -> int:
    import torch

    from model.inputs import GenerationParams
    from model.modeling import StageTimes

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "--device cuda but no CUDA device"}))
        return 2
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    model = _model(args)
    build_s = time.perf_counter() - t0
    params = GenerationParams(max_tokens=args.max_tokens, ignore_eos=True)

    q3d = _query(args.frames, args.height, args.width, 0)
    q2d = _query(args.frames, args.height, args.width, 0, with_points=False)
    model.generate([model.prepare(q3d)], [GenerationParams(max_tokens=2, ignore_eos=True)])  # warm-up

    stages: dict[str, list[float]] = {}
    prep3d, prep2d, embed2d, embed3d = [], [], [], []
    res = None
    for _ in range(args.repeats):
        t = time.perf_counter()
        p3 = model.prepare(q3d)
        prep3d.append(time.perf_counter() - t)
        t = time.perf_counter()
        p2 = model.prepare(q2d)
        prep2d.append(time.perf_counter() - t)
        times = StageTimes()
        res = model.generate([p3], [params], times=times)[0]
        for k, v in times.values.items():
            stages.setdefault(k, []).append(v)
        for p, acc in ((p2, embed2d), (p3, embed3d)):
            tt = StageTimes()
            with tt.stage("embed", model.device):
                model.embed(p)
            acc.append(tt.values["embed"])

    single = {k: _median(v) for k, v in stages.items()}
    steps = max(single.pop("decode_steps"), 1.0)
    decode_total = single.pop("decode_total")
    report: dict[str, Any] = {
        "config": args.config, "device": args.device, "frames": args.frames, "regions": 1,
        "frame_size": [args.height, args.width], "max_tokens": args.max_tokens,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "model_build_s": round(build_s, 3),
        "tokens": {"prompt": res.prompt_tokens, "visual": p3.tiled.num_tiles * p3.layout.num_image_tokens_per_tile,
                   "tiles": p3.tiled.num_tiles, "per_tile": p3.layout.num_image_tokens_per_tile,
                   "completion": res.completion_tokens},
        "stages_s": {"prepare": _median(prep3d), **{k: round(v, 5) for k, v in single.items()},
                     "decode_per_token": decode_total / steps},
        "ratios": {
            "embed_3d_over_2d": _median(embed3d) / _median(embed2d),
            "prepare_3d_over_2d": _median(prep3d) / _median(prep2d),
        },
    }

    # Batched vs one at a time: same requests, same params, requests/s.
    qs = [_query(args.frames, args.height, args.width, 10 + i) for i in range(args.batch)]
    prepared = [model.prepare(q) for q in qs]
    t = time.perf_counter()
    for p in prepared:
        model.generate([p], [params])
    serial = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(prepared, [params] * args.batch)
    batched = time.perf_counter() - t
    report["batch"] = {"size": args.batch, "serial_req_per_s": args.batch / serial,
                       "batched_req_per_s": args.batch / batched, "speedup": serial / batched}
    if args.device == "cuda":
        report["gpu_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "model.json").write_text(json.dumps(report, indent=2))
        try:
            _plot(report, args.out / "model.png")
        except ImportError as e:  # the GPU image may lack matplotlib; the JSON is the result
            print(f"no plot: {e}", file=sys.stderr)
    return 0


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = report["stages_s"]
    names = ["prepare", "vision", "pos3d", "projector", "regions", "splice", "prefill"]
    vals = [st.get(n, 0.0) * 1e3 for n in names] + [st["decode_per_token"] * 1e3 * report["max_tokens"]]
    labels = names + [f"decode x{report['max_tokens']}"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.barh(labels, vals)
    a.set_xlabel("ms")
    a.set_title(f"{report['config']} on {report['device_name']}: {report['frames']} frames, 1 region")
    bt = report["batch"]
    b.bar(["one at a time", f"batch {bt['size']}"], [bt["serial_req_per_s"], bt["batched_req_per_s"]])
    b.set_ylabel("requests / s")
    b.set_title(f"batched speedup x{bt['speedup']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench_model", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
