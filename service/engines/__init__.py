"""Engines behind `service.engines.protocol.Engine`: `torch` (embedded default) and `vllm` (GPU).

`make_engine` imports vLLM lazily: a torch-only install (CPU demo, CI) never imports it.
"""
from __future__ import annotations

import os
from typing import Any

from service.engines.protocol import Engine


def make_engine(settings: Any) -> Engine:
    if settings.engine == "vllm":
        from service.engines.vllm_engine import VLLMEngine

        return VLLMEngine(settings)
    from service.engines.torch_engine import TorchEngine

    # Micro-batch knobs are engine internals, not service settings; env overrides for experiments.
    return TorchEngine(
        settings.model,
        data_dir=str(settings.data_dir),
        device=settings.device,
        max_batch=int(os.environ.get("SR3D_TORCH_MAX_BATCH", max(settings.worker_concurrency, 1))),
        batch_window_s=float(os.environ.get("SR3D_TORCH_BATCH_WINDOW_MS", "10")) / 1000.0,
    )
