"""Engines behind `service.engines.protocol.Engine`: `torch` (embedded default) and `vllm` (GPU).

`make_engine` imports vLLM lazily: a torch-only install (CPU demo, CI) never imports it.
"""
from __future__ import annotations

from service.engines.protocol import Engine
from service.settings import WorkerSettings


def make_engine(settings: WorkerSettings) -> Engine:
    if settings.engine == "vllm":
        from service.engines.vllm_engine import VLLMEngine

        return VLLMEngine(settings)
    from service.engines.torch_engine import TorchEngine

    # A batch can never hold more than the jobs this worker runs at once.
    return TorchEngine(
        settings.model,
        data_dir=str(settings.data_dir),
        device=settings.device,
        dtype=settings.model_dtype,
        region_mode=settings.region_mode,
        max_batch=settings.worker_concurrency,
        batch_window_s=settings.torch_batch_window_ms / 1000.0,
    )
