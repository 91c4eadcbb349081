"""Error of vLLM fp8 (SR3D_VLLM_QUANTIZATION=fp8) against the exact bf16 path, on the same requests (issue 15).

`python -m loadtests.quant_error [--checkpoint tiny|DIR] [--quantization fp8] [--max-tokens N] [--top-k K]
                                 [--out DIR]`                                   (GPU only: vLLM's fp8 needs CUDA)

The same SR-3D requests (TUM RGB-D fixture frames as a 32-frame video with 3D point maps and a region, the same
video without point maps, one frame as a tiled image; several questions) go through the service's own
`VLLMEngine.build_inputs` into AsyncLLM twice, each engine in its own child process (so the first one's GPU
memory is gone before the second starts): once as the checkpoint's dtype (bf16 = the exact path), once
quantized. Greedy decoding, exactly --max-tokens tokens (ignore_eos), top-K logprobs at every step.

Reported per request and overall:
- `token_agreement`: share of positions where both chose the same token; `prefix_match`: tokens before the
  first difference (after it the two continue from different texts, so later positions compare little);
- `max_logprob_error` / `mean_logprob_error`: over positions before the first difference (same context on both
  sides), |log p_fp8(t) - log p_bf16(t)| for the exact path's top-K tokens t that both returned. vLLM returns
  log-softmax values, not raw logits; on a shared prefix this is the logit error up to the per-position
  normaliser, which is what decides sampling.

Weights: `tiny` is the demo checkpoint's random weights, which shows the lever works and bounds numeric drift,
NOT the quality cost; pass a real checkpoint directory (SR3D_MODEL's) to judge that. Prints JSON; --out DIR writes
DIR/quant_error.json. Engine start-up is about 60 s each with enforce_eager (the default here; the error does
not depend on CUDA graphs).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

QUESTIONS = (
    "What is <region0>?",
    "How far is <region0> from the camera?",
    "Describe the scene in detail.",
    "Is <region0> to the left of the desk?",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="tiny", help="tiny (demo checkpoint, random weights) or a checkpoint dir")
    p.add_argument("--quantization", default="fp8")
    p.add_argument("--dtype", default="bfloat16", help="the exact path's dtype (and the unquantized activations')")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    p.add_argument("--enforce-eager", type=int, default=1)
    p.add_argument("--out")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: "<quantization or none>:<dump path>"


def requests() -> dict[str, Any]:
    from PIL import Image

    from loadtests.scenarios import FIXTURES
    from model.inputs import RegionMask, SpatialQuery

    files = sorted((FIXTURES / "rgbd" / "color").glob("*.png"))
    frames = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    video = np.stack([frames[i % len(frames)] for i in range(32)])
    h, w = video.shape[1:3]
    mask = np.zeros((h, w), bool)
    mask[h // 4 : h // 2, w // 3 : 2 * w // 3] = True
    rng = np.random.default_rng(0)
    points = rng.normal(size=(32, h, w, 3)).astype(np.float32)
    out: dict[str, Any] = {}
    for i, q in enumerate(QUESTIONS):
        regions = [[RegionMask(5, mask)]] if "<region0>" in q else []
        out[f"video32_3d_q{i}"] = SpatialQuery(video, q, regions, pointmaps=points, is_video=True, media_key="tum32")
        out[f"video32_2d_q{i}"] = SpatialQuery(video, q, regions, is_video=True, media_key="tum32-2d")
    img_regions = [[RegionMask(0, mask)]]
    out["image_tiles"] = SpatialQuery(video[:1], "What is <region0>?", img_regions, media_key="tum0")
    return out


async def _generate(args: argparse.Namespace, quantization: str | None, data_dir: Path) -> dict[str, Any]:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    from service.engines.vllm_engine import VLLMEngine
    from service.settings import Settings, VLLMSettings

    model = None if args.checkpoint == "tiny" else args.checkpoint
    vs = VLLMSettings(quantization=quantization, dtype=args.dtype, enforce_eager=bool(args.enforce_eager),
                      gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False)
    engine = VLLMEngine(Settings(model=model, data_dir=data_dir, vllm=vs), warmup=False)
    await engine.start()
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, logprobs=args.top_k,
                        output_kind=RequestOutputKind.FINAL_ONLY)
    try:
        async def one(name: str, q: Any) -> tuple[str, dict[str, Any]]:
            prompt, _ = engine.build_inputs(q, args.max_tokens)
            (engine_input,) = await engine.llm.renderer.render_cmpl_async([prompt])
            final = None
            async for out in engine.llm.generate(engine_input, sp, f"{name}-{quantization}"):
                final = out
            c = final.outputs[0]  # type: ignore[union-attr]
            steps = [{str(t): float(lp.logprob) for t, lp in step.items()} for step in (c.logprobs or [])]
            return name, {"tokens": list(c.token_ids), "logprobs": steps}

        rows = dict(await asyncio.gather(*(one(n, q) for n, q in requests().items())))
    finally:
        await engine.close()
    return {"quantization": quantization, "requests": rows}


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    a, b = ref["tokens"], got["tokens"]
    n = min(len(a), len(b))
    same = [x == y for x, y in zip(a, b)]
    prefix = next((i for i, s in enumerate(same) if not s), n)
    errs = []
    for i in range(min(prefix + 1, n)):  # positions with the same context (the first difference included)
        r, g = ref["logprobs"][i], got["logprobs"][i]
        errs += [abs(r[t] - g[t]) for t in r if t in g]
    return {"tokens": n, "token_agreement": round(sum(same) / n, 4) if n else None, "prefix_match": prefix,
            "max_logprob_error": round(max(errs), 5) if errs else None,
            "mean_logprob_error": round(float(np.mean(errs)), 5) if errs else None}


def run(args: argparse.Namespace) -> int:
    if args.child:
        quant, _, dump = args.child.partition(":")
        with tempfile.TemporaryDirectory(prefix="sr3d-quant-") as tmp:
            res = asyncio.run(_generate(args, None if quant == "none" else quant, Path(tmp)))
        Path(dump).write_text(json.dumps(res))
        return 0
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"error": "quant_error needs a CUDA GPU (vLLM's fp8 kernels)"}))
        return 2
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sr3d-quant-error-") as tmp:
        for quant in ("none", args.quantization):
            dump = Path(tmp) / f"{quant}.json"
            argv = [sys.executable, "-m", "loadtests.quant_error", "--child", f"{quant}:{dump}",
                    "--checkpoint", args.checkpoint, "--dtype", args.dtype, "--max-tokens", str(args.max_tokens),
                    "--top-k", str(args.top_k), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                    "--enforce-eager", str(args.enforce_eager)]
            proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode != 0 or not dump.exists():
                print(json.dumps({"error": f"{quant} engine failed (rc {proc.returncode})", "log_tail": proc.stderr[-3000:]}))
                return 1
            results[quant] = json.loads(dump.read_text())
    ref, got = results["none"]["requests"], results[args.quantization]["requests"]
    per = {name: compare(ref[name], got[name]) for name in ref}
    total = sum(r["tokens"] for r in per.values())
    report = {
        "checkpoint": args.checkpoint, "exact": args.dtype, "lever": args.quantization, "max_tokens": args.max_tokens,
        "top_k": args.top_k, "requests": len(per),
        "token_agreement": round(sum(r["token_agreement"] * r["tokens"] for r in per.values()) / total, 4) if total else None,
        "identical_sequences": sum(r["prefix_match"] == r["tokens"] for r in per.values()),
        "max_logprob_error": max((r["max_logprob_error"] or 0) for r in per.values()),
        "mean_logprob_error": round(float(np.mean([r["mean_logprob_error"] for r in per.values() if r["mean_logprob_error"] is not None])), 5),
        "per_request": per,
        "note": "random weights (tiny) bound the numeric drift only; judge quality with the real checkpoint" if args.checkpoint == "tiny" else "",
    }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "quant_error.json").write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
