"""VLLMEngine's CPU side (no engine start): checkpoint resolution and what it sends to vLLM per request."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vllm (extra `vllm`) is not installed: the vLLM engine cannot be exercised")
pytestmark = pytest.mark.vllm

from model.inputs import GenerationParams, RegionMask, SpatialQuery  # noqa: E402
from service.settings import Settings  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    import json

    from transformers import AutoTokenizer

    from model.config import config_from_dict
    from model.prompt import stop_token_ids
    from service.engines.vllm_engine import VLLMEngine, resolve_flat_checkpoint

    data = tmp_path_factory.mktemp("vllm-data")
    flat = resolve_flat_checkpoint(str(tiny_checkpoint), data)
    assert resolve_flat_checkpoint(str(tiny_checkpoint), data) == flat  # converted once, then reused
    assert resolve_flat_checkpoint(str(flat), data) == flat  # a flat dir is used as is
    eng = VLLMEngine(Settings(model=str(tiny_checkpoint), data_dir=data))
    eng.config = config_from_dict(json.loads((flat / "config.json").read_text()))
    eng.tokenizer = AutoTokenizer.from_pretrained(str(flat))
    eng._stop_ids = stop_token_ids(eng.tokenizer)
    eng.region_mode = "embedding"  # the tiny demo carries (random) SR-3D region modules
    return eng


def _query(question: str, boxes: list[tuple[int, int]], key: str | None = "clip-1") -> SpatialQuery:
    frames = np.zeros((4, 64, 96, 3), np.uint8)
    regions = []
    for frame, x in boxes:
        m = np.zeros((64, 96), bool)
        m[10:30, x:x + 20] = True
        regions.append([RegionMask(frame, m)])
    return SpatialQuery(frames, question, regions, is_video=True, media_key=key)


def test_prompt_and_uuid(engine) -> None:  # type: ignore[no-untyped-def]
    a, n = engine.build_inputs(_query("Is <region1> left of <region0>?", [(0, 10), (2, 50)]))
    ids = a["prompt_token_ids"]
    image_id = engine.tokenizer.convert_tokens_to_ids("<image>")
    region_id = engine.tokenizer.convert_tokens_to_ids("<region>")
    assert ids.count(image_id) == 4 and ids.count(region_id) == 2
    assert ids.index(image_id) < ids.index(region_id)  # visual prefix first (prefix caching)
    assert a["multi_modal_data"]["image"]["region_order"] == [1, 0]
    assert n == len(ids) + 4 * 121  # expanded length: each <image> -> 121 slots + newline
    (uuid,) = a["multi_modal_uuids"]["image"]
    assert uuid.startswith("clip-1/")
    # same media + same regions + same slot order -> same uuid (a second question reuses the caches)
    b, _ = engine.build_inputs(_query("Which is closer, <region1> or <region0>?", [(0, 10), (2, 50)]))
    assert b["multi_modal_uuids"]["image"] == [uuid]
    # a different slot order or different masks change the item's embeddings -> a different uuid
    c, _ = engine.build_inputs(_query("Is <region0> left of <region1>?", [(0, 10), (2, 50)]))
    d, _ = engine.build_inputs(_query("Is <region1> left of <region0>?", [(0, 12), (2, 50)]))
    assert len({uuid, c["multi_modal_uuids"]["image"][0], d["multi_modal_uuids"]["image"][0]}) == 3
    e, _ = engine.build_inputs(_query("Describe.", [], key=None))
    assert "multi_modal_uuids" not in e  # no media key: vLLM hashes the item's content
    # the item is prepared here (engine's pool), compact: uint8 tiles, geometry reduced per patch
    item = a["multi_modal_data"]["image"]
    assert item["tiles"].shape == (4, 448, 448, 3) and item["tiles"].dtype == np.uint8
    assert item["patch_points"].shape == (4, 1024, 3) and item["region_cov"].shape == (2 * 4, 32, 32)
    # an item vLLM's processor cache holds is sent as a header: no pixel work, same layout
    seen: list[str] = []
    f, n2 = engine.build_inputs(_query("Where is <region1>, left of <region0>?", [(0, 10), (2, 50)]),
                                is_cached=lambda u: seen.append(u) or True)
    assert seen == [uuid] and "tiles" not in f["multi_modal_data"]["image"]
    assert f["multi_modal_data"]["image"]["num_tiles"] == 4 and f["multi_modal_data"]["image"]["region_order"] == [1, 0]


def test_bad_input_fails_before_vllm(engine) -> None:  # type: ignore[no-untyped-def]
    from model.errors import ModelInputError

    with pytest.raises(ModelInputError) as e:
        engine.build_inputs(_query("Where is <region3>?", [(0, 10)]))
    assert e.value.code == "region_out_of_range"
    with pytest.raises(ModelInputError) as e:
        engine.build_inputs(_query("Where is <image> here?", []))
    assert e.value.code == "placeholder_in_question"
    with pytest.raises(ModelInputError) as e:  # the context cap is checked before any pixel work
        engine.build_inputs(_query("Where?", []), max_tokens=10**6)
    assert e.value.code == "prompt_too_long"


def test_sampling_params_follow_the_core_stop_rule(engine) -> None:  # type: ignore[no-untyped-def]
    from vllm.sampling_params import RequestOutputKind

    sp = engine.sampling_params(GenerationParams(max_tokens=7, temperature=0.0))
    assert sp.output_kind == RequestOutputKind.DELTA and sp.max_tokens == 7
    assert engine.tokenizer.convert_tokens_to_ids("<|im_end|>") in sp.stop_token_ids
    assert engine.sampling_params(GenerationParams(ignore_eos=True)).stop_token_ids == []


def test_first_token_parts_split_the_time_to_first_token() -> None:
    """The engine-core timestamps (CLOCK_MONOTONIC, shared across processes) split encode into parts that add
    up to it; without them (stats off) only our own parts are reported, never a negative or invented one."""
    from vllm.v1.metrics.stats import RequestStateStats

    from service.engines.vllm_engine import first_token_parts

    stats = RequestStateStats(queued_ts=10.5, scheduled_ts=10.75, first_token_ts=11.0)
    parts = first_token_parts(10.0, 10.25, 10.375, stats, 11.125)
    assert parts == {"prepare": 0.25, "render": 0.125, "submit": 0.125, "wait": 0.25, "prefill": 0.25, "deliver": 0.125}
    assert sum(parts.values()) == pytest.approx(11.125 - 10.0)
    assert first_token_parts(10.0, 10.25, 10.375, RequestStateStats(), 11.0) == {"prepare": 0.25, "render": 0.125}
    assert first_token_parts(10.0, 10.25, 10.375, None, 11.0) == {"prepare": 0.25, "render": 0.125}
