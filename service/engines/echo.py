"""EchoEngine: a real `Engine` that streams a fixed answer without a model.

It exists to take the model out of the path while every other part stays the production code:
`sr3d bench queue` measures what the service itself costs (gateway, Redis queue, worker, SSE) with
it, and worker tests use it for answers of a known length and pace. It is constructed in-process by
whoever needs it and deliberately not selectable through SR3D_ENGINE (`make_engine` never returns
it), so no deployment can serve it by accident.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from model.inputs import TokenDelta
from service.engines.protocol import EngineRequest

ANSWER_WORDS = ("The", " region", " is", " about", " one", " metre", " away", ".")


class EchoEngine:
    name = "echo"

    def __init__(self, token_delay_s: float = 0.0, first_token_delay_s: float = 0.0) -> None:
        self.token_delay_s = token_delay_s
        # A GPU's time to first token (prefill and its queue): keeps as many jobs in flight as a real
        # deployment at the same request rate, which is what the gateway's and Redis's costs depend on.
        self.first_token_delay_s = first_token_delay_s
        self.ready = False
        self._aborted: set[str] = set()

    async def start(self) -> None:
        self.ready = True

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        n = max(1, request.params.max_tokens)
        prompt = len(request.query.question.split())
        if self.first_token_delay_s:
            await asyncio.sleep(self.first_token_delay_s)
        for i in range(n):
            if request.request_id in self._aborted:
                self._aborted.discard(request.request_id)
                yield TokenDelta("", [], True, "abort", prompt, i)
                return
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            else:
                await asyncio.sleep(0)  # yield to the loop like a real engine's queue hand-off
            last = i == n - 1
            yield TokenDelta(ANSWER_WORDS[i % len(ANSWER_WORDS)], [i], last, "length" if last else None, prompt, i + 1)

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    async def close(self) -> None:
        self.ready = False
