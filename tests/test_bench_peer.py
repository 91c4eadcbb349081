"""`sr3d bench peer` (issue 26): the parts that run without a GPU.

The bench itself needs a CUDA GPU (stock `vllm serve` and our vLLM engine; this vLLM build has no CPU platform),
so on a machine without one it must refuse in one line with exit code 2. What it computes before and after
the GPU work is tested here for real: the peer's model folder (loaded back by transformers' AutoConfig and
AutoProcessor, the processor expanding a 32-frame video into the token count the bench states), the prompt-token
arithmetic, the `vllm serve` arguments (parsed by vLLM 0.24's own argument parser), and the report's numbers,
ratios and targets on synthetic samples, down to the JSON and PNG files."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtests import bench_peer
from loadtests.bench_peer import (
    PEER_SPECIALS,
    Sample,
    frames_for_token_budget,
    peer_serve_args,
    peer_video_tokens,
    prompt_token_comparison,
    ratios,
    summarize,
    targets,
)

ROOT = Path(__file__).resolve().parents[1]


def test_prompt_token_arithmetic() -> None:
    # 384 px / patch 14 = 27x27 patches, pooled 2x2 (ceil) to 14x14 = 196 per frame, + 1 newline embedding
    assert peer_video_tokens(1) == 197
    assert peer_video_tokens(32) == 6273
    assert peer_video_tokens(20) == 3921
    # the frames that give the peer a visual budget of ~4,004 tokens (ours at 32 frames): 20
    assert frames_for_token_budget(4004) == 20
    assert frames_for_token_budget(196) == 0 and frames_for_token_budget(197) == 1


@pytest.mark.timeout(300)
def test_peer_model_folder_loads_back_and_expands_a_video(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoProcessor

    d = bench_peer.write_peer_model(tmp_path / "peer", "tiny")
    cfg = AutoConfig.from_pretrained(d)
    assert type(cfg).__name__ == "LlavaOnevisionConfig"
    assert cfg.architectures == ["LlavaOnevisionForConditionalGeneration"]
    assert (cfg.image_token_index, cfg.video_token_index) == (151646, 151647)
    assert cfg.vision_config.image_size == 384 and cfg.vision_config.patch_size == 14
    assert cfg.vision_feature_select_strategy == "full"
    proc = AutoProcessor.from_pretrained(d)
    assert type(proc).__name__ == "LlavaOnevisionProcessor"
    tok = proc.tokenizer
    assert len(tok) == bench_peer.PEER_VOCAB  # every id the random weights can generate decodes
    assert [tok.convert_tokens_to_ids(t) for t in PEER_SPECIALS] == list(range(151643, 151648))
    assert tok.eos_token == "<|im_end|>" and tok.decode([123456]) != ""
    text = tok.apply_chat_template([{"role": "user", "content": "<video>\nHow far is the cup?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    video = np.random.default_rng(0).integers(0, 255, (32, 48, 64, 3), dtype=np.uint8)
    ids = proc(text=text, videos=[video], return_tensors="np")["input_ids"][0].tolist()
    assert ids.count(151647) == peer_video_tokens(32) == 6273
    # the 7b shapes: written the same way (config only checked: the processor is the same)
    d7 = bench_peer.write_peer_model(tmp_path / "peer7b", "7b")
    c7 = AutoConfig.from_pretrained(d7)
    t = c7.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size) == \
        (3584, 28, 28, 4, 18944)
    assert (c7.vision_config.hidden_size, c7.vision_config.num_hidden_layers) == (1152, 26)
    # built once: a second call reuses the folder
    mtime = (d7 / "config.json").stat().st_mtime_ns
    assert bench_peer.write_peer_model(d7, "7b") == d7 and (d7 / "config.json").stat().st_mtime_ns == mtime


@pytest.mark.timeout(300)
def test_serve_arguments_parse_with_vllms_own_parser(tmp_path: Path) -> None:
    """vLLM's parser needs a platform to build its defaults; CpuPlatform is handed to it for parsing only."""
    pytest.importorskip("vllm")
    argv = peer_serve_args(tmp_path, 8123, 32, 64, eager=True, media_dir=tmp_path)
    code = ("import json, sys\nimport vllm.platforms as P\nfrom vllm.platforms.cpu import CpuPlatform\n"
            "P._current_platform = CpuPlatform()\n"
            "from vllm.entrypoints.openai.cli_args import make_arg_parser\n"
            "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
            "a = make_arg_parser(FlexibleArgumentParser()).parse_args(json.loads(sys.argv[1]))\n"
            "print(json.dumps({k: getattr(a, k) for k in ('runner', 'load_format', 'enable_prefix_caching', "
            "'mm_processor_cache_gb', 'limit_mm_per_prompt', 'media_io_kwargs', 'model_impl', 'enforce_eager', "
            "'max_model_len', 'max_num_seqs', 'served_model_name')}))")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, timeout=280,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"runner": "generate", "load_format": "dummy", "enable_prefix_caching": False,
                   "mm_processor_cache_gb": 0.0, "limit_mm_per_prompt": {"image": 0, "video": 1},
                   "media_io_kwargs": {"video": {"num_frames": 32}}, "model_impl": "vllm", "enforce_eager": True,
                   "max_model_len": 8192, "max_num_seqs": 64, "served_model_name": ["peer"]}
    assert "--enforce-eager" not in peer_serve_args(tmp_path, 1, 32, 64, eager=False)


def _samples(n: int, e2e: float, ttft: float, prompt: int, tokens: int = 64) -> list[Sample]:
    return [Sample(ok=True, e2e=e2e + 0.01 * i, ttft=ttft + 0.001 * i, prompt_tokens=prompt, completion_tokens=tokens)
            for i in range(n)]


def _part(name: str, rps8: float, rps64: float, prompt: int, ttft_half: float) -> dict:
    """A part as the bench builds it: closed levels at 8 and 64 users (10 s each), an open loop."""
    lv8 = summarize(_samples(int(rps8 * 10), 2.0, 0.5, prompt), 10.0, f"{name}, 8 users", 64) | {"users": 8}
    lv64 = summarize(_samples(int(rps64 * 10), 12.0, 4.0, prompt), 10.0, f"{name}, 64 users", 64) | {"users": 64}
    ol = summarize(_samples(int(rps64 * 5), 1.5, ttft_half, prompt), 10.0, f"{name}, open", 64)
    ol |= {"users": None, "offered_req_per_s": rps64 / 2}
    return {"name": name, "levels": [lv8, lv64], "open_loop": ol, "problems": []}


def test_summary_counts_only_full_answers_and_reads_prompt_tokens() -> None:
    s = [*_samples(9, 1.0, 0.2, 6300), Sample(ok=True, e2e=1.0, ttft=0.2, prompt_tokens=6300, completion_tokens=12),
         Sample(ok=False, e2e=0.1, error="APIConnectionError: refused")]
    lv = summarize(s, 3.0, "x", max_tokens=64)
    assert (lv["requests"], lv["done"], lv["failed"]) == (11, 9, 2)
    assert lv["req_per_s"] == 3.0
    assert lv["prompt_tokens"] == {"n": 9, "mean": 6300.0, "min": 6300, "max": 6300}
    assert lv["prompt_tokens_per_s"] == 18900.0 and lv["completion_tokens_per_s"] == 192.0
    assert lv["ttft_s"]["p50"] == 0.204 and lv["ttft_s"]["p95"] == pytest.approx(0.2076)
    assert lv["e2e_s"]["p95"] == pytest.approx(1.076) and lv["e2e_s"]["n"] == 9
    assert lv["problems"] == ["APIConnectionError: refused", "completion tokens 12 != 64"]


def test_ratios_per_request_and_per_prompt_token_and_targets() -> None:
    parts = {"peer": _part("peer", 4.0, 4.8, 6300, 0.42), "exact": _part("exact", 2.8, 3.0, 4000, 0.9),
             "fast": _part("fast", 4.0, 4.4, 4000, 0.8), "engine": _part("engine", 3.0, 4.0, 4000, 0.5)}
    rows = ratios(parts)
    by = {(r["part"], r["vs"], r["users"]): r for r in rows}
    assert set(by) == {(a, b, u) for a, b in bench_peer.RATIO_PAIRS for u in (8, 64, None)}
    r = by[("exact", "peer", 64)]
    assert r["req_per_s"] == round(3.0 / 4.8, 3)
    assert r["per_prompt_token"] == round((3.0 * 4000) / (4.8 * 6300), 3)  # normalised per prompt token
    assert by[("exact", "engine", 64)]["req_per_s"] == 0.75
    half = by[("exact", "peer", None)]
    assert half["ttft_p50"] == round(parts["exact"]["open_loop"]["ttft_s"]["p50"] / parts["peer"]["open_loop"]["ttft_s"]["p50"], 3)
    assert half["offered_req_per_s"] == [1.5, 2.4]
    t = {x["target"]: x for x in targets(parts, rows, 64)}
    assert t["exact req/s >= 1.0x the peer's at 64 users"]["met"] is False
    assert t["exact req/s >= 90 % of the engine alone at 64 users"]["value"] == 0.75
    assert t["exact TTFT p50 at half load <= the peer's"]["met"] is False
    assert t["exact >= 5 req/s (on one H200)"]["value"] == 3.0
    pt = prompt_token_comparison(parts, 32)
    assert pt["per_request"]["peer"] == 6300.0 and pt["peer_minus_ours"] == 2300.0
    assert pt["peer_over_ours"] == round(6300 / 4000, 3) and pt["peer_video_tokens_expected"] == 6273
    # a part missing (skipped, cut by the budget): its ratios are simply absent
    assert all(r["part"] != "fast" for r in ratios({k: v for k, v in parts.items() if k != "fast"}))


def test_report_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parts = {"peer": _part("peer", 4.0, 4.8, 6300, 0.42), "exact": _part("exact", 2.8, 3.0, 4000, 0.9)}
    report = {"title": "t", "device": "synthetic", "parts": parts, "skipped": [], "problems": [], "ok": True}
    bench_peer._finish(report, [8, 64], argparse.Namespace(num_frames=32))
    bench_peer._save(report, str(tmp_path), None, final=True)
    saved = json.loads((tmp_path / "peer.json").read_text())
    assert saved["ratios"] and saved["prompt_tokens"]["per_request"] == {"peer": 6300.0, "exact": 4000.0}
    assert json.loads(capsys.readouterr().out)["targets"] == saved["targets"]
    assert (tmp_path / "peer.png").stat().st_size > 10_000


def test_refuses_without_a_gpu_in_one_line_exit_2(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the refusal is for machines without one")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SR3D_")}
    r = subprocess.run([sys.executable, "-m", "service.cli", "bench", "peer", "--duration", "1", "--out",
                        str(tmp_path / "out")], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("bench peer:")]
    assert len(lines) == 1 and lines[0].startswith("bench peer: needs a CUDA GPU: "), r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    bench_peer.add_arguments(p)
    for argv in (["--parts", "peer,nosuch"], ["--parts", "peer,peer"], ["--concurrency", "0"],
                 ["--exact-config", "nosuch"]):
        assert bench_peer.run(p.parse_args(argv)) == 2
        assert capsys.readouterr().err.startswith("bench peer: ")


@pytest.mark.timeout(400)
def test_our_part_through_bench_pipelines_machinery_on_cpu(tmp_path: Path) -> None:
    """`run_ours` for real (redis-server, gateway, worker with the tiny demo models on the CPU): the levels carry
    this bench's numbers (p95, prompt tokens from each job's usage) next to bench_pipeline's stage breakdown."""
    p = argparse.ArgumentParser()
    bench_peer.add_arguments(p)
    args = p.parse_args(["--concurrency", "2", "--duration", "2", "--num-frames", "2", "--max-tokens", "3",
                         "--warmup", "1", "--work-dir", str(tmp_path)])
    pargs = bench_peer.pipeline_args(args, tmp_path, cpu=True)
    pargs.worker_concurrency = 2
    common = bench_peer.bench_pipeline.common_env(pargs, tmp_path, 2)
    load = bench_peer.bench_pipeline.make_load(pargs, tmp_path)
    part = bench_peer.run_ours(args, pargs, "exact", "multiview", common, [2], load, tmp_path)
    assert part["problems"] == [], part["problems"]
    assert part["name"] == "exact" and part["env"]["SR3D_POINTMAP_BACKEND"] == "auto"
    (lv,) = part["levels"]
    assert lv["users"] == 2 and lv["done"] >= 1 and lv["done"] == lv["requests"] and lv["req_per_s"] > 0
    assert lv["ttft_s"]["n"] == lv["done"] and lv["ttft_s"]["p95"] >= lv["ttft_s"]["p50"] > 0
    assert lv["e2e_s"]["p95"] >= lv["e2e_s"]["p50"] >= lv["ttft_s"]["p50"]
    assert lv["prompt_tokens"]["n"] == lv["done"] and lv["prompt_tokens"]["mean"] > 10
    assert lv["prompt_tokens_per_s"] == pytest.approx(lv["prompt_tokens"]["mean"] * lv["done"] / lv["duration_s"], rel=0.01)
    assert lv["stages"]["decode_s"]["n"] == lv["done"]  # bench_pipeline's breakdown kept
    ol = part["open_loop"]
    assert ol["offered_req_per_s"] == round(lv["req_per_s"] * 0.5, 3) and ol["done"] >= 1
    # the same request shape (the question varies by a few tokens)
    assert ol["prompt_tokens"]["mean"] == pytest.approx(lv["prompt_tokens"]["mean"], rel=0.05)


@pytest.mark.timeout(500)
def test_budget_skips_a_part_and_resume_completes_the_report(tmp_path: Path) -> None:
    """The run's orchestration for real with our parts on the CPU (`--cpu`): a part that would not fit --budget-s
    is skipped and named (exit 1), and the same command with --resume runs only that part, keeping the first."""
    p = argparse.ArgumentParser()
    bench_peer.add_arguments(p)
    work, out = tmp_path / "work", tmp_path / "out"
    # each part needs ~39 s by the estimate (no start time, 2 s levels); the first one takes > 6 s of the 45
    base = ["--cpu", "--parts", "exact,fast", "--exact-config", "multiview",
            "--fast-config", "small:SR3D_POINTMAP_BACKEND=auto,SR3D_MULTIVIEW_PROCESS_RES=56", "--concurrency", "2",
            "--duration", "2", "--num-frames", "2", "--max-tokens", "3", "--warmup", "1", "--start-estimate-s", "0",
            "--work-dir", str(work), "--out", str(out)]
    # the clip is built once per work dir; built here so that the first part's budget check comes within a second
    # of the start (each part then takes > 7 s: a stack start plus 2 x 2 s of load, so the second cannot fit)
    work.mkdir()
    bench_peer.bench_pipeline.tum_clip(work / "tum-640x480.mp4")
    assert bench_peer.run(p.parse_args([*base, "--budget-s", "45"])) == 1
    first = json.loads((out / "peer.json").read_text())
    assert list(first["parts"]) == ["exact"] and [s["part"] for s in first["skipped"]] == ["fast"], first["skipped"]
    assert first["problems"] == [first["skipped"][0]["why"]] and first["ok"] is False, first["problems"]
    assert first["skipped"][0]["why"].startswith("fast skipped: needs ~39 s")
    assert first["parts"]["exact"]["levels"][0]["done"] >= 1
    assert bench_peer.run(p.parse_args([*base, "--budget-s", "400", "--resume"])) == 0
    final = json.loads((out / "peer.json").read_text())
    assert final["ok"], final["problems"]
    assert list(final["parts"]) == ["exact", "fast"] and final["skipped"] == [] and len(final["calls"]) == 2
    assert final["parts"]["exact"]["call"] == 0 and final["parts"]["fast"]["call"] == 1
    assert final["parts"]["exact"]["levels"] == first["parts"]["exact"]["levels"]  # kept, not re-measured
    assert final["parts"]["fast"]["env"]["SR3D_MULTIVIEW_PROCESS_RES"] == "56"
    assert final["prompt_tokens"]["per_request"]["fast"] > 10 and (out / "peer.png").stat().st_size > 10_000
    # the peer and the engine need CUDA: --cpu refuses them
    assert bench_peer.run(p.parse_args([*base, "--parts", "peer,exact"])) == 2
