"""Issue 15's levers are settings that reach the code they steer, and the exact path stays the default.

- SR3D_VLLM_QUANTIZATION: absent from vLLM's engine args by default (the checkpoint's dtype), `fp8` when set;
  the fp8 error tool's requests are valid service inputs and its comparison counts what it says.
- SR3D_DEPTH_ATTENTION: selects DA-V2's backbone kernel (torch's SDPA is called, or not at all), and both give
  the same point maps on the TUM fixture frames in float32 (same maths).
- SR3D_DEPTH_INPUT_SIZE / SR3D_MULTIVIEW_PROCESS_RES / SR3D_DEPTH_COMPILE / SR3D_DEPTH_BATCH_*: reach the
  backends and the batcher the worker builds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from loadtests.depth_error import compare as depth_compare
from loadtests.depth_error import spread_weights, tum_frames
from service.settings import Settings, VLLMSettings


def test_quantization_setting_defaults_to_the_exact_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="vllm (extra `vllm`) is not installed")
    from service.engines.vllm_engine import VLLMEngine

    assert "quantization" not in VLLMEngine(Settings(data_dir=tmp_path)).engine_args(tmp_path)
    monkeypatch.setenv("SR3D_VLLM_QUANTIZATION", "fp8")
    assert VLLMEngine(Settings(data_dir=tmp_path)).engine_args(tmp_path)["quantization"] == "fp8"
    monkeypatch.setenv("SR3D_VLLM_QUANTIZATION", "int3")
    with pytest.raises(ValidationError):
        VLLMSettings()


def test_quant_error_requests_are_valid_inputs_and_compare_counts(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="vllm (extra `vllm`) is not installed")
    from transformers import AutoTokenizer

    from loadtests.quant_error import compare, requests
    from model.config import config_from_dict
    from service.engines.vllm_engine import VLLMEngine, resolve_flat_checkpoint

    flat = resolve_flat_checkpoint(str(tiny_checkpoint), tmp_path)
    eng = VLLMEngine(Settings(model=str(tiny_checkpoint), data_dir=tmp_path))
    eng.config = config_from_dict(json.loads((flat / "config.json").read_text()))
    eng.tokenizer = AutoTokenizer.from_pretrained(str(flat))
    eng.region_mode = "embedding"
    for name, q in requests().items():
        prompt, n = eng.build_inputs(q, 32)
        assert n > len(q.question) // 8 and "image" in prompt["multi_modal_data"], name
    ref = {"tokens": [1, 2, 3, 4], "logprobs": [{"1": -0.1, "9": -3.0}, {"2": -0.2}, {"3": -0.3}, {"4": -0.4}]}
    got = {"tokens": [1, 2, 7, 4], "logprobs": [{"1": -0.15, "9": -2.0}, {"2": -0.2}, {"7": -0.2, "3": -0.5}, {"4": -9.0}]}
    r = compare(ref, got)
    # 3 of 4 tokens agree; the first difference is at position 2; errors only up to and including it
    assert (r["token_agreement"], r["prefix_match"]) == (0.75, 2)
    assert r["max_logprob_error"] == 1.0 and r["mean_logprob_error"] == pytest.approx((0.05 + 1.0 + 0 + 0.2) / 4, abs=1e-5)


def _sdpa_calls(backend, frames: np.ndarray, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    pm = backend.compute(frames)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", real)
    return pm, len(calls)


def test_depth_attention_selects_the_kernel_and_keeps_the_maps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from model.geometry import DepthAnythingBackend
    from model.geometry.depth_anything import build_tiny_depth_model

    d = tmp_path / "dav2"
    build_tiny_depth_model(str(d), input_size=112)
    spread_weights(d)  # a non-constant output, so equal maps mean something
    frames = tum_frames(2)[:, ::4, ::4].copy()  # 120 x 160: quick on CPU
    eager = DepthAnythingBackend(str(d), device="cpu", attention="eager")
    sdpa = DepthAnythingBackend(str(d), device="cpu", attention="sdpa")
    pm_e, n_e = _sdpa_calls(eager, frames, monkeypatch)
    pm_s, n_s = _sdpa_calls(sdpa, frames, monkeypatch)
    assert n_e == 0 and n_s >= 4  # 4 backbone layers: the fused kernel only when asked for
    assert float(pm_e.points[pm_e.valid][:, 2].std()) > 1e-3  # the maps are not flat
    err = depth_compare(pm_s, pm_e)
    assert err["valid_mismatch"] < 1e-3 and err["point_error"]["p90"] < 1e-4, err
    smaller = DepthAnythingBackend(str(d), device="cpu", input_size=56).compute(frames)
    assert depth_compare(smaller, pm_e)["point_error"]["mean"] > 1e-3  # the lossy lever is visible
    with pytest.raises(ValueError):
        DepthAnythingBackend(str(d), device="cpu", attention="flash")


def test_depth_settings_reach_the_worker_backends_and_batcher(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from service.pipeline import Pipeline, make_pointmap_backend

    for k, v in {"SR3D_DEPTH_INPUT_SIZE": "56", "SR3D_MULTIVIEW_PROCESS_RES": "112", "SR3D_DEPTH_ATTENTION": "eager",
                 "SR3D_DEPTH_BATCH_JOBS": "3", "SR3D_DEPTH_BATCH_FRAMES": "40", "SR3D_DEVICE": "cpu"}.items():
        monkeypatch.setenv(k, v)
    s = Settings(data_dir=tmp_path)
    backends = make_pointmap_backend(s)
    single, multi = backends.get("single"), backends.get("multiview")
    assert single._size == {"height": 56, "width": 56} and single.attention == "eager"
    assert single.model.backbone.config._attn_implementation == "eager"
    assert multi.process_res == 112
    batcher = Pipeline(s, blobs=None, backend=backends)._batcher(single)  # type: ignore[arg-type]
    assert (batcher.max_jobs, batcher.max_frames) == (3, 40)
    for k in ("SR3D_DEPTH_INPUT_SIZE", "SR3D_MULTIVIEW_PROCESS_RES", "SR3D_DEPTH_ATTENTION"):
        monkeypatch.delenv(k)
    d = Settings(data_dir=tmp_path)  # the defaults are the exact path
    assert (d.depth_input_size, d.multiview_process_res, d.depth_attention, d.depth_compile) == (None, 504, "sdpa", False)
    assert backends.get("single").model._compiled_call_impl is None
    monkeypatch.setenv("SR3D_DEPTH_COMPILE", "1")  # compiled lazily: the first call compiles, not the build
    compiled = make_pointmap_backend(Settings(data_dir=tmp_path))
    assert compiled.get("single").model._compiled_call_impl is not None
    assert compiled.get("multiview").net.backbone.pretrained._compiled_call_impl is not None
