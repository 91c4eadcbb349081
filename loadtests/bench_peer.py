"""Our pipeline against a peer: stock vLLM serving a same-size video VLM, side by side in one run (issue 26).

`sr3d bench peer [--parts peer,exact,engine,fast] [--concurrency 8,64] [--duration S] [--eager]
                 [--peer-pythonpath DIR] [--budget-s S] [--out DIR]`

One GPU, one run, the parts one after the other (each gets the GPU alone):
- **peer**: stock `vllm serve` (`python -m vllm.entrypoints.openai.api_server`, a subprocess) of a
  LLaVA-OneVision-7B-shaped model (Qwen2-7B + SigLIP-400M at 384 px: NVILA-Lite-8B's language model and vision
  tower) with `--load-format dummy`. The bench writes the model folder itself (config.json naming
  `LlavaOnevisionForConditionalGeneration`, transformers' LlavaOnevision processor, a tokenizer covering every id,
  our chat template); nothing is downloaded. Driven through its OpenAI API with the `openai` client: the bench's
  TUM clip as a `video_url` (a base64 data URL, decoded by vLLM's API server: 32 frames via `--media-io-kwargs`),
  a question varied per request, exactly --max-tokens tokens (`ignore_eos`), streamed, usage included.
  Prefix cache and multimodal processor cache off (every request sends the same video: vLLM would hash it and
  skip the work), as our side runs with the point-map cache off.
- **exact** / **fast**: our pipeline through our API (gateway + Redis + `sr3d worker`), the presets of
  `sr3d bench pipeline` (`multiview` = the exact default path, `fast` = fp8 + DA3 at 280), by that bench's own
  machinery (`bench_pipeline._run_config`: fresh stack, warm-up, closed loops, open loop, per-stage breakdown).
- **engine**: our vLLM engine alone (`VLLMEngine` in this process, same settings as the exact worker's):
  random frames and point maps prepared in memory, no decode, no depth, no HTTP — the limit of the exact path.

Each part: warm-up burst, a closed loop per --concurrency level, then an open loop (Poisson arrivals) at
--open-fraction (half) of that part's best closed-loop rate. Per level: requests/s, TTFT and e2e p50/p95, prompt
tokens per request (from the usage each side reports) and prompt tokens/s. Ratios in the same run: exact/peer,
fast/peer, exact/engine, fast/engine, each also normalised per prompt token (prompt tokens/s), and the issue's
targets judged. JSON (written after every part, so a run cut by a time limit keeps what it measured) + PNG.

Compile settings are the same on both sides: `--eager` runs the peer with `--enforce-eager` and our engines
with SR3D_VLLM_ENFORCE_EAGER (no torch.compile, no CUDA graphs: ~60 s per start instead of ~100-200 s, so four
starts fit one 10-minute call); without it both compile as served.

The peer's LLaVA-family model code needs transformers' `PixtralRotaryEmbedding` (vLLM 0.24's llava.py imports
it; transformers >= 5.17 renamed it). Without it vLLM falls back to its Transformers backend, which is not what a
user of the peer gets: the bench checks the import in the peer's environment first (`--peer-pythonpath` puts
e.g. transformers 5.16.0 in front for the peer only), runs the peer with `--model-impl vllm` (no silent
fallback) and scans its log for "falling back to Transformers"; either finding is reported, not benchmarked.

Time: a part is ~60 s of vLLM start (eager) + warm-up + each level and its drain; --budget-s skips a part that
would not fit (named in "skipped"). The same command with --resume (same --work-dir, same warm machine) then runs
only the missing parts and writes one report with all of them (each part's `call` indexes `calls`).

Needs a CUDA GPU (vLLM's CUDA build; on a machine without one it exits 2 saying so).
Prints JSON; --out DIR writes DIR/peer.json (after every part), DIR/peer.png and DIR/peer-vllm.log (its tail).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from loadtests import bench_pipeline
from loadtests import report as rpt

PARTS = ("peer", "exact", "engine", "fast")
PEER_MODEL_NAME = "peer"
PEER_MAX_NUM_SEQS = 64  # SR3D_VLLM_MAX_NUM_SEQS' default: the same cap on sequences in flight as our engine
# LLaVA-OneVision-7B (llava-hf layout): Qwen2-7B + SigLIP-400M (26 layers used) at 384 px, 2x2 pooling of the
# 27x27 patch grid per video frame, one newline embedding after the frames.
PEER_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
PEER_FIRST_SPECIAL = 151643  # Qwen2's <|endoftext|>; <image> = 151646, <video> = 151647 as in LLaVA-OneVision
PEER_VOCAB = 152128  # LLaVA-OneVision-7B's embedding rows
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                vocab_size=PEER_VOCAB, tie_word_embeddings=False, hidden_act="silu")
SIGLIP_400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                   image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# Tiny shapes for a smoke run where vLLM can serve them (same token arithmetic: 384 px, patch 14, same ids).
QWEN2_TINY = {**QWEN2_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2}
SIGLIP_TINY = {**SIGLIP_400M, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
FALLBACK_MARK = "falling back to transformers"  # vLLM 0.24 model_loader/utils.py, lower-cased
PEER_QUESTIONS = (
    "How far is the keyboard from the camera?", "What is on the desk, from left to right?",
    "Is the cup to the left of the monitor?", "How tall is the monitor, in metres?",
    "Which object is closest to the camera?", "How many objects are on the desk?",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run, in this order (of {', '.join(PARTS)})")
    p.add_argument("--concurrency", default="8,64", help="closed-loop users, one level each")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per level (closed and open)")
    p.add_argument("--warmup", type=int, default=8, help="warm-up requests per part (compiles, lazy init)")
    p.add_argument("--open-fraction", type=float, default=0.5,
                   help="open loop (Poisson) at this fraction of each part's best closed-loop requests/s (0 = skip)")
    p.add_argument("--num-frames", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--eager", action="store_true",
                   help="every vLLM of the run without torch.compile / CUDA graphs (peer --enforce-eager, ours "
                        "SR3D_VLLM_ENFORCE_EAGER=1): the same compile settings on both sides, faster starts")
    p.add_argument("--exact-config", default="multiview", help="bench_pipeline configuration of the exact part")
    p.add_argument("--fast-config", default="fast", help="bench_pipeline configuration of the fast part")
    p.add_argument("--shapes", choices=["7b", "tiny"], default="7b", help="peer model shapes (tiny: smoke runs)")
    p.add_argument("--peer-pythonpath", default=None,
                   help="prepended to the peer server's PYTHONPATH only (e.g. a --target install of transformers "
                        "5.16.0, which still has PixtralRotaryEmbedding)")
    p.add_argument("--peer-media", choices=["data", "file"], default="data",
                   help="the video as a base64 data URL in every request (data) or a file:// URL (file)")
    p.add_argument("--peer-arg", action="append", default=[],
                   help="extra `vllm serve` argument (repeat; e.g. --peer-arg=--gpu-memory-utilization=0.8)")
    p.add_argument("--allow-fallback", action="store_true",
                   help="benchmark the peer even if vLLM fell back to its Transformers backend (reported)")
    p.add_argument("--threads", type=int, default=None, help="OMP threads of our worker (default: all cores)")
    p.add_argument("--budget-s", type=float, default=560.0,
                   help="wall-clock budget of the whole run: a part that would not fit is skipped (reported)")
    p.add_argument("--start-estimate-s", type=float, default=None,
                   help="expected seconds per vLLM start for the budget check (default 60 with --eager, 200 without)")
    p.add_argument("--ready-timeout", type=float, default=420.0)
    p.add_argument("--work-dir", type=Path, default=None, help="kept between runs (built models are reused)")
    p.add_argument("--resume", action="store_true",
                   help="with --work-dir: keep the parts an earlier call of this run measured (its state file) and run "
                        "only the others (e.g. those the budget skipped), so one report holds every part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true",
                   help="our parts only (exact, fast), tiny models on the CPU: the run's orchestration (budget, "
                        "--resume, report) without a GPU, for tests; numbers mean nothing")
    p.add_argument("--out")


# ----------------------------------------------------------------------------- the peer's model folder
def peer_video_tokens(num_frames: int, image_size: int = 384, patch_size: int = 14, pool_stride: int = 2) -> int:
    """Video placeholder tokens LLaVA-OneVision gives `num_frames` frames: each frame's patch grid pooled by
    `pool_stride` (ceil), plus one newline embedding after the last frame (27x27 -> 14x14: 196 per frame)."""
    pooled = math.ceil((image_size // patch_size) / pool_stride)
    return num_frames * pooled * pooled + 1


def frames_for_token_budget(tokens: int, image_size: int = 384, patch_size: int = 14, pool_stride: int = 2) -> int:
    """The most frames whose video tokens fit `tokens` (what gives the peer our visual-token budget)."""
    per = peer_video_tokens(1, image_size, patch_size, pool_stride) - 1
    return max(0, (tokens - 1) // per)


def peer_tokenizer(vocab_size: int = PEER_VOCAB) -> Any:
    """A byte-level tokenizer with exactly `vocab_size` ids, every id decodable to text (random weights generate
    ids across the whole table), Qwen2's specials and LLaVA-OneVision's <image>/<video> at their real ids
    (151643-151647). The same family as our dummy checkpoint's tokenizer (model/dummy_checkpoint.py): both sides'
    text encodes byte by byte, a few dozen tokens more than Qwen2's real vocabulary, on both sides alike."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from model.dummy_checkpoint import _word_pieces
    from model.tokenizer_build import QWEN2_CHAT_TEMPLATE

    if vocab_size < PEER_FIRST_SPECIAL + len(PEER_SPECIALS):
        raise ValueError(f"vocab_size {vocab_size} leaves no room for the specials at {PEER_FIRST_SPECIAL}")
    pieces = itertools.chain(sorted(pre_tokenizers.ByteLevel.alphabet()), _word_pieces())
    vocab: dict[str, int] = {}
    for i in range(vocab_size):
        k = i - PEER_FIRST_SPECIAL
        vocab[PEER_SPECIALS[k] if 0 <= k < len(PEER_SPECIALS) else next(pieces)] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(PEER_SPECIALS))  # already in the vocabulary: they keep those ids
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<image>", "<video>"],
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = QWEN2_CHAT_TEMPLATE  # the template our service renders (model/tokenizer_build.py)
    return fast


def write_peer_model(directory: Path, shapes: str = "7b") -> Path:
    """config.json (+ processor, tokenizer, chat template) of a LLaVA-OneVision-7B-shaped model for vLLM's
    `--load-format dummy` (no weights). Written with transformers' own LlavaOnevision* classes; built once."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    from model.tokenizer_build import QWEN2_CHAT_TEMPLATE

    marker = directory / ".sr3d-peer-model"
    if marker.is_file() and marker.read_text() == shapes:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    text, vision = (QWEN2_7B, SIGLIP_400M) if shapes == "7b" else (QWEN2_TINY, SIGLIP_TINY)
    config = LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **text}, vision_config={"model_type": "siglip_vision_model", **vision},
        image_token_index=PEER_FIRST_SPECIAL + 3, video_token_index=PEER_FIRST_SPECIAL + 4,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    # Without `architectures` vLLM 0.24 resolves the folder to the base model as a pooling model (no chat route)
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    config.dtype = "bfloat16"  # the published checkpoint's dtype
    config.save_pretrained(str(directory))
    size = {"height": vision["image_size"], "width": vision["image_size"]}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        video_processor=LlavaOnevisionVideoProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=peer_tokenizer(int(text["vocab_size"])),
        num_image_tokens=(vision["image_size"] // vision["patch_size"]) ** 2,
        vision_feature_select_strategy="full", chat_template=QWEN2_CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(directory))
    marker.write_text(shapes)
    return directory


def data_url(path: Path, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


# ----------------------------------------------------------------------------- samples, loops, numbers
@dataclass
class Sample:
    """One request as its client saw it (seconds from just before sending)."""

    ok: bool
    e2e: float | None = None
    ttft: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


Send = Callable[[random.Random], Awaitable[Sample]]


async def closed_loop_fn(send: Send, users: int, duration: float, seed: int) -> tuple[list[Sample], float]:
    """`users` users, each sending its next request when the previous one ended, until `duration` is over (the
    same loop as bench_workers.closed_loop, for clients that are not our API: the peer's and the engine's)."""
    out: list[Sample] = []
    t0 = time.perf_counter()

    async def user(i: int) -> None:
        rng = random.Random(seed * 100003 + i)
        while time.perf_counter() < t0 + duration:
            out.append(await send(rng))

    await asyncio.gather(*(user(i) for i in range(users)))
    return out, time.perf_counter() - t0


async def open_loop_fn(send: Send, rate: float, duration: float, seed: int) -> tuple[list[Sample], float]:
    """Poisson arrivals at `rate`/s for `duration` s, each sent whether or not earlier ones ended."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    rng = random.Random(seed)
    t0, at, tasks = time.perf_counter(), 0.0, []
    while at < duration:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        tasks.append(asyncio.create_task(send(random.Random(rng.random()))))
        at += rng.expovariate(rate)
    out = list(await asyncio.gather(*tasks))
    return out, time.perf_counter() - t0


def _q(values: Sequence[float]) -> dict[str, float | int | None]:
    r = lambda v: None if v is None else round(v, 4)  # noqa: E731 - tiny local formatter
    return {"n": len(values), "p50": r(rpt.percentile(values, 50)), "p95": r(rpt.percentile(values, 95)),
            "max": r(max(values)) if values else None}


def summarize(samples: Sequence[Sample], wall: float, label: str, max_tokens: int | None = None) -> dict[str, Any]:
    """One level -> requests/s, TTFT/e2e p50/p95, prompt tokens per request and per second. A request counts as
    done when it ended well and (if `max_tokens` is given) produced exactly that many tokens."""
    done = [s for s in samples if s.ok and (max_tokens is None or s.completion_tokens == max_tokens)]
    errors = sorted({s.error or f"completion tokens {s.completion_tokens} != {max_tokens}"
                     for s in samples if s not in done})
    prompt = [s.prompt_tokens for s in done if s.prompt_tokens]
    completion = [s.completion_tokens for s in done if s.completion_tokens]
    return {
        "label": label, "requests": len(samples), "done": len(done), "failed": len(samples) - len(done),
        "duration_s": round(wall, 3), "req_per_s": round(len(done) / wall, 4) if wall > 0 else None,
        "ttft_s": _q([s.ttft for s in done if s.ttft is not None]),
        "e2e_s": _q([s.e2e for s in done if s.e2e is not None]),
        # per request, from the usage each side reports (the peer's OpenAI usage, our `done` event's usage)
        "prompt_tokens": {"n": len(prompt), "mean": round(sum(prompt) / len(prompt), 1) if prompt else None,
                          "min": min(prompt, default=None), "max": max(prompt, default=None)},
        "prompt_tokens_per_s": round(sum(prompt) / wall, 1) if wall > 0 else None,
        "completion_tokens_per_s": round(sum(completion) / wall, 1) if wall > 0 else None,
        "problems": errors[:10],
    }


def sample_from_job(r: Any) -> Sample:
    """A `service.client.JobResult` of our API as a Sample (usage from its `done` event)."""
    term = r.terminal
    data = term.data if term is not None and isinstance(term.data, dict) else {}
    usage = data.get("usage") or {}
    err = None if r.ok else (r.client_error or f"ended with {term.type if term is not None else 'no terminal event'}: "
                                                f"{str(data.get('code') or data.get('message') or '')[:200]}")
    return Sample(ok=r.ok, e2e=r.e2e, ttft=r.ttft, prompt_tokens=usage.get("prompt_tokens"),
                  completion_tokens=usage.get("completion_tokens"), error=err)


RATIO_PAIRS = (("exact", "peer"), ("fast", "peer"), ("exact", "engine"), ("fast", "engine"))


def ratios(parts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each pair of RATIO_PAIRS present in the run, per closed-loop level (same users), plus the open loops
    (each at half of its own best rate: latency ratios). `per_prompt_token` = prompt tokens/s ratio."""
    def r(x: float | None, y: float | None) -> float | None:
        return round(x / y, 3) if x is not None and y else None

    out = []
    for a, b in RATIO_PAIRS:
        if not parts.get(a, {}).get("levels") or not parts.get(b, {}).get("levels"):
            continue
        base = {lv["users"]: lv for lv in parts[b]["levels"]}
        for lv in parts[a]["levels"]:
            o = base.get(lv["users"])
            if o is None:
                continue
            out.append({"part": a, "vs": b, "users": lv["users"],
                        "req_per_s": r(lv["req_per_s"], o["req_per_s"]),
                        "per_prompt_token": r(lv["prompt_tokens_per_s"], o["prompt_tokens_per_s"]),
                        "ttft_p50": r(lv["ttft_s"]["p50"], o["ttft_s"]["p50"]),
                        "e2e_p50": r(lv["e2e_s"]["p50"], o["e2e_s"]["p50"])})
        oa, ob = parts[a].get("open_loop"), parts[b].get("open_loop")
        if oa and ob:
            out.append({"part": a, "vs": b, "users": None, "load": "open loop, each at its own fraction of best",
                        "offered_req_per_s": [oa.get("offered_req_per_s"), ob.get("offered_req_per_s")],
                        "req_per_s": r(oa["req_per_s"], ob["req_per_s"]),
                        "per_prompt_token": r(oa["prompt_tokens_per_s"], ob["prompt_tokens_per_s"]),
                        "ttft_p50": r(oa["ttft_s"]["p50"], ob["ttft_s"]["p50"]),
                        "e2e_p50": r(oa["e2e_s"]["p50"], ob["e2e_s"]["p50"])})
    return out


def targets(parts: dict[str, dict[str, Any]], rows: list[dict[str, Any]], top_users: int) -> list[dict[str, Any]]:
    """Issue 26's targets, judged on this run's rows (the issue states them for an H200)."""
    def find(a: str, b: str, users: int | None) -> dict[str, Any] | None:
        return next((x for x in rows if x["part"] == a and x["vs"] == b and x["users"] == users), None)

    out = []
    for a, b, key, goal, what in (
        ("exact", "peer", "req_per_s", 1.0, f"exact req/s >= 1.0x the peer's at {top_users} users"),
        ("fast", "peer", "req_per_s", 1.5, f"fast req/s >= 1.5x the peer's at {top_users} users"),
        ("exact", "engine", "req_per_s", 0.9, f"exact req/s >= 90 % of the engine alone at {top_users} users"),
    ):
        row = find(a, b, top_users)
        if row is not None:
            out.append({"target": what, "value": row[key], "goal": goal, "met": row[key] is not None and row[key] >= goal})
    for a in ("exact", "fast"):
        row = find(a, "peer", None)
        if row is not None:
            out.append({"target": f"{a} TTFT p50 at half load <= the peer's", "value": row["ttft_p50"], "goal": 1.0,
                        "met": row["ttft_p50"] is not None and row["ttft_p50"] <= 1.0})
    best = max((lv["req_per_s"] or 0 for lv in parts.get("exact", {}).get("levels", [])), default=None)
    if best is not None:
        out.append({"target": "exact >= 5 req/s (on one H200)", "value": best, "goal": 5.0, "met": best >= 5.0})
    return out


def prompt_token_comparison(parts: dict[str, dict[str, Any]], num_frames: int) -> dict[str, Any]:
    """Prompt tokens per request of each part (mean over every level's finished requests) and how they differ."""
    def mean(p: dict[str, Any]) -> float | None:
        lvs = [*p.get("levels", []), *([p["open_loop"]] if p.get("open_loop") else [])]
        n = sum(lv["prompt_tokens"]["n"] for lv in lvs)
        return round(sum(lv["prompt_tokens"]["n"] * (lv["prompt_tokens"]["mean"] or 0) for lv in lvs) / n, 1) if n else None

    means = {name: mean(p) for name, p in parts.items()}
    out: dict[str, Any] = {"per_request": means, "peer_video_tokens_expected": peer_video_tokens(num_frames)}
    peer, ours = means.get("peer"), means.get("exact") or means.get("fast")
    if peer and ours:
        out.update(peer_minus_ours=round(peer - ours, 1), peer_over_ours=round(peer / ours, 3),
                   peer_frames_for_our_budget=frames_for_token_budget(int(ours - (peer - peer_video_tokens(num_frames)))))
    return out


# ----------------------------------------------------------------------------- the peer
class PeerServer:
    """`python -m vllm.entrypoints.openai.api_server` in its own process group, log to a file."""

    def __init__(self, model_dir: Path, args: argparse.Namespace, work: Path, media_dir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "peer-vllm.log"
        self.argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *peer_serve_args(
            model_dir, self.port, args.num_frames, PEER_MAX_NUM_SEQS, args.eager,
            media_dir if args.peer_media == "file" else None), *args.peer_arg]
        self.env = peer_env(args.peer_pythonpath)
        self.proc: subprocess.Popen[bytes] | None = None
        self.t0 = 0.0

    def start(self) -> None:
        self.t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        """Seconds from start until /health answers 200; raises RuntimeError with the log's tail otherwise."""
        assert self.proc is not None
        deadline = self.t0 + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}: {self.log_tail(2500)}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:  # loopback only
                    if r.status == 200:
                        return time.perf_counter() - self.t0
            time.sleep(1.0)
        raise RuntimeError(f"vllm serve not ready after {timeout:.0f} s: {self.log_tail(2500)}")

    def log_tail(self, n: int) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def fell_back(self) -> bool:
        try:
            return FALLBACK_MARK in self.log_path.read_text(errors="replace").lower()
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)  # the API server and its engine-core child
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        _wait_group_gone(self.proc.pid, 30.0)


def peer_serve_args(model_dir: Path, port: int, num_frames: int, max_seqs: int, eager: bool,
                    media_dir: Path | None = None) -> list[str]:
    """The `vllm serve` arguments of the peer: what a user of stock vLLM would run, plus the fairness settings."""
    args = [
        "--model", str(model_dir), "--served-model-name", PEER_MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
        # without --runner generate vLLM 0.24 may pick the pooling runner for this folder (no chat route)
        "--runner", "generate", "--load-format", "dummy", "--dtype", "bfloat16",
        "--model-impl", "vllm",  # fail instead of a silent fallback to the Transformers backend
        "--max-model-len", "8192", "--max-num-seqs", str(max_seqs), "--seed", "0",  # as our engine (SR3D_VLLM_*)
        # every request sends the same video: without these vLLM would skip its processing and prefill
        "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0",
        "--limit-mm-per-prompt", json.dumps({"image": 0, "video": 1}),
        "--media-io-kwargs", json.dumps({"video": {"num_frames": num_frames}}),
        "--generation-config", "vllm", "--uvicorn-log-level", "warning",
    ]
    if eager:
        args.append("--enforce-eager")
    if media_dir is not None:
        args += ["--allowed-local-media-path", str(media_dir)]
    return args


def peer_env(pythonpath: str | None) -> dict[str, str]:
    from loadtests.bench_workers import NO_MULTICAST

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1", **NO_MULTICAST}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    return env


def peer_preflight(pythonpath: str | None) -> subprocess.Popen[str]:
    """Started in the peer's environment (read with `preflight_result`): vLLM's and transformers' versions, and
    whether vLLM's LLaVA code can import (`PixtralRotaryEmbedding`); without it vLLM would serve the fallback."""
    code = ("import json, transformers, vllm\nok, err = True, None\n"
            "try:\n    from transformers.models.pixtral.modeling_pixtral import PixtralRotaryEmbedding\n"
            "except ImportError as e:\n    ok, err = False, str(e)[:300]\n"
            "print(json.dumps({'vllm': vllm.__version__, 'transformers': transformers.__version__, "
            "'transformers_path': transformers.__file__, 'pixtral_rotary_import': ok, 'error': err}))")
    return subprocess.Popen([sys.executable, "-c", code], env=peer_env(pythonpath), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def preflight_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"pixtral_rotary_import": False, "error": "the import check took over 300 s"}
    if proc.returncode != 0 or not out.strip():
        return {"pixtral_rotary_import": False, "error": err.strip()[-800:]}
    return dict(json.loads(out.strip().splitlines()[-1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_group_gone(pgid: int, timeout: float) -> None:
    """Until no process of the group is left (the engine core frees the GPU only when it has exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def peer_send(client: Any, video_url: str, max_tokens: int) -> Send:
    counter = itertools.count()

    async def send(rng: random.Random) -> Sample:
        question = f"Question {next(counter)}: {rng.choice(PEER_QUESTIONS)} Answer in one sentence."
        messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_url}},
                                                 {"type": "text", "text": question}]}]
        t0 = time.perf_counter()
        ttft, usage = None, None
        try:
            stream = await client.chat.completions.create(
                model=PEER_MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft = time.perf_counter() - t0
                if chunk.usage is not None:
                    usage = chunk.usage
        except Exception as e:  # noqa: BLE001 - a failed request is counted and named, the load goes on
            return Sample(ok=False, e2e=time.perf_counter() - t0, error=f"{type(e).__name__}: {str(e)[:300]}")
        e2e = time.perf_counter() - t0
        if usage is None:
            return Sample(ok=False, e2e=e2e, ttft=ttft, error="no usage in the stream")
        return Sample(ok=True, e2e=e2e, ttft=ttft if ttft is not None else e2e, prompt_tokens=usage.prompt_tokens,
                      completion_tokens=usage.completion_tokens)

    return send


def run_peer(args: argparse.Namespace, levels: list[int], server: PeerServer, clip: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"name": "peer", "kind": "stock vLLM OpenAI server, LLaVA-OneVision-7B shapes",
                           "argv": server.argv[1:], "levels": [], "problems": []}
    try:
        out["start_s"] = round(server.wait_ready(args.ready_timeout), 2)
        out["backend"] = "transformers-fallback" if server.fell_back() else "vllm"
        if out["backend"] != "vllm":
            out["problems"].append("vLLM fell back to its Transformers backend (log: 'falling back to Transformers'): "
                                   "not what a user of the peer gets; see --peer-pythonpath")
            if not args.allow_fallback:
                return out
        url = data_url(clip) if args.peer_media == "data" else clip.resolve().as_uri()
        out["media"] = {"as": "base64 data URL" if args.peer_media == "data" else "file:// URL",
                        "clip_bytes": clip.stat().st_size, "frames_sampled_by_vllm": args.num_frames}
        asyncio.run(_drive(args, levels, _peer_client_factory(server.url), url, out))
        if server.fell_back() and out["backend"] == "vllm":  # a late warning counts too
            out["backend"] = "transformers-fallback"
            out["problems"].append("vLLM fell back to its Transformers backend during the run")
    except Exception as e:  # noqa: BLE001 - reported; the other parts still run
        out["problems"].append(f"{type(e).__name__}: {str(e)[-2500:]}")
    finally:
        server.stop()
    return out


def _peer_client_factory(url: str) -> Callable[[], Any]:
    def make() -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600.0)

    return make


async def _drive(args: argparse.Namespace, levels: list[int], make_client: Callable[[], Any], url: str,
                 out: dict[str, Any]) -> None:
    client = make_client()
    try:
        send = peer_send(client, url, args.max_tokens)
        await _levels_of(send, args, levels, "peer", out)
    finally:
        await client.close()


async def _levels_of(send: Send, args: argparse.Namespace, levels: list[int], name: str, out: dict[str, Any]) -> None:
    """Warm-up burst, each closed-loop level, then the open loop at --open-fraction of the best rate."""
    t0 = time.perf_counter()
    warm = list(await asyncio.gather(*(send(random.Random(args.seed + 7 + i)) for i in range(args.warmup))))
    out["warmup"] = {"requests": len(warm), "done": sum(s.ok for s in warm), "s": round(time.perf_counter() - t0, 2),
                     "problems": sorted({s.error for s in warm if s.error})[:5]}
    for users in levels:
        samples, wall = await closed_loop_fn(send, users, args.duration, args.seed + users)
        lv = summarize(samples, wall, f"{name}, {users} users", args.max_tokens)
        lv["users"] = users
        out["levels"].append(lv)
        out["problems"] += [f"{users} users: {p}" for p in lv["problems"]]
        _progress(name, lv)
    best = max((lv["req_per_s"] or 0.0 for lv in out["levels"]), default=0.0)
    if args.open_fraction > 0 and best > 0:
        rate = round(best * args.open_fraction, 3)
        samples, wall = await open_loop_fn(send, rate, args.duration, args.seed + 991)
        lv = summarize(samples, wall, f"{name}, open loop {rate} req/s", args.max_tokens)
        lv.update(users=None, offered_req_per_s=rate, fraction_of_best=args.open_fraction)
        out["open_loop"] = lv
        out["problems"] += [f"open loop: {p}" for p in lv["problems"]]
        _progress(name, lv)


def _progress(name: str, lv: dict[str, Any]) -> None:
    print(json.dumps({"part": name, "level": lv["label"], "req_per_s": lv["req_per_s"], "done": lv["done"],
                      "ttft_p50": lv["ttft_s"]["p50"], "prompt_tokens": lv["prompt_tokens"]["mean"]}),
          file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- ours
def pipeline_args(args: argparse.Namespace, work: Path, cpu: bool = False) -> argparse.Namespace:
    """bench_pipeline's own arguments for this run (its parser: defaults stay in one place). `cpu`: the tiny
    demo models on the CPU (the tests' way to run `run_ours` for real without a GPU)."""
    p = argparse.ArgumentParser()
    bench_pipeline.add_arguments(p)
    argv = ["--cpu" if cpu else "--dummy-8b", "--media", "tum", "--concurrency", args.concurrency, "--duration", str(args.duration),
            "--num-frames", str(args.num_frames), "--max-tokens", str(args.max_tokens), "--warmup", str(args.warmup),
            "--open-fraction", str(args.open_fraction), "--ready-timeout", str(args.ready_timeout),
            "--seed", str(args.seed), "--work-dir", str(work)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if cpu:  # the torch engine batches up to the worker's concurrency: as many as the top level's users
        argv += ["--worker-concurrency", str(max(_levels(args.concurrency)))]
    return p.parse_args(argv)


def run_ours(args: argparse.Namespace, pargs: argparse.Namespace, name: str, spec: str, common: dict[str, str],
             levels: list[int], load: Any, work: Path) -> dict[str, Any]:
    """One configuration of our pipeline through bench_pipeline's machinery; its levels carry this bench's
    numbers (p95, prompt tokens) next to bench_pipeline's per-stage breakdown."""
    cname, env = bench_pipeline.parse_config(spec)
    if args.eager:
        env["SR3D_VLLM_ENFORCE_EAGER"] = "1"

    def on_level(lv: dict[str, Any], results: list[Any], wall: float) -> None:
        mine = summarize([sample_from_job(r) for r in results], wall, lv["label"], args.max_tokens)
        lv["client"] = mine
        _progress(name, {**mine, "label": lv["label"]})

    c = bench_pipeline._run_config(pargs, cname, {**common, **env}, levels, load, work / f"stack-{name}", on_level)
    out: dict[str, Any] = {"name": name, "kind": f"our pipeline through our API, configuration {cname!r}",
                           "config": spec, "env": c["env"], "start_s": c.get("start_s"), "warmup": c.get("warmup"),
                           "levels": [], "problems": list(c["problems"])}
    for lv in c["levels"]:
        out["levels"].append({**lv["client"], "users": lv["users"], "stages": lv["stages"]})
    if c.get("open_loop"):
        ol = c["open_loop"]
        out["open_loop"] = {**ol["client"], "users": None, "offered_req_per_s": ol["offered_req_per_s"],
                            "fraction_of_best": ol["fraction_of_best"], "stages": ol["stages"]}
    return out


def run_engine(args: argparse.Namespace, levels: list[int], model_dir: str, work: Path) -> dict[str, Any]:
    """Our vLLM engine alone, in this process, with the exact worker's engine settings (SR3D_VLLM_* defaults +
    dummy weights): the request is prepared from frames and point maps in memory (no decode, no depth)."""
    out: dict[str, Any] = {"name": "engine", "kind": "our VLLMEngine alone (no decode, no depth, no HTTP)",
                           "levels": [], "problems": []}

    async def go() -> None:
        from loadtests.bench_engine import _media, _one, _query
        from service.engines.vllm_engine import VLLMEngine
        from service.settings import Settings, VLLMSettings

        media = _media(SimpleNamespace(frames=args.num_frames, height=480, width=640))
        vs = VLLMSettings(load_format="dummy", enforce_eager=args.eager)
        out["settings"] = {"vllm": vs.model_dump(), "frames": args.num_frames, "frame_size": [640, 480]}
        engine = VLLMEngine(Settings(model=model_dir, engine="vllm", data_dir=work / "engine-data", vllm=vs))
        t0 = time.perf_counter()
        await engine.start()
        out["start_s"] = round(time.perf_counter() - t0, 2)
        counter = itertools.count()

        async def send(rng: random.Random) -> Sample:
            i = next(counter)
            key = f"engine-{i}-{rng.random():.6f}"  # a media key of its own: no cache hit in vLLM
            t = time.perf_counter()
            try:
                r = await _one(engine, _query(media, i, key), key, args.max_tokens)
            except Exception as e:  # noqa: BLE001 - counted and named
                return Sample(ok=False, e2e=time.perf_counter() - t, error=f"{type(e).__name__}: {str(e)[:300]}")
            return Sample(ok=True, e2e=r["e2e"], ttft=r["ttft"], prompt_tokens=r["prompt_tokens"] or None,
                          completion_tokens=r["tokens"])

        try:
            await _levels_of(send, args, levels, "engine", out)
        finally:
            await engine.close()

    try:
        asyncio.run(go())
    except Exception as e:  # noqa: BLE001 - reported; the other parts still run
        out["problems"].append(f"{type(e).__name__}: {str(e)[-2500:]}")
    return out


# ----------------------------------------------------------------------------- main
def _levels(spec: str) -> list[int]:
    return sorted({int(x) for x in spec.split(",") if x.strip()})


def cuda_problem() -> str | None:
    """Why this machine cannot run the bench, or None."""
    try:
        import torch
    except ImportError as e:
        return f"torch is not importable ({e})"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} sees no CUDA device, and vLLM's OpenAI server (the peer) and our vLLM "
                "engine run on CUDA only (this vLLM build has no CPU platform)")
    return None


def run(args: argparse.Namespace) -> int:
    try:
        parts = [x.strip() for x in args.parts.split(",") if x.strip()]
        levels = _levels(args.concurrency)
        unknown = sorted(set(parts) - set(PARTS))
        if unknown or not parts or len(set(parts)) != len(parts):
            raise ValueError(f"--parts: give each of {', '.join(PARTS)} at most once (unknown: {unknown})")
        if not levels or levels[0] < 1:
            raise ValueError("--concurrency needs integers >= 1")
        for spec in (args.exact_config, args.fast_config):
            bench_pipeline.parse_config(spec)
    except ValueError as e:
        print(f"bench peer: {e}", file=sys.stderr)
        return 2
    if args.cpu and set(parts) - {"exact", "fast"}:
        print("bench peer: --cpu runs our parts only (--parts exact,fast): the peer and the engine need CUDA",
              file=sys.stderr)
        return 2
    why = None if args.cpu else cuda_problem()
    if why is not None:
        print(f"bench peer: needs a CUDA GPU: {why}", file=sys.stderr)
        return 2
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        return _run(args, parts, levels, args.work_dir)
    with tempfile.TemporaryDirectory(prefix="sr3d-bench-peer-") as tmp:
        return _run(args, parts, levels, Path(tmp))


def part_estimate_s(args: argparse.Namespace, levels: list[int]) -> float:
    """Seconds one part needs: a vLLM start, the warm-up, every level and its drain (a request in flight at the
    end of a closed loop finishes first: at 64 users that is one e2e, ~20 s on the exact path)."""
    start = args.start_estimate_s if args.start_estimate_s is not None else (60.0 if args.eager else 200.0)
    loops = len(levels) + (1 if args.open_fraction > 0 else 0)
    return start + 10.0 + loops * (args.duration + 5.0) + 15.0


def _run(args: argparse.Namespace, parts: list[str], levels: list[int], work: Path) -> int:
    t_run = time.perf_counter()
    pargs = pipeline_args(args, work, cpu=args.cpu)
    load = bench_pipeline.make_load(pargs, work)  # the TUM clip (640x480 mpeg4), shared by every part
    clip = work / "tum-640x480.mp4"
    report: dict[str, Any] = {
        "title": "sr3d bench peer: stock vLLM (LLaVA-OneVision-7B shapes) vs our pipeline vs our engine alone",
        "device": "cpu (tiny models, --cpu)" if args.cpu else _device_name(),
        "workload": {"media": "TUM RGB-D fixture clip, 640x480 mpeg4, 120 frames", "num_frames": args.num_frames,
                     "max_tokens": args.max_tokens, "ignore_eos": True, "concurrency": levels,
                     "duration_s": args.duration, "open_fraction": args.open_fraction, "warmup": args.warmup},
        "fairness": {
            "compile": "enforce_eager on every vLLM (no torch.compile, no CUDA graphs)" if args.eager
                       else "torch.compile + CUDA graphs on every vLLM (as served)",
            "caches": "peer: prefix cache and multimodal processor cache off (identical videos would hit); ours: "
                      "point-map cache off, vLLM caches as served (each request's regions make its item unique)",
            "weights": "random (vLLM load_format=dummy) on both sides; bf16 peer, our exact path as configured",
            "tokenizers": "byte-level full-vocabulary tokenizers on both sides (text encodes byte by byte)",
            "peer_video_decode": "in vLLM's API server process (OpenCV), part of what a user of the peer gets",
            "limits": "max_model_len 8192 and max_num_seqs 64 on both sides; GPU memory: vLLM's default 0.9 for "
                      "the peer (alone on the GPU, as a user runs it), 0.7 for ours (SR3D_VLLM_GPU_MEMORY_UTILIZATION: "
                      "depth shares the GPU); on an 80 GB card either leaves room for 64 users' KV cache (estimate: vLLM "
                      "logs its KV capacity at start, see peer-vllm.log and the worker's log)",
            "scheduling": "vLLM's defaults on both sides (the peer's OpenAI server picks its own "
                          "max_num_batched_tokens; ours the engine default, RESULTS.md 'Where the time to first token goes')",
        },
        "parts": {}, "skipped": [], "ratios": [], "targets": [],
    }
    problems: list[str] = []
    server: PeerServer | None = None
    peer_dir = work / f"peer-llava-onevision-{args.shapes}"
    state = work / "peer-state.json"  # the report so far, for --resume in a later call on the same machine
    report["calls"] = [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())]
    if args.resume and state.is_file():
        earlier = json.loads(state.read_text())
        report["calls"] = [*earlier.get("calls", []), *report["calls"]]
        for key in ("peer_environment", "device"):
            report.setdefault(key, earlier.get(key))
        for name, part in earlier.get("parts", {}).items():
            if name in parts and part.get("levels"):
                report["parts"][name] = part  # keeps its "call": the index in "calls" of the call that measured it
                problems += [f"{name}: {p}" for p in part.get("problems", [])]
                parts = [p for p in parts if p != name]
    try:
        if "peer" in parts:
            check = peer_preflight(args.peer_pythonpath)  # vLLM's import takes a while: build the folder meanwhile
            write_peer_model(peer_dir, args.shapes)
            pf = preflight_result(check)
            report["peer_environment"] = pf
            if not pf.get("pixtral_rotary_import") and not args.allow_fallback:
                msg = (f"peer skipped: vLLM's LLaVA code cannot import in the peer's environment "
                       f"(transformers {pf.get('transformers')}: {pf.get('error')}); vLLM would serve its Transformers "
                       "fallback. Give --peer-pythonpath a transformers that still has PixtralRotaryEmbedding (5.16.0)")
                report["skipped"].append({"part": "peer", "why": msg})
                problems.append(msg)
                parts = [p for p in parts if p != "peer"]
        if parts and parts[0] == "peer":  # start it now: our models build on the CPU while it loads
            server = PeerServer(peer_dir, args, work, clip.parent)
            server.start()
        common = bench_pipeline.common_env(pargs, work, levels[-1]) if set(parts) - {"peer"} else {}
        for name in parts:
            need = part_estimate_s(args, levels)
            left = args.budget_s - (time.perf_counter() - t_run)
            if need > left:
                why = f"{name} skipped: needs ~{need:.0f} s, {left:.0f} s left of --budget-s {args.budget_s:.0f}"
                report["skipped"].append({"part": name, "why": why})
                problems.append(why)
                if name == "peer" and server is not None:
                    server.stop()  # started early: it must not hold the GPU during our parts
                continue
            if name == "peer":
                if server is None:
                    server = PeerServer(peer_dir, args, work, clip.parent)
                    server.start()
                part = run_peer(args, levels, server, clip)
            elif name == "engine":
                part = run_engine(args, levels, common["SR3D_MODEL"], work)
            else:
                spec = args.exact_config if name == "exact" else args.fast_config
                part = run_ours(args, pargs, name, spec, common, levels, load, work)
            part["call"] = len(report["calls"]) - 1
            report["parts"][name] = part
            problems += [f"{name}: {p}" for p in part["problems"]]
            _finish(report, levels, args)
            _save(report, args.out, server)
            state.write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps({"part": name, "start_s": part.get("start_s"),
                              "levels": [(lv["users"], lv["req_per_s"]) for lv in part["levels"]],
                              "elapsed_s": round(time.perf_counter() - t_run, 1)}), file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()
    report["problems"], report["ok"] = problems[:60], not problems
    report["elapsed_s"] = round(time.perf_counter() - t_run, 1)
    _finish(report, levels, args)
    state.write_text(json.dumps(report, indent=2) + "\n")
    _save(report, args.out, server, final=True)
    return 0 if not problems else 1


def _finish(report: dict[str, Any], levels: list[int], args: argparse.Namespace) -> None:
    parts = report["parts"]
    report["ratios"] = ratios(parts)
    report["targets"] = targets(parts, report["ratios"], levels[-1])
    report["prompt_tokens"] = prompt_token_comparison(parts, args.num_frames)


def _device_name() -> str:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _save(report: dict[str, Any], out: str | None, server: PeerServer | None, final: bool = False) -> None:
    if final:
        rpt.save_report(out, "peer", report, plot)  # JSON on stdout + peer.json + peer.png
    elif out:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "peer.json").write_text(json.dumps(report, indent=2) + "\n")
    if out and server is not None and server.log_path.is_file():
        (Path(out) / "peer-vllm.log").write_text(server.log_tail(400_000))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, lv) for name, p in report["parts"].items()
            for lv in [*p.get("levels", []), *([p["open_loop"]] if p.get("open_loop") else [])]]
    labels = [f"{n}\n{lv['users']} users" if lv["users"] else f"{n}\nopen {lv.get('offered_req_per_s')}/s" for n, lv in rows]
    colors = {"peer": "tab:gray", "exact": "tab:blue", "fast": "tab:green", "engine": "tab:orange"}
    c = [colors.get(n, "tab:purple") for n, _ in rows]
    fig, axes = plt.subplots(2, 2, figsize=(max(12, 1.6 * len(rows) + 4), 9))
    (a_rps, a_tok), (a_ttft, a_e2e) = axes
    x = list(range(len(rows)))
    a_rps.bar(x, [lv["req_per_s"] or 0 for _, lv in rows], color=c)
    a_rps.set(title="requests/s (finished)", ylabel="req/s")
    a_tok.bar(x, [lv["prompt_tokens_per_s"] or 0 for _, lv in rows], color=c)
    a_tok.set(title="prompt tokens/s (from each side's usage)", ylabel="tokens/s")
    for ax, key, title in ((a_ttft, "ttft_s", "time to first token"), (a_e2e, "e2e_s", "end to end")):
        ax.bar([i - 0.2 for i in x], [lv[key]["p50"] or 0 for _, lv in rows], width=0.4, color=c, label="p50")
        ax.bar([i + 0.2 for i in x], [lv[key]["p95"] or 0 for _, lv in rows], width=0.4, color=c, alpha=0.45, label="p95")
        ax.set(title=f"{title}: p50 (solid), p95 (light)", ylabel="s")
    for ax in (a_rps, a_tok, a_ttft, a_e2e):
        ax.set_xticks(x, labels, fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    pt = report.get("prompt_tokens", {}).get("per_request", {})
    fig.suptitle(f"{report['title']}\n{report['device']}; prompt tokens/request: "
                 + ", ".join(f"{k} {v}" for k, v in pt.items()), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
