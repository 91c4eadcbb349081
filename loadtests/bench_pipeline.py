"""The whole service path under load, a baseline configuration against tuned ones in ONE run (issue 15).

`sr3d bench pipeline [--config NAME[:KEY=VAL,...]]... [--concurrency 8,32] [--duration S] [--num-frames F]
                     [--max-tokens T] [--worker-concurrency N] [--dummy-8b] [--media tum|bottle] [--out DIR]`

For each configuration, one after the other: a fresh stack (redis-server, `sr3d gateway`, one `sr3d worker`
with that configuration's SR3D_* variables), a warm-up burst (lazy init, compiles, CUDA graphs), then a closed
loop at each concurrency level. The first configuration is the baseline; every other one gets ratios against it
at the same level (requests/s, TTFT p50, e2e p50), so the comparison lives inside one run.

Configurations: a preset name (`baseline`, `fp8`, `depth392`, `tuned`, `multiview`, `multiview-tuned`, `fast`,
`fast-small`, `multiview-mps`, `fast-mps`; PRESETS) optionally followed by `:KEY=VAL,...` overrides, or
`NAME:KEY=VAL,...` with a new name. Variables common to all configurations (cache off, worker concurrency, the
dummy 8B model) come from the run's arguments. `BENCH_MPS=1` runs a configuration's worker under a private CUDA
MPS daemon (loadtests/cuda_mps.py); `BENCH_DA3=<preset>` gives it a random Depth Anything 3 of those shapes.

After the closed-loop levels, one open-loop level (Poisson arrivals at --open-fraction, default half, of the
configuration's best closed-loop requests/s) measures latency at partial load: a closed loop with few users is
not "half load" (8 users already reached 95 % of the maximum on the H200).

Per-stage breakdown per level, from each finished job's own `done` timings (the worker's clock): queue wait,
decode, point maps, encode (prepare + vision + prefill up to the first token, i.e. the engine's TTFT; with vLLM split
into prepare, render, submit, wait, prefill and deliver, `encode_parts`), generate (the answer's tokens after the
first), and the client's TTFT and e2e. Load: every user sends the standard request
(one box region, exactly --max-tokens tokens, ignore_eos) on the media again and again; the point-map cache is
off so each request pays decode + depth. `--media tum` (default) is a 640x480 clip made from the TUM RGB-D
fixture frames (the issue's workload size); `bottle` is the 640x360 fixture clip.

Prints JSON; --out DIR writes DIR/pipeline.json (after each configuration) and DIR/pipeline.png.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests import report as rpt
from loadtests.bench_workers import NO_MULTICAST, closed_loop, job_problems, open_loop
from loadtests.scenarios import FIXTURES, VIDEO_FRAMES, VIDEO_SIZE, question_for, random_box, video_media
from service.client import JobRequest, JobResult, Media, SR3DClient
from service.local_stack import Stack

# Levers of issue 15 (service/settings.py documents each). The baseline is the defaults with DA-V2 as the depth
# model (the reference pipeline); `auto` would send videos to the Depth Anything 3 backend instead.
PRESETS: dict[str, dict[str, str]] = {
    "baseline": {"SR3D_POINTMAP_BACKEND": "single"},
    # one lossy lever each (errors: fp8 -> loadtests/quant_error.py, depth input 392 -> loadtests/depth_error.py)
    "fp8": {"SR3D_POINTMAP_BACKEND": "single", "SR3D_VLLM_QUANTIZATION": "fp8"},
    "depth392": {"SR3D_POINTMAP_BACKEND": "single", "SR3D_DEPTH_INPUT_SIZE": "392"},
    # both (SDPA attention and the bf16 depth weights are already the defaults: exact maths, see depth_error.py)
    "tuned": {"SR3D_POINTMAP_BACKEND": "single", "SR3D_VLLM_QUANTIZATION": "fp8", "SR3D_DEPTH_INPUT_SIZE": "392"},
    "multiview": {"SR3D_POINTMAP_BACKEND": "auto"},
    "multiview-tuned": {"SR3D_POINTMAP_BACKEND": "auto", "SR3D_VLLM_QUANTIZATION": "fp8", "SR3D_MULTIVIEW_PROCESS_RES": "392"},
    # DA3 at long side 280 (20x15 network patches): the model consumes 32x32 patch means per frame, so the
    # point maps need far less than 504 px; attention over all frames' tokens shrinks ~10x (error: depth_error)
    "fast": {"SR3D_POINTMAP_BACKEND": "auto", "SR3D_VLLM_QUANTIZATION": "fp8", "SR3D_MULTIVIEW_PROCESS_RES": "280"},
    # DA3-Small's shapes (Apache-2.0 like Base) at 392: a different network, its error needs the real weights
    "fast-small": {"SR3D_POINTMAP_BACKEND": "auto", "SR3D_VLLM_QUANTIZATION": "fp8", "SR3D_MULTIVIEW_PROCESS_RES": "392",
                   "BENCH_DA3": "da3-small"},
    # the same work with CUDA MPS: depth's and vLLM's kernels side by side instead of time-sliced (exact)
    "multiview-mps": {"SR3D_POINTMAP_BACKEND": "auto", "BENCH_MPS": "1"},
    "fast-mps": {"SR3D_POINTMAP_BACKEND": "auto", "SR3D_VLLM_QUANTIZATION": "fp8", "SR3D_MULTIVIEW_PROCESS_RES": "280",
                 "BENCH_MPS": "1"},
}
# Keys a configuration may set besides SR3D_* (consumed by the bench, never passed to the service):
# BENCH_MPS=1 runs the configuration's worker under a private CUDA MPS daemon (loadtests/cuda_mps.py);
# BENCH_DA3=<preset> gives the worker a random Depth Anything 3 of that preset's shapes (with --dummy-8b).
BENCH_KEYS = ("BENCH_MPS", "BENCH_DA3")
STAGES = ("queue_wait_s", "decode_s", "pointmaps_s", "encode_s", "generate_s")
TUM_CLIP_FRAMES = 120  # 8 s at 15 fps: the 10 fixture frames, each held 12 frames


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=None,
                   help="NAME or NAME:KEY=VAL,... (repeat; first = baseline). Default: baseline, tuned")
    p.add_argument("--concurrency", default="8,32", help="comma-separated closed-loop users, one level each")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load per level")
    p.add_argument("--num-frames", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--worker-concurrency", type=int, default=64,
                   help="SR3D_WORKER_CONCURRENCY for every configuration (jobs in flight in the one worker)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up jobs per configuration (default: max concurrency)")
    p.add_argument("--open-fraction", type=float, default=0.5,
                   help="after the closed-loop levels, an open-loop level (Poisson arrivals) at this fraction of the "
                        "configuration's best closed-loop requests/s: latency at partial load (0 = skip)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP/MKL threads of the worker (default: all cores; halve when two benches share a host)")
    p.add_argument("--dummy-8b", action="store_true",
                   help="vLLM on NVILA-Lite-8B shapes with random weights, DA-V2-Large- and DA3-Base-shaped random depth")
    p.add_argument("--media", choices=["tum", "bottle"], default="tum")
    p.add_argument("--cpu", action="store_true", help="SR3D_DEVICE=cpu and no GPU visible (the smallest run)")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--ready-timeout", type=float, default=420.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")


# ----------------------------------------------------------------------------- configuration
def parse_config(spec: str) -> tuple[str, dict[str, str]]:
    """'tuned' | 'tuned:SR3D_X=1,SR3D_Y=2' | 'mine:SR3D_X=1' -> (name, env). Raises ValueError."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"empty configuration name in {spec!r}")
    env = dict(PRESETS.get(name, {}))
    if name not in PRESETS and not rest:
        raise ValueError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)}); give KEY=VAL overrides for a new one")
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq or not (key.startswith("SR3D_") or key in BENCH_KEYS):
            raise ValueError(f"override {item!r} must be SR3D_KEY=VALUE or one of {', '.join(BENCH_KEYS)}")
        env[key] = val
    return name, env


def common_env(args: argparse.Namespace, work: Path, users: int) -> dict[str, str]:
    env = {
        "SR3D_LOG_LEVEL": "WARNING",
        "SR3D_POINTMAP_CACHE_MB": "0",
        "SR3D_QUEUE_MAX": str(max(256, 4 * users)),
        "SR3D_MAX_TOKENS": str(max(512, args.max_tokens)),
        "SR3D_MAX_FRAMES": str(max(64, args.num_frames + 1)),
        "SR3D_WORKER_CONCURRENCY": str(args.worker_concurrency),
    }
    if args.cpu:
        env.update(SR3D_DEVICE="cpu", CUDA_VISIBLE_DEVICES="")
    else:
        threads = str(args.threads or os.cpu_count() or 1)  # the one worker's CPU side (decode, tiling, pooling) gets the host
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, **NO_MULTICAST)
    if args.dummy_8b:
        env.update(dummy_models_env(work))
    return env


def dummy_models_env(work: Path) -> dict[str, str]:
    """NVILA-Lite-8B flat config (vLLM fills random weights) + DA-V2-Large and DA3-Base random depth models."""
    from loadtests.bench_workers import dummy_8b_env

    env = dummy_8b_env(work)
    env["SR3D_MULTIVIEW_MODEL"] = random_da3(work, "da3-base")
    return env


# ----------------------------------------------------------------------------- media + load
def tum_clip(path: Path) -> Path:
    """A 640x480 mpeg4 clip of the TUM RGB-D fixture frames (tests/data/rgbd/color), built once."""
    if path.exists():
        return path
    import av
    import numpy as np
    from PIL import Image

    frames = [np.asarray(Image.open(f).convert("RGB")) for f in sorted((FIXTURES / "rgbd" / "color").glob("*.png"))]
    h, w = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=15)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.bit_rate = 4_000_000
        for i in range(TUM_CLIP_FRAMES):
            for pkt in s.encode(av.VideoFrame.from_ndarray(frames[i * len(frames) // TUM_CLIP_FRAMES], format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    path.write_bytes(buf.getvalue())
    return path


@dataclass
class Load:
    media: Media
    size: tuple[int, int]
    frames: int
    num_frames: int
    max_tokens: int

    def request(self, rng: random.Random) -> JobRequest:
        w, h = self.size
        region = [[{"frame": rng.randrange(self.frames), "box": random_box(rng, w, h)}]]
        opts = {"max_tokens": self.max_tokens, "num_frames": self.num_frames, "temperature": 0.0, "ignore_eos": True}
        return JobRequest(self.media, question_for(1, rng), region, options=opts)


def make_load(args: argparse.Namespace, work: Path) -> Load:
    if args.media == "tum":
        return Load(Media.from_path(tum_clip(work / "tum-640x480.mp4"), "video"), (640, 480), TUM_CLIP_FRAMES,
                    args.num_frames, args.max_tokens)
    return Load(video_media(), VIDEO_SIZE, VIDEO_FRAMES, args.num_frames, args.max_tokens)


async def burst(url: str, n: int, load: Load, seed: int) -> list[JobResult]:
    rng = random.Random(seed)
    async with SR3DClient(url) as client:
        return list(await asyncio.gather(*(client.run(load.request(rng), resume_timeout_s=180.0) for _ in range(n))))


# ----------------------------------------------------------------------------- numbers
def stage_breakdown(results: list[JobResult]) -> dict[str, Any]:
    """Distributions of each stage over the level's finished jobs (the worker's `done` timings), + TTFT/e2e."""
    done = [r for r in results if r.ok and isinstance(r.terminal.data, dict)]  # type: ignore[union-attr]
    timings = [r.terminal.data.get("timings") or {} for r in done]  # type: ignore[union-attr]
    out: dict[str, Any] = {s: rpt.dist([float(t[s]) for t in timings if s in t]) for s in STAGES}
    # The engine's split of encode (vLLM: prepare, render, submit, wait, prefill, deliver; see the engines)
    parts = sorted({k for t in timings for k in t if k.startswith("encode_") and k != "encode_s"}, key=_part_order)
    out["encode_parts"] = {k: rpt.dist([float(t[k]) for t in timings if k in t]) for k in parts}
    out["ttft_s"] = rpt.dist([r.ttft for r in done if r.ttft is not None])
    out["e2e_s"] = rpt.dist([r.e2e for r in done if r.e2e is not None])
    backends = sorted({str(t.get("pointmaps_backend")) for t in timings})
    out["pointmaps_backend"] = backends
    return out


ENCODE_PARTS = ("prepare", "render", "submit", "wait", "prefill", "deliver")  # the order time passes through them


def _part_order(key: str) -> int:
    name = key.removeprefix("encode_").removesuffix("_s")
    return ENCODE_PARTS.index(name) if name in ENCODE_PARTS else len(ENCODE_PARTS)


def level_summary(results: list[JobResult], wall: float, label: str) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    problems = job_problems(results)
    return {"label": label, "requests": len(results), "done": len(done), "duration_s": round(wall, 3),
            "req_per_s": round(len(done) / wall, 4) if wall else None,
            "stages": stage_breakdown(results), "problems": problems[:20], "ok": not problems}


def ratios(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every configuration against the first, level by level (same concurrency)."""
    if not configs:
        return []
    base = {lv["users"]: lv for lv in configs[0]["levels"]}
    out = []
    for c in configs[1:]:
        for lv in c["levels"]:
            b = base.get(lv["users"])
            if b is None:
                continue

            def r(get: Any) -> float | None:
                x, y = get(b), get(lv)
                return round(y / x, 3) if x and y is not None else None

            out.append({"config": c["name"], "vs": configs[0]["name"], "users": lv["users"],
                        "req_per_s": r(lambda s: s["req_per_s"]),
                        "ttft_p50": r(lambda s: s["stages"]["ttft_s"]["p50"]),
                        "e2e_p50": r(lambda s: s["stages"]["e2e_s"]["p50"])})
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(c["name"], lv) for c in report["configs"] for lv in [*c["levels"], *([c["open_loop"]] if c.get("open_loop") else [])]]
    labels = [f"{name}\n{lv['users']} users" if lv["users"] else f"{name}\nopen {lv['offered_req_per_s']}/s" for name, lv in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(max(12, 3.3 * len(rows) + 4), 5))
    ax1.bar(labels, [lv["req_per_s"] or 0 for _, lv in rows], color="tab:blue")
    ax1.set_ylabel("requests/s (finished)")
    ax1.set_title("throughput")
    bottom = [0.0] * len(rows)
    for stage in STAGES:
        vals = [lv["stages"][stage]["p50"] or 0 for _, lv in rows]
        ax2.bar(labels, vals, bottom=bottom, label=stage.removesuffix("_s"))
        bottom = [a + b for a, b in zip(bottom, vals)]
    ax2.plot(labels, [lv["stages"]["e2e_s"]["p50"] or 0 for _, lv in rows], "k_", markersize=30, label="e2e p50 (client)")
    ax2.set_ylabel("seconds (p50 per stage, stacked)")
    ax2.set_title("per-stage breakdown")
    ax2.legend(fontsize=8)
    bottom = [0.0] * len(rows)
    part_keys = sorted({k for _, lv in rows for k in lv["stages"].get("encode_parts", {})}, key=_part_order)
    for key in part_keys:
        vals = [(lv["stages"].get("encode_parts", {}).get(key) or {}).get("p50") or 0 for _, lv in rows]
        ax3.bar(labels, vals, bottom=bottom, label=key.removeprefix("encode_").removesuffix("_s"))
        bottom = [a + b for a, b in zip(bottom, vals)]
    ax3.plot(labels, [lv["stages"]["encode_s"]["p50"] or 0 for _, lv in rows], "k_", markersize=30, label="encode p50")
    ax3.set_ylabel("seconds (p50 per part, stacked)")
    ax3.set_title("encode: where the time to first token goes")
    ax3.legend(fontsize=8)
    for ax in (ax1, ax2, ax3):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(report["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(report: dict[str, Any], out: str | None, png: bool = False) -> list[str]:
    if not out:
        return []
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    if png:
        plot(report, d / "pipeline.png")
        return [str(d / "pipeline.json"), str(d / "pipeline.png")]
    return [str(d / "pipeline.json")]


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    try:
        configs = [parse_config(s) for s in (args.config or ["baseline", "tuned"])]
        levels = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    except ValueError as e:
        print(f"bench pipeline: {e}", file=sys.stderr)
        return 2
    if not levels or levels[0] < 1 or len({n for n, _ in configs}) != len(configs):
        print("bench pipeline: --concurrency needs integers >= 1 and configuration names must differ", file=sys.stderr)
        return 2
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        return _run(args, configs, levels, args.work_dir)
    with tempfile.TemporaryDirectory(prefix="sr3d-bench-pipeline-") as tmp:
        return _run(args, configs, levels, Path(tmp))


def _run(args: argparse.Namespace, configs: list[tuple[str, dict[str, str]]], levels: list[int], work: Path) -> int:
    load = make_load(args, work)
    common = common_env(args, work, levels[-1])
    report: dict[str, Any] = {
        "title": "sr3d bench pipeline (gateway + redis + sr3d worker)",
        "workload": {"media": args.media, "frame_size": list(load.size), "num_frames": args.num_frames,
                     "max_tokens": args.max_tokens, "ignore_eos": True, "regions": 1, "duration_s": args.duration,
                     "concurrency": levels, "pointmap_cache": "off"},
        "common_env": {k: v for k, v in common.items() if not k.endswith(("_MODEL", "_DIR"))},
        "configs": [], "ratios": [],
    }
    problems: list[str] = []
    for i, (name, env) in enumerate(configs):
        c = _run_config(args, name, {**common, **env}, levels, load, work / f"stack-{i}-{name}")
        report["configs"].append(c)
        problems += [f"{name}: {p}" for p in c["problems"]]
        report["ratios"] = ratios(report["configs"])
        save(report, args.out)
        print(json.dumps({"config": name, "start_s": c.get("start_s"),
                          "levels": [(lv["users"], lv["req_per_s"]) for lv in c["levels"]]}), file=sys.stderr)
    report["problems"], report["ok"] = problems[:50], not problems
    report["files"] = save(report, args.out, png=True)
    print(json.dumps(report, indent=2))
    return 0 if not problems else 1


def _run_config(args: argparse.Namespace, name: str, env: dict[str, str], levels: list[int], load: Load,
                workdir: Path, on_level: Callable[[dict[str, Any], list[JobResult], float], None] | None = None,
                ) -> dict[str, Any]:
    """One configuration on its own fresh stack: start, warm up, every closed-loop level, then the open-loop
    level at --open-fraction of the best requests/s; the stack (and its MPS daemon) is gone on return.
    `on_level(level, results, wall)` sees each level's raw results (`sr3d bench peer` adds its own numbers)."""
    bench = {k: env.pop(k) for k in BENCH_KEYS if k in env}
    shown = {k: v for k, v in env.items() if k.startswith("SR3D_") and not k.endswith(("_MODEL", "_DIR"))}
    out: dict[str, Any] = {"name": name, "env": {**shown, **bench}, "levels": [], "problems": []}
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:
            extra = {k: v for k, v in env.items() if not k.startswith("SR3D_")}
            if "BENCH_DA3" in bench:
                if not args.dummy_8b:
                    raise ValueError("BENCH_DA3 needs --dummy-8b (random weights in a published preset's shapes)")
                env["SR3D_MULTIVIEW_MODEL"] = random_da3(workdir.parent, bench["BENCH_DA3"])
            if bench.get("BENCH_MPS") == "1":
                from loadtests.cuda_mps import check_client, mps_daemon

                extra.update(stack.enter_context(mps_daemon(workdir / "mps", extra)))
                check_client(workdir / "mps", extra)
            st = stack.enter_context(Stack(workdir, {k: v for k, v in env.items() if k.startswith("SR3D_")}))
            st.start_redis()
            gw, url = st.start_gateway()
            worker, wurl = st.start_worker(env=extra)
            t0 = time.perf_counter()
            st.wait_ready(url, gw)
            st.wait_ready(wurl, worker, timeout=args.ready_timeout)
            out["start_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            warm = asyncio.run(burst(url, args.warmup if args.warmup is not None else levels[-1], load, args.seed + 7))
            out["warmup"] = {"jobs": len(warm), "done": sum(r.ok for r in warm), "s": round(time.perf_counter() - t0, 2)}
            out["problems"] += job_problems(warm)
            for users in levels:
                results, wall = asyncio.run(closed_loop(url, users, args.duration, load.request, args.seed + users))
                lv = level_summary(results, wall, f"{name}, {users} users")
                lv["users"] = users
                if on_level is not None:
                    on_level(lv, results, wall)
                out["levels"].append(lv)
                out["problems"] += lv["problems"]
            best = max((lv["req_per_s"] or 0.0 for lv in out["levels"]), default=0.0)
            if args.open_fraction > 0 and best > 0:
                rate = round(best * args.open_fraction, 3)
                results, wall = asyncio.run(open_loop(url, rate, args.duration, load.request, args.seed + 991))
                lv = level_summary(results, wall, f"{name}, open loop {rate} req/s")
                lv.update(users=None, offered_req_per_s=rate, fraction_of_best=args.open_fraction)
                if on_level is not None:
                    on_level(lv, results, wall)
                out["open_loop"] = lv
                out["problems"] += lv["problems"]
            if not worker.alive():
                out["problems"].append(f"worker died: {worker.log_tail(800)}")
    except Exception as e:  # noqa: BLE001 - a configuration that cannot start is reported, the next one still runs
        out["problems"].append(f"{type(e).__name__}: {str(e)[-1500:]}")
    return out


def random_da3(work: Path, preset: str) -> str:
    """A random Depth Anything 3 in `preset`'s shapes under `work`, built once per run."""
    from model.geometry.da3 import build_random_da3

    d = work / preset
    if not (d / "config.json").exists():
        build_random_da3(d, preset)
    return str(d)
