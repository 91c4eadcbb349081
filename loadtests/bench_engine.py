"""vLLM engine vs the model core's generate: requests/s, TTFT, cache hits, GPU memory, whole pipeline.

`sr3d bench engine --out DIR [--config nvila-lite-8b|tiny] [--concurrency 1,8,32,64] [--requests N]`
One run, one GPU, the same workload everywhere: N requests of --frames frames (--height x --width), one
region, point maps, a ~25-token question, exactly --max-tokens new tokens (ignore_eos), distinct media per
request (no cross-request cache hits in the throughput phases).
1. reference: the model core (`prepare` + `generate`, transformers) one request at a time;
2. VLLMEngine (AsyncLLM + the SR-3D plugin) at each concurrency: requests/s, output tokens/s, TTFT p50/p99,
   and the throughput ratio vs the reference;
3. cache hit: TTFT of a second question on the same media + regions vs a cold first question;
4. whole pipeline: point maps from a depth backend (Depth-Anything-V2-L shape with random weights, or the
   tiny one) through the worker's `PointMapBatcher` + the vLLM engine, at one concurrency, once per
   --pipeline-runs entry (4 = up to 128 frames per depth batch; 1 = one request at a time);
`--only` runs a subset of the phases (e.g. `--only pipeline`: no reference, no sweep, no cache phase).
`--cpu-preprocess`: no GPU, no engine; the per-request CPU work of the vLLM path on this machine: preparing
the item (`prepare_item`, the engine's thread pool) one at a time and with --prepare-workers threads, the
renderer's share (vLLM's processor on the prepared item, processor cache on), and the bytes per request.
GPU memory is read device-wide (vLLM's engine core is another process). nvila-lite-8b uses random weights
(vLLM load_format=dummy; the core allocated on the device in bf16) and a tokenizer covering all 152,064 ids
(model/dummy_checkpoint.py), so every generated token streams as text: speed only, the answers are noise.
Prints JSON; writes DIR/engine.json (updated after every phase, so a cut-off run keeps what it measured)
and DIR/engine.png.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--config", choices=["nvila-lite-8b", "tiny"], default="nvila-lite-8b")
    p.add_argument("--concurrency", default="1,8,32,64", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level (level 1: at most 16)")
    p.add_argument("--reference-requests", type=int, default=4)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--eager", action="store_true", help="vLLM enforce_eager (no torch.compile/CUDA graphs)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--depth", choices=["large", "tiny", "none"], default="large")
    p.add_argument("--pipeline-concurrency", type=int, default=8)
    p.add_argument("--pipeline-runs", default="4,1",
                   help="comma-separated pipeline runs to compare, each PointMapBatcher max_jobs[:depth input size] "
                        "(1 = one request's depth at a time; e.g. 4:392 = depth processor size 392 instead of the "
                        "checkpoint's 518)")
    p.add_argument("--only", default="reference,vllm,cache,pipeline",
                   help="comma-separated phases to run (reference, vllm, cache, pipeline); the engine starts if any "
                        "of the last three is named")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--cpu-preprocess", action="store_true", help="only the CPU preprocessing micro-benchmark")
    p.add_argument("--prepare-workers", type=int, default=0, help="threads for --cpu-preprocess (0 = CPU count)")


# ----------------------------------------------------------------------------- workload
def _media(args: argparse.Namespace, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f, h, w = args.frames, args.height, args.width
    mask = np.zeros((h, w), bool)
    mask[h // 4:h // 2, w // 3:w // 2] = True
    return {
        "frames": rng.integers(0, 255, (f, h, w, 3), dtype=np.uint8),
        "points": rng.standard_normal((f, h, w, 3)).astype(np.float32),
        "mask": mask,
    }


def _query(media: dict[str, np.ndarray], i: int, key: str, with_points: bool = True, question: str | None = None):  # type: ignore[no-untyped-def]
    from model.inputs import RegionMask, SpatialQuery

    f = media["frames"].shape[0]
    return SpatialQuery(
        frames=media["frames"],
        question=question or f"Request {i}: how far is <region0> from the camera? Answer with one number in metres.",
        regions=[[RegionMask(f // 2, media["mask"])]],
        pointmaps=media["points"] if with_points else None,
        is_video=f > 1,
        media_key=key,
    )


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def _gpu_used_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return round((total - free) / 2**30, 2)


# ----------------------------------------------------------------------------- checkpoints
def _model_dir(args: argparse.Namespace, work: Path) -> tuple[Path, Path | None, str]:
    """-> (flat dir for vLLM, NVILA dir for the core or None, vLLM load_format)."""
    from model.checkpoint import build_tiny_checkpoint, convert_to_flat

    if args.config == "tiny":
        nvila, flat = work / "tiny", work / "tiny-flat"
        if not (nvila / "config.json").exists():
            build_tiny_checkpoint(nvila)
        if not (flat / "config.json").exists():
            convert_to_flat(nvila, flat)
        return flat, nvila, "auto"
    from model.checkpoint import nvila_lite_8b_config
    from model.dummy_checkpoint import build_dummy_flat

    flat = build_dummy_flat(work / "nvila-lite-8b-flat", nvila_lite_8b_config())
    return flat, None, "dummy"


# ----------------------------------------------------------------------------- phases
def reference(args: argparse.Namespace, nvila: Path | None, media: dict[str, np.ndarray]) -> dict[str, Any]:
    """The model core, one request at a time (what the torch engine does at concurrency 1)."""
    import torch

    from model.inputs import GenerationParams

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if nvila is not None:
        from model.checkpoint import load_model

        model = load_model(nvila, device=dev, dtype=torch.float32)
    else:
        from model.checkpoint import build_model, nvila_lite_8b_config
        from model.tokenizer_build import build_tokenizer

        torch.manual_seed(0)
        model = build_model(nvila_lite_8b_config(), build_tokenizer(), dev, torch.bfloat16)
    params = GenerationParams(max_tokens=args.max_tokens, ignore_eos=True)
    ttfts, lat = [], []
    for i in range(args.reference_requests + 1):  # request 0 warms up
        q = _query(media, i, f"ref-{i}")
        t0 = time.perf_counter()
        first: list[float] = []

        def on_delta(row: int, delta: Any) -> None:
            if not first and delta.token_ids:
                first.append(time.perf_counter() - t0)

        res = model.generate([model.prepare(q)], [params], on_delta)[0]
        if i:
            lat.append(time.perf_counter() - t0)
            ttfts.append(first[0] if first else lat[-1])
    out = {
        "requests": len(lat),
        "requests_per_s": len(lat) / sum(lat),
        "latency_s_p50": _pct(lat, 50),
        "ttft_s_p50": _pct(ttfts, 50),
        "prompt_tokens": res.prompt_tokens,
        "completion_tokens": res.completion_tokens,
        "gpu_peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None,
    }
    del model
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


async def _one(engine: Any, q: Any, rid: str, max_tokens: int) -> dict[str, float]:
    from model.inputs import GenerationParams
    from service.engines.protocol import EngineRequest

    t0 = time.perf_counter()
    ttft, toks, prompt = None, 0, 0
    async for d in engine.generate(EngineRequest(rid, q, GenerationParams(max_tokens=max_tokens, ignore_eos=True))):
        if ttft is None and d.token_ids:
            ttft = time.perf_counter() - t0
        toks += len(d.token_ids)
        prompt = d.prompt_tokens or prompt
    e2e = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else e2e, "e2e": e2e, "tokens": toks, "prompt_tokens": prompt}


async def sweep(engine: Any, args: argparse.Namespace, media: dict[str, np.ndarray], level: int, tag: str) -> dict[str, Any]:
    n = min(args.requests, 16) if level == 1 else args.requests
    sem = asyncio.Semaphore(level)

    async def run(i: int) -> dict[str, float]:
        async with sem:
            return await _one(engine, _query(media, i, f"{tag}-c{level}-{i}"), f"{tag}-c{level}-{i}", args.max_tokens)

    t0 = time.perf_counter()
    rs = await asyncio.gather(*(run(i) for i in range(n)))
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in rs]
    return {
        "concurrency": level, "requests": n, "wall_s": wall, "requests_per_s": n / wall,
        "output_tokens_per_s": sum(r["tokens"] for r in rs) / wall,
        "ttft_s_p50": _pct(ttft, 50), "ttft_s_p99": _pct(ttft, 99),
        "e2e_s_p50": _pct([r["e2e"] for r in rs], 50), "prompt_tokens": rs[0]["prompt_tokens"],
    }


async def cache_hit(engine: Any, args: argparse.Namespace, repeats: int = 3) -> dict[str, Any]:
    """Cold first question on new media vs a second question on the same media and regions."""
    cold, hit = [], []
    for r in range(repeats):
        media = _media(args, seed=100 + r)
        key = f"cache-{r}"
        a = await _one(engine, _query(media, 0, key, question="How far is <region0> from the camera?"), f"{key}-a", args.max_tokens)
        b = await _one(engine, _query(media, 1, key, question="What colour is <region0>? One word."), f"{key}-b", args.max_tokens)
        cold.append(a["ttft"])
        hit.append(b["ttft"])
    return {"repeats": repeats, "ttft_cold_s_p50": _pct(cold, 50), "ttft_hit_s_p50": _pct(hit, 50),
            "speedup": _pct(cold, 50) / _pct(hit, 50)}


async def pipeline(engine: Any, args: argparse.Namespace, media: dict[str, np.ndarray], work: Path,
                   report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Point maps (depth backend on this GPU, through the worker's `PointMapBatcher`) + the vLLM engine,
    requests overlapping; once per --pipeline-runs entry, on one engine. With
    `report`, report["pipeline"] is updated and saved after every run (a cut-off run keeps them)."""
    from model.geometry import DepthAnythingBackend
    from model.geometry.depth_anything import build_large_shaped_depth_model, build_tiny_depth_model
    from service.pipeline import PointMapBatcher

    depth_dir = work / f"depth-{args.depth}"
    if not (depth_dir / "config.json").exists():
        (build_large_shaped_depth_model if args.depth == "large" else build_tiny_depth_model)(str(depth_dir))
    backends: dict[int | None, Any] = {}
    n = args.requests
    runs = []
    for spec in args.pipeline_runs.split(","):
        max_jobs_s, _, size_s = spec.partition(":")
        max_jobs, input_size = int(max_jobs_s), int(size_s) if size_s else None
        if input_size not in backends:
            backends[input_size] = DepthAnythingBackend(str(depth_dir), device="auto", batch_size=32, input_size=input_size)
            backends[input_size].compute(media["frames"][:2])  # warm-up
        backend = backends[input_size]
        batcher = PointMapBatcher(backend, max_jobs=max_jobs, max_frames=max(128, args.frames))
        batches: list[tuple[int, float]] = []  # (jobs, seconds) per depth batch, as the batcher formed them

        def recorded(frames: list[np.ndarray], intrinsics: list[Any], batches: list[tuple[int, float]] = batches) -> list[Any]:
            t = time.perf_counter()
            out = backend.compute_many(frames, intrinsics)
            batches.append((len(frames), time.perf_counter() - t))
            return out

        batcher.backend = SimpleNamespace(compute_many=recorded)
        depth_s: list[float] = []
        sem = asyncio.Semaphore(args.pipeline_concurrency)

        async def run(i: int, tag: str) -> dict[str, float]:
            async with sem:
                t0 = time.perf_counter()
                pm = await batcher.compute(media["frames"])
                depth_s.append(time.perf_counter() - t0)  # queueing for the batcher included
                q = _query({**media, "points": pm.points}, i, tag)
                q.pointmap_valid = pm.valid
                r = await _one(engine, q, tag, args.max_tokens)
                return {**r, "e2e": time.perf_counter() - t0}

        t0 = time.perf_counter()
        # a media uuid of its own per run: vLLM's processor/encoder/prefix caches are keyed by it
        rs = await asyncio.gather(*(run(i, f"pipe-{spec}-{i}") for i in range(n)))
        wall = time.perf_counter() - t0
        await batcher.close()
        runs.append({"max_jobs": max_jobs, "depth_input_size": input_size, "max_frames": batcher.max_frames,
                     "requests_per_s": n / wall,
                     "depth_batches": len(batches), "jobs_per_depth_batch_mean": n / max(1, len(batches)),
                     # seconds of depth compute (on the GPU shared with vLLM) per request, and per batch
                     "depth_s_per_request": sum(s for _, s in batches) / n,
                     "depth_batch_s_p50": _pct([s for _, s in batches], 50),
                     "depth_wait_s_per_request_p50": _pct(depth_s, 50),
                     "ttft_s_p50": _pct([r["ttft"] for r in rs], 50),
                     "e2e_s_p50": _pct([r["e2e"] for r in rs], 50)})
        print(json.dumps({"pipeline_run": runs[-1]}), flush=True)
        default = [r for r in runs if r["depth_input_size"] is None] or runs
        batched = max(default, key=lambda r: r["max_jobs"])  # the worker's configuration: batching on
        serial = next((r for r in default if r["max_jobs"] == 1), None)
        result = {"depth": args.depth, "concurrency": args.pipeline_concurrency, "requests": n,
                  "requests_per_s": batched["requests_per_s"], "max_jobs": batched["max_jobs"], "runs": runs,
                  "ratio_vs_max_jobs_1": batched["requests_per_s"] / serial["requests_per_s"] if serial else None,
                  "depth_backend_batch_size": 32, "gpu_used_gb": _gpu_used_gb()}
        if report is not None:
            report["pipeline"] = result
            _save(report, args.out)
    return result


# ----------------------------------------------------------------------------- main
def _save(report: dict[str, Any], out: Path | None) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "engine.json").write_text(json.dumps(report, indent=2))


async def _vllm_phases(args: argparse.Namespace, flat: Path, load_format: str, media: dict[str, np.ndarray],
                       work: Path, report: dict[str, Any]) -> None:
    from service.engines.vllm_engine import VLLMEngine
    from service.settings import Settings

    engine = VLLMEngine(
        Settings(model=str(flat), data_dir=work),
        engine_args=dict(load_format=load_format, enforce_eager=args.eager, max_model_len=args.max_model_len,
                         gpu_memory_utilization=args.gpu_memory_utilization,
                         max_num_seqs=max(int(c) for c in args.concurrency.split(","))),
    )
    t0 = time.perf_counter()
    await engine.start()
    report["vllm"] = {"start_s": time.perf_counter() - t0, "enforce_eager": args.eager, "gpu_used_gb": _gpu_used_gb(),
                      "levels": []}
    _save(report, args.out)
    only = set(args.only.split(","))
    try:
        for level in (int(c) for c in args.concurrency.split(",")) if "vllm" in only else ():
            report["vllm"]["levels"].append(await sweep(engine, args, media, level, "tput"))
            _save(report, args.out)
        ref = report.get("reference", {}).get("requests_per_s")
        if ref and report["vllm"]["levels"]:
            report["throughput_ratio_vs_reference"] = {
                str(lv["concurrency"]): lv["requests_per_s"] / ref for lv in report["vllm"]["levels"]}
        if "cache" in only:
            report["cache_hit"] = await cache_hit(engine, args)
            _save(report, args.out)
        if args.depth != "none" and "pipeline" in only:
            report["pipeline"] = await pipeline(engine, args, media, work, report)
            _save(report, args.out)
    finally:
        await engine.close()


def cpu_preprocess(args: argparse.Namespace, flat: Path) -> dict[str, Any]:
    """Per-request CPU cost of the vLLM path, split where it runs: the engine's pool vs vLLM's renderer."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.cache import MultiModalProcessorOnlyCache
    from vllm.multimodal.processing import ProcessorInputs, TimingContext
    from vllm.plugins import load_general_plugins

    from model.prompt import layout_query
    from model.vllm_plugin.processing import prepare_item

    load_general_plugins()
    mc = ModelConfig(model=str(flat), tokenizer=str(flat), max_model_len=args.max_model_len, mm_processor_cache_gb=1)
    proc = MULTIMODAL_REGISTRY.create_processor(mc, cache=MultiModalProcessorOnlyCache(mc))
    cfg, tok = proc.info.get_hf_config(), proc.info.get_tokenizer()
    media = [_media(args, seed=s) for s in range(2)]
    queries = [_query(media[i % 2], i, f"cpu-{i}") for i in range(max(4, args.requests))]
    _, layout = layout_query(queries[0], tok, cfg, context=args.max_model_len, reserve=0)

    def prepare(q: Any) -> dict[str, Any]:
        return prepare_item(q, layout.region_order, cfg)

    prepare(queries[0])  # warm-up
    serial = []
    for q in queries[:4]:
        t0 = time.perf_counter()
        item = prepare(q)
        serial.append(time.perf_counter() - t0)
    render = []
    for i, q in enumerate(queries[:4]):  # distinct uuids: every render is a cache miss (the work is done)
        items = proc.info.parse_mm_data({"image": prepare(q)})
        t0 = time.perf_counter()
        proc.apply(ProcessorInputs(layout.input_ids, items, {"image": [f"cpu-{i}"]}), TimingContext(enabled=False))
        render.append(time.perf_counter() - t0)
    workers = args.prepare_workers or os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        list(pool.map(prepare, queries))
        wall = time.perf_counter() - t0
    t = int(item["num_tiles"])
    arrays = {k: int(v.nbytes) for k, v in item.items() if hasattr(v, "nbytes")}
    return {
        "tiles": t, "torch_threads": torch.get_num_threads(),
        "prepare_s_per_request_p50": _pct(serial, 50),
        "renderer_s_per_request_p50": _pct(render, 50),
        "prepare_workers": workers, "prepare_requests_per_s_parallel": len(queries) / wall,
        "prepare_requests_per_s_serial": 1.0 / _pct(serial, 50),
        "item_bytes": sum(arrays.values()), "item_arrays_bytes": arrays,
        # what crossed processes before: bf16 pixel values [T, 3, S, S] instead of uint8 [T, S, S, 3]
        "item_bytes_with_bf16_pixels": sum(arrays.values()) - arrays["tiles"] + 2 * arrays["tiles"],
    }


def run(args: argparse.Namespace) -> int:
    if args.work_dir is not None:  # kept: the built checkpoints are reused by the next run
        args.work_dir.mkdir(parents=True, exist_ok=True)
        return _run(args, args.work_dir)
    with tempfile.TemporaryDirectory(prefix="sr3d-bench-engine-") as tmp:
        return _run(args, Path(tmp))


def _run(args: argparse.Namespace, work: Path) -> int:
    import torch

    flat, nvila, load_format = _model_dir(args, work)
    if args.cpu_preprocess:
        report = {"config": args.config, "workload": {"frames": args.frames, "height": args.height,
                                                      "width": args.width, "regions": 1},
                  "cpu_preprocess": cpu_preprocess(args, flat)}
        print(json.dumps(report, indent=2))
        return 0
    media = _media(args)
    report: dict[str, Any] = {
        "config": args.config, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "workload": {"frames": args.frames, "height": args.height, "width": args.width, "regions": 1,
                     "max_tokens": args.max_tokens, "requests_per_level": args.requests},
    }
    only = set(args.only.split(","))
    unknown = only - {"reference", "vllm", "cache", "pipeline"}
    if unknown:
        raise SystemExit(f"--only: unknown phase(s) {sorted(unknown)}")
    if "reference" in only:
        report["reference"] = reference(args, nvila, media)
        _save(report, args.out)
    if only & {"vllm", "cache", "pipeline"}:
        asyncio.run(_vllm_phases(args, flat, load_format, media, work, report))
    _save(report, args.out)
    if args.out is not None:
        _plot(report, args.out / "engine.png")
    print(json.dumps(report, indent=2))
    return 0


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report.get("vllm", {}).get("levels", [])
    if not levels:
        return
    c = [lv["concurrency"] for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(c, [lv["requests_per_s"] for lv in levels], "o-", label="vLLM engine")
    ref = report.get("reference", {}).get("requests_per_s")
    if ref:
        a.axhline(ref, color="gray", ls="--", label="model core, one at a time")
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrency")
    a.set_ylabel("requests/s")
    a.legend()
    a.set_title(f"SR-3D {report['config']} ({report['device']})")
    b.plot(c, [lv["ttft_s_p50"] for lv in levels], "o-", label="TTFT p50")
    b.plot(c, [lv["ttft_s_p99"] for lv in levels], "s--", label="TTFT p99")
    b.set_xscale("log", base=2)
    b.set_xlabel("concurrency")
    b.set_ylabel("seconds")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
