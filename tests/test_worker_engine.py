"""TorchEngine over the tiny real checkpoint: micro-batching, streaming, abort, input errors."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from model.errors import ModelInputError
from model.inputs import GenerationParams, RegionMask, SpatialQuery, TokenDelta
from service import metrics
from service.engines.protocol import Engine, EngineRequest
from service.engines.torch_engine import TorchEngine, ensure_tiny_checkpoint

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("engine-data"))


def _video_query(seed: int = 0) -> SpatialQuery:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 255, (4, 180, 320, 3), dtype=np.uint8)
    mask = np.zeros((180, 320), bool)
    mask[30:150, 120:170] = True
    return SpatialQuery(frames=frames, question="How far is <region0> from the camera?", regions=[[RegionMask(0, mask)]], is_video=True)


def _image_query() -> SpatialQuery:
    frames = np.random.default_rng(1).integers(0, 255, (1, 300, 900, 3), dtype=np.uint8)  # 3x1 tiles + thumbnail
    return SpatialQuery(frames=frames, question="What is in the picture?", is_video=False)


async def _collect(engine: Engine, req: EngineRequest) -> list[TokenDelta]:
    return [d async for d in engine.generate(req)]


def _batch_histogram() -> tuple[float, float]:
    count = sum(s.value for m in metrics.BATCH_SIZE.collect() for s in m.samples if s.name.endswith("_count"))
    total = sum(s.value for m in metrics.BATCH_SIZE.collect() for s in m.samples if s.name.endswith("_sum"))
    return count, total


def test_concurrent_requests_share_one_batch_and_match_solo_runs(tiny_ckpt: Path) -> None:
    reqs = [
        EngineRequest("a", _video_query(0), GenerationParams(max_tokens=12)),
        EngineRequest("b", _image_query(), GenerationParams(max_tokens=7)),
        EngineRequest("c", _video_query(2), GenerationParams(max_tokens=9, temperature=0.8, seed=5)),
    ]

    async def go() -> None:
        engine = TorchEngine(str(tiny_ckpt), device="cpu", max_batch=8, batch_window_s=0.2)
        await engine.start()
        assert engine.ready
        try:
            solo = [await _collect(engine, r) for r in reqs]
            before = _batch_histogram()
            together = await asyncio.gather(*(_collect(engine, r) for r in reqs))
            after = _batch_histogram()
        finally:
            await engine.close()
        assert (after[0] - before[0], after[1] - before[1]) == (1, 3)  # one generate call with 3 rows
        for r, s, t in zip(reqs, solo, together):
            assert [d.text for d in s] == [d.text for d in t]
            final = t[-1]
            assert final.finished and final.finish_reason in ("stop", "length")
            assert not any(d.finished for d in t[:-1])
            assert final.completion_tokens == sum(len(d.token_ids) for d in t) <= r.params.max_tokens
            assert final.prompt_tokens > 121

    asyncio.run(go())


def test_abort_stops_only_that_request(tiny_ckpt: Path) -> None:
    async def go() -> None:
        engine = TorchEngine(str(tiny_ckpt), device="cpu", batch_window_s=0.2, warmup=False)
        await engine.start()
        try:
            long = EngineRequest("long", _video_query(0), GenerationParams(max_tokens=300, ignore_eos=True))
            victim = EngineRequest("victim", _video_query(1), GenerationParams(max_tokens=300, ignore_eos=True))

            async def abort_after_first() -> list[TokenDelta]:
                out = []
                async for d in engine.generate(victim):
                    out.append(d)
                    if len(out) == 1:
                        await engine.abort("victim")
                return out

            full, cut = await asyncio.gather(_collect(engine, long), abort_after_first())
        finally:
            await engine.close()
        assert full[-1].finish_reason == "length" and full[-1].completion_tokens == 300
        assert cut[-1].finish_reason == "abort" and cut[-1].completion_tokens < 300

    asyncio.run(go())


def test_bad_input_raises_model_input_error_and_engine_keeps_serving(tiny_ckpt: Path) -> None:
    async def go() -> None:
        engine = TorchEngine(str(tiny_ckpt), device="cpu", warmup=False)
        await engine.start()
        try:
            q = _video_query(0)
            q.question = "Is <region1> left of <region0>?"  # only one region given
            with pytest.raises(ModelInputError) as e:
                await _collect(engine, EngineRequest("bad", q, GenerationParams(max_tokens=4)))
            assert e.value.code == "region_out_of_range"
            ok = await _collect(engine, EngineRequest("ok", _video_query(0), GenerationParams(max_tokens=4)))
            assert ok[-1].finished and ok[-1].completion_tokens >= 1
        finally:
            await engine.close()

    asyncio.run(go())


def test_tiny_checkpoint_is_built_once(tmp_path: Path) -> None:
    first = ensure_tiny_checkpoint(tmp_path)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert ensure_tiny_checkpoint(tmp_path) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
