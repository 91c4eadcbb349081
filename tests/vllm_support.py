"""The SR-3D vLLM model class built on CPU (shared by the plugin tests).

Without a GPU vLLM's platform is "unspecified" and has no attention backend to name when the Qwen2 layers
are *constructed*; FlexAttention's class is handed to it for that only (the LLM forward is not run on CPU).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch


@contextmanager
def cpu_vllm_model(checkpoint: Path, tmp: Path, mp: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    import vllm.model_executor.layers.attention.attention as attention
    from safetensors.torch import load_file
    from vllm.config import DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm.plugins import load_general_plugins
    from vllm.v1.attention.backends.flex_attention import FlexAttentionBackend

    from model.checkpoint import convert_to_flat

    torch.set_num_threads(1)
    flat = tmp / "flat"
    convert_to_flat(checkpoint, flat)
    load_general_plugins()
    mc = ModelConfig(model=str(flat), tokenizer=str(flat), max_model_len=4096, dtype="float32")
    vc = VllmConfig(model_config=mc, device_config=DeviceConfig("cpu"))
    mp.setattr(attention, "get_attn_backend", lambda *a, **k: FlexAttentionBackend)
    with set_current_vllm_config(vc):
        init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                     distributed_init_method=f"file://{tmp / 'dist'}", backend="gloo")
        initialize_model_parallel(1, 1)
        try:
            from model.vllm_plugin.modeling import SR3DForConditionalGeneration

            model = SR3DForConditionalGeneration(vllm_config=vc).eval()
            tensors = {}
            for shard in sorted(flat.glob("*.safetensors")):
                tensors.update(load_file(str(shard)))
            loaded = model.load_weights(tensors.items())
            yield {"model": model, "loaded": loaded, "model_config": mc, "flat": flat}
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()
