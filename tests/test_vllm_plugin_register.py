"""The SR-3D vLLM plugin registers through the real `vllm.general_plugins` entry point (CPU, vllm 0.24)."""
from __future__ import annotations

from importlib.metadata import entry_points

import pytest

pytest.importorskip("vllm", reason="vllm (extra `vllm`) is not installed: the plugin cannot be exercised")
pytestmark = pytest.mark.vllm


def test_entry_point_is_installed() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("sr3d") == "model.vllm_plugin:register"


def test_load_general_plugins_registers_architectures_and_configs() -> None:
    from transformers import AutoConfig
    from vllm.model_executor.models import ModelRegistry
    from vllm.plugins import load_general_plugins

    from model.config import NVILAConfig, SR3DConfig
    from model.vllm_plugin import register

    load_general_plugins()
    archs = ModelRegistry.get_supported_archs()
    assert "SR3DForConditionalGeneration" in archs
    assert "LlavaLlamaModel" in archs
    assert type(AutoConfig.for_model("sr3d")) is SR3DConfig
    assert type(AutoConfig.for_model("llava_llama")) is NVILAConfig
    before = ModelRegistry.models["SR3DForConditionalGeneration"]
    register()  # vLLM calls it in every process: a second call must be a no-op, not an error or a re-register
    assert ModelRegistry.models["SR3DForConditionalGeneration"] is before
