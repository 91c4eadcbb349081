"""SR3D_MODEL_DTYPE (issue 28): the VLM's compute dtype is a setting that reaches both engines; `auto` is
NVIDIA's NVILA inference dtype (float16) on a GPU and float32 on a CPU (model/dtype.py)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from model.dtype import resolve_model_dtype
from service.settings import Settings


def test_auto_is_float16_on_a_gpu_and_float32_on_a_cpu() -> None:
    assert resolve_model_dtype("auto", "cuda") is torch.float16
    assert resolve_model_dtype("auto", "cuda:1") is torch.float16
    assert resolve_model_dtype("auto", "cpu") is torch.float32
    assert resolve_model_dtype("bfloat16", "cuda") is torch.bfloat16
    assert resolve_model_dtype("float16", "cpu") is torch.float16
    with pytest.raises(ValueError):
        resolve_model_dtype("int8", "cuda")


def test_setting_is_validated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).model_dtype == "auto"
    monkeypatch.setenv("SR3D_MODEL_DTYPE", "bfloat16")
    assert Settings(data_dir=tmp_path).model_dtype == "bfloat16"
    monkeypatch.setenv("SR3D_MODEL_DTYPE", "fp8")
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path)


def test_torch_engine_loads_in_the_setting(monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from service.engines import make_engine

    monkeypatch.setenv("SR3D_MODEL_DTYPE", "float16")
    engine = make_engine(Settings(model=str(tiny_checkpoint), data_dir=tmp_path, device="cpu"))

    async def run() -> torch.dtype:
        engine.warmup = False
        await engine.start()
        try:
            return engine.model.dtype  # type: ignore[attr-defined]
        finally:
            await engine.close()

    assert asyncio.run(run()) is torch.float16


def test_vllm_engine_args_follow_the_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="vllm (extra `vllm`) is not installed")
    from service.engines.vllm_engine import VLLMEngine

    assert VLLMEngine(Settings(data_dir=tmp_path)).engine_args(tmp_path)["dtype"] == "float16"  # NVIDIA's
    monkeypatch.setenv("SR3D_MODEL_DTYPE", "bfloat16")
    assert VLLMEngine(Settings(data_dir=tmp_path)).engine_args(tmp_path)["dtype"] == "bfloat16"
    monkeypatch.setenv("SR3D_VLLM_DTYPE", "float32")  # vLLM's own knob, when set, wins
    assert VLLMEngine(Settings(data_dir=tmp_path)).engine_args(tmp_path)["dtype"] == "float32"
