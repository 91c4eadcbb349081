"""The one engine protocol the worker speaks. Engines: `torch` (embedded default), `vllm` (GPU)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from model.inputs import GenerationParams, SpatialQuery, TokenDelta


class EngineError(RuntimeError):
    """An engine failed (device, model or runtime; not the caller's input). The worker does not
    report it as the client's error: the job is left for redelivery."""


@dataclass
class EngineRequest:
    request_id: str
    query: SpatialQuery
    params: GenerationParams


@runtime_checkable
class Engine(Protocol):
    name: str
    region_mode: str  # "embedding" | "marks", known once started (model/marks.py)

    async def start(self) -> None:
        """Load weights and run one warm-up generation; readiness depends on it."""

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        """Stream deltas; the last one has finished=True and the usage counts."""

    async def abort(self, request_id: str) -> None:
        """Stop generating for this request; its stream ends with finish_reason="abort"."""

    async def close(self) -> None: ...


def warmup_query() -> SpatialQuery:
    """A one-tile image with no regions and no point map: exercises vision, projector and decode."""
    frame = np.full((1, 448, 448, 3), 127, dtype=np.uint8)
    return SpatialQuery(frames=frame, question="Describe the scene.", is_video=False)


async def warm_up(engine: Engine) -> None:
    """One short generation: readiness means the whole path ran once, not just that weights loaded."""
    request = EngineRequest("warmup", warmup_query(), GenerationParams(max_tokens=2, ignore_eos=True))
    async for _ in engine.generate(request):
        pass
