"""SR-3D as an out-of-tree vLLM 0.24 model (entry point group `vllm.general_plugins`).

vLLM calls `register()` in every process it starts (API process, engine core, workers and the
registry-inspection subprocess), so it must be idempotent, cheap and must not touch CUDA: it only
registers the config classes with transformers and the model class by its lazy "module:Class"
string, so nothing heavy is imported until vLLM actually builds the model.
"""
from __future__ import annotations

ARCHITECTURE = "SR3DForConditionalGeneration"
MODEL_CLASS = "model.vllm_plugin.modeling:SR3DForConditionalGeneration"
# NVILA checkpoints say `LlavaLlamaModel`; the flat layout we convert to says ARCHITECTURE.
NVILA_ARCHITECTURE = "LlavaLlamaModel"


def register() -> None:
    from model.config import register_configs

    register_configs()

    # `from vllm import ModelRegistry` fails inside the inspection subprocess on some versions.
    from vllm.model_executor.models import ModelRegistry

    for arch in (ARCHITECTURE, NVILA_ARCHITECTURE):
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, MODEL_CLASS)
