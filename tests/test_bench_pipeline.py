"""`sr3d bench pipeline` (issue 15): its smallest configuration, run for real on the CPU.

A real stack per configuration (redis-server, `sr3d gateway`, `sr3d worker` with the tiny demo models) and
real jobs through HTTP + SSE: the report must hold, for both configurations, finished requests, every stage of
the breakdown taken from the jobs' own timings, the ratios of the second against the first, and the PNG. The
second configuration's depth input (56 px instead of the checkpoint's 518) must reach the worker: its point-map
stage is the one that changes. Speed is not asserted (a timed test proves nothing on a shared box)."""
from __future__ import annotations

import argparse
import json

import pytest

from loadtests import bench_pipeline
from loadtests.bench_pipeline import PRESETS, parse_config


def test_parse_config_presets_and_overrides() -> None:
    assert parse_config("baseline") == ("baseline", PRESETS["baseline"])
    name, env = parse_config("tuned:SR3D_DEPTH_INPUT_SIZE=518,SR3D_DEPTH_COMPILE=1")
    assert name == "tuned" and env["SR3D_VLLM_QUANTIZATION"] == "fp8" and env["SR3D_DEPTH_INPUT_SIZE"] == "518"
    assert env["SR3D_DEPTH_COMPILE"] == "1"
    assert parse_config("mine:SR3D_X=1") == ("mine", {"SR3D_X": "1"})
    assert parse_config("fast-mps")[1]["BENCH_MPS"] == "1" and parse_config("fast-small")[1]["BENCH_DA3"] == "da3-small"
    assert parse_config("m:SR3D_X=1,BENCH_MPS=1") == ("m", {"SR3D_X": "1", "BENCH_MPS": "1"})
    for bad in ("nosuch", "mine:X=1", "mine:SR3D_X", ":SR3D_X=1", "m:BENCH_OTHER=1"):
        with pytest.raises(ValueError):
            parse_config(bad)


def test_smallest_run_on_cpu(tmp_path) -> None:
    p = argparse.ArgumentParser()
    bench_pipeline.add_arguments(p)
    out = tmp_path / "out"
    args = p.parse_args(["--cpu", "--config", "baseline", "--config", "small:SR3D_POINTMAP_BACKEND=single,SR3D_DEPTH_INPUT_SIZE=56",
                         "--concurrency", "2", "--duration", "2", "--num-frames", "2", "--max-tokens", "3",
                         "--worker-concurrency", "2", "--warmup", "1", "--work-dir", str(tmp_path / "work"),
                         "--out", str(out)])
    assert bench_pipeline.run(args) == 0
    report = json.loads((out / "pipeline.json").read_text())
    assert report["ok"], report["problems"]
    assert (out / "pipeline.png").stat().st_size > 10_000
    assert [c["name"] for c in report["configs"]] == ["baseline", "small"]
    assert report["configs"][1]["env"]["SR3D_DEPTH_INPUT_SIZE"] == "56"
    assert "SR3D_DEPTH_INPUT_SIZE" not in report["configs"][0]["env"]
    for c in report["configs"]:
        (lv,) = c["levels"]
        assert lv["users"] == 2 and lv["done"] >= 1 and lv["req_per_s"] > 0
        st = lv["stages"]
        for stage in (*bench_pipeline.STAGES, "ttft_s", "e2e_s"):
            assert st[stage]["n"] == lv["done"] and st[stage]["p50"] is not None, stage
        assert st["pointmaps_backend"] == ["single"]
        # the engine's split of encode (the torch engine's parts), in the order time passes through them
        assert list(st["encode_parts"]) == ["encode_prepare_s", "encode_prefill_s"]
        assert st["encode_parts"]["encode_prepare_s"]["n"] == lv["done"]
        # the stages the worker timed fit inside what the client saw
        assert st["decode_s"]["p50"] + st["pointmaps_s"]["p50"] < st["e2e_s"]["max"]
        # the open-loop level: Poisson arrivals at half the best closed-loop rate, judged like the others
        ol = c["open_loop"]
        assert ol["offered_req_per_s"] == round(lv["req_per_s"] * 0.5, 3) and ol["fraction_of_best"] == 0.5
        assert ol["done"] >= 1 and ol["ok"] and ol["stages"]["e2e_s"]["n"] == ol["done"]
    (r,) = report["ratios"]
    assert r["config"] == "small" and r["vs"] == "baseline" and r["users"] == 2 and r["req_per_s"] > 0


def test_a_configuration_needing_what_is_missing_is_reported_and_the_run_goes_on(tmp_path) -> None:
    """BENCH_DA3 without --dummy-8b is refused for that configuration only (nothing started, no stack)."""
    p = argparse.ArgumentParser()
    bench_pipeline.add_arguments(p)
    args = p.parse_args(["--cpu"])
    load = bench_pipeline.Load(media=None, size=(64, 48), frames=2, num_frames=2, max_tokens=2)  # type: ignore[arg-type]
    out = bench_pipeline._run_config(args, "small", {"SR3D_POINTMAP_BACKEND": "auto", "BENCH_DA3": "da3-small"}, [1],
                                     load, tmp_path / "stack")
    assert out["levels"] == [] and out["env"]["BENCH_DA3"] == "da3-small"
    assert any("BENCH_DA3 needs --dummy-8b" in x for x in out["problems"]), out["problems"]
