"""Issue 14 item 5: one row's failure inside a TorchEngine batch fails that row only (tiny real
checkpoint, real batching); plus the one input/infrastructure split rule (item 6)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from model.errors import ModelInputError
from model.inputs import GenerationParams
from model.geometry import SceneError
from service.engines.protocol import EngineRequest
from service.engines.torch_engine import EngineError, TorchEngine
from service.errors import is_input_error
from service.media.limits import MediaError
from tests.test_worker_engine import _batch_histogram, _collect, _image_query, _video_query, tiny_ckpt  # noqa: F401

pytestmark = pytest.mark.timeout(240)


def test_bad_row_fails_alone_and_its_batch_neighbours_finish(tiny_ckpt: Path) -> None:  # noqa: F811
    good_a = EngineRequest("a", _video_query(0), GenerationParams(max_tokens=8))
    # Bypasses the schema floor on purpose: logits / 1e-300 overflow, softmax is NaN, multinomial raises.
    bad = EngineRequest("bad", _image_query(), GenerationParams(max_tokens=8, temperature=1e-300, seed=1))
    good_c = EngineRequest("c", _video_query(2), GenerationParams(max_tokens=6, temperature=0.8, seed=5))

    async def go() -> None:
        engine = TorchEngine(str(tiny_ckpt), device="cpu", max_batch=8, batch_window_s=0.3, warmup=False)
        await engine.start()
        try:
            solo = [await _collect(engine, r) for r in (good_a, good_c)]
            before = _batch_histogram()
            a, b, c = await asyncio.gather(*(_collect(engine, r) for r in (good_a, bad, good_c)), return_exceptions=True)
            after = _batch_histogram()
        finally:
            await engine.close()
        assert isinstance(b, EngineError) and "RuntimeError" in str(b), b
        for got, want in ((a, solo[0]), (c, solo[1])):
            assert not isinstance(got, BaseException), got
            assert [d.text for d in got] == [d.text for d in want] and got[-1].finished
        # One batch of 3 that failed, then the three rows alone.
        assert (after[0] - before[0], after[1] - before[1]) == (4, 6)

    asyncio.run(go())


def test_is_input_error_rule() -> None:
    assert is_input_error(MediaError("corrupt_media", "x"))
    assert is_input_error(SceneError("scene_too_large", "x"))
    assert is_input_error(ModelInputError("prompt_too_long", "x"))
    assert not is_input_error(ValueError("height must be > 0"))  # no code: a library's own complaint
    assert not is_input_error(RuntimeError("CUDA out of memory"))
    assert not is_input_error(EngineError("engine closed"))

    class Coded(RuntimeError):
        code = "x"

    assert not is_input_error(Coded())  # a code alone does not make an infrastructure error the client's
