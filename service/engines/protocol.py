"""The one engine protocol the worker speaks. Engines: `torch` (embedded default), `vllm` (GPU)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from model.inputs import GenerationParams, SpatialQuery, TokenDelta


@dataclass
class EngineRequest:
    request_id: str
    query: SpatialQuery
    params: GenerationParams


@runtime_checkable
class Engine(Protocol):
    name: str

    async def start(self) -> None:
        """Load weights and run one warm-up generation; readiness depends on it."""

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        """Stream deltas; the last one has finished=True and the usage counts."""

    async def abort(self, request_id: str) -> None:
        """Stop generating for this request; its stream ends with finish_reason="abort"."""

    async def close(self) -> None: ...
