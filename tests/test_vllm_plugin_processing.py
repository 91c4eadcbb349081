"""The SR-3D processor inside the real vLLM 0.24 multimodal pipeline (CPU): layout, fields, caches, dummy path.

The reference is the model core on the same tiny checkpoint: vLLM's expanded prompt must be the core's
`prepare(query).input_ids`, its embedding slots the core's image + region slots, and its tensors the core's
tiling (pixels) and geometry reductions (patch points, mask coverage).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("vllm", reason="vllm (extra `vllm`) is not installed: the plugin cannot be exercised")
pytestmark = pytest.mark.vllm

from model.errors import ModelInputError  # noqa: E402
from model.inputs import RegionMask, SpatialQuery  # noqa: E402
from model.pos3d import pool_points_to_patches  # noqa: E402
from model.tiling import normalize_pixels  # noqa: E402

MAX_MODEL_LEN = 4096


@pytest.fixture(scope="module")
def vllm_ctx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from vllm.config import ModelConfig
    from vllm.plugins import load_general_plugins

    from model.checkpoint import convert_to_flat

    torch.set_num_threads(1)
    flat = tmp_path_factory.mktemp("tiny-flat") / "flat"
    convert_to_flat(tiny_checkpoint, flat)
    load_general_plugins()  # a directly built ModelConfig does not load plugins itself
    mc = ModelConfig(model=str(flat), tokenizer=str(flat), max_model_len=MAX_MODEL_LEN, dtype="float32", mm_processor_cache_gb=1)
    return {"model_config": mc, "flat": flat}


def make_processor(ctx: dict[str, Any], cache: str | None):  # type: ignore[no-untyped-def]
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.cache import MultiModalProcessorOnlyCache, MultiModalProcessorSenderCache

    mc = ctx["model_config"]
    c = {None: None, "processor": MultiModalProcessorOnlyCache, "sender": MultiModalProcessorSenderCache}[cache]
    return MULTIMODAL_REGISTRY.create_processor(mc, cache=c(mc) if c else None)


def run(proc, query: SpatialQuery, uuid: str | None = None, header: bool = False):  # type: ignore[no-untyped-def]
    """What the VLLMEngine sends: the core's unexpanded prompt ids + one prepared SR-3D item (or, for an item
    the processor cache holds, its header)."""
    from vllm.multimodal.processing import ProcessorInputs, TimingContext

    from model.prompt import layout_query
    from model.vllm_plugin.processing import header_item, prepare_item

    cfg, tok = proc.info.get_hf_config(), proc.info.get_tokenizer()
    _, layout = layout_query(query, tok, cfg, context=1 << 20)
    make = header_item if header else prepare_item
    items = proc.info.parse_mm_data({"image": make(query, layout.region_order, cfg)})
    uuids = {"image": [uuid]} if uuid else None
    return proc.apply(ProcessorInputs(layout.input_ids, items, uuids), TimingContext(enabled=False))


def _mask(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((h, w), bool)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = True
    return m


def queries() -> dict[str, SpatialQuery]:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1, 300, 760, 3), dtype=np.uint8)  # a wide image: several tiles + thumbnail
    vid = rng.integers(0, 256, (4, 120, 160, 3), dtype=np.uint8)
    pts = rng.normal(size=(4, 120, 160, 3)).astype(np.float32)
    valid = rng.random((4, 120, 160)) > 0.3
    return {
        "image_1_region": SpatialQuery(img, "What is <region0>?", [[RegionMask(0, _mask(300, 760, (50, 150, 400, 700)))]]),
        "video_3_slots_3d": SpatialQuery(
            vid,
            "Is <region1> left of <region0>? And <region1>?",
            [[RegionMask(0, _mask(120, 160, (10, 40, 10, 60)))],
             [RegionMask(1, _mask(120, 160, (60, 100, 90, 150))), RegionMask(3, _mask(120, 160, (0, 30, 0, 30)))]],
            pointmaps=pts, pointmap_valid=valid, is_video=True,
        ),
        "image_no_region": SpatialQuery(img[:, :200, :200], "Describe the scene."),
    }


@pytest.mark.parametrize("name", list(queries()))
def test_layout_and_fields_match_the_model_core(vllm_ctx, tiny_model, name: str) -> None:  # type: ignore[no-untyped-def]
    q = queries()[name]
    proc = make_processor(vllm_ctx, cache=None)
    out = run(proc, q)
    ref = tiny_model.prepare(q)

    assert out["prompt_token_ids"] == ref.input_ids  # same final layout as the torch engine
    (ph,) = out["mm_placeholders"]["image"]
    lay = ref.layout
    region_pos = [i for i, t in enumerate(ref.input_ids) if t == lay.region_token_id]
    slots = sorted(ref.image_positions + region_pos)
    embed_pos = (torch.nonzero(ph.is_embed).flatten() + ph.offset).tolist()
    assert embed_pos == slots
    assert ph.offset == ref.image_positions[0] and ph.offset + ph.length == slots[-1] + 1
    assert ph.get_num_embeds() == ref.tiled.num_tiles * tiny_model.config.tokens_per_tile + len(lay.region_order)

    item = out["mm_kwargs"]["image"][0]
    data = {k: v.data for k, v in item.items()}
    t = ref.tiled.num_tiles
    assert int(data["num_tiles"]) == t and int(data["num_slots"]) == len(lay.region_order)
    assert data["grid"].tolist() == [*ref.tiled.grids[0][:2], int(ref.tiled.grids[0][2])]
    assert data["tiles"].dtype == torch.uint8  # a quarter of float32's bytes; normalised on the device
    torch.testing.assert_close(normalize_pixels(data["tiles"]), ref.tiled.pixel_values, rtol=0, atol=0)
    if ref.tiled.points is None:
        assert not data["patch_valid"].any()
    else:
        pp, pv = pool_points_to_patches(ref.tiled.points, ref.tiled.point_valid, tiny_model.config.patch_size)
        assert data["patch_points"].dtype == torch.float32  # geometry is never cast to the model dtype
        torch.testing.assert_close(data["patch_points"], pp, rtol=0, atol=0)
        assert torch.equal(data["patch_valid"], pv)
    cov = data["region_cov"].reshape(len(lay.region_order), t, 32, 32)
    for slot, k in enumerate(lay.region_order):
        expect = F.avg_pool2d(ref.tiled.region_tiles[k][:, None], 14)[:, 0]
        torch.testing.assert_close(cov[slot], expect, rtol=0, atol=0)


def test_region_pooling_from_coverage_equals_core_pooling(vllm_ctx, tiny_model) -> None:  # type: ignore[no-untyped-def]
    """The plugin pools regions from patch-level coverage; the core from full-resolution tile masks."""
    q = queries()["video_3_slots_3d"]
    data = {k: v.data for k, v in run(make_processor(vllm_ctx, None), q)["mm_kwargs"]["image"][0].items()}
    ref = tiny_model.prepare(q)
    t = ref.tiled.num_tiles
    feats = torch.randn(t, 1024, tiny_model.config.vision_hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        core = tiny_model.region_extractor(feats, ref.tiled.region_tiles, ref.tiled.grids)[ref.layout.region_order]
        cov = list(data["region_cov"].reshape(len(ref.layout.region_order), t, 32, 32))
        plugin = tiny_model.region_extractor(feats, cov, ref.tiled.grids)
    torch.testing.assert_close(plugin, core, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cache", ["processor", "sender"])
def test_processor_cache_on_gives_the_uncached_result_and_hits(vllm_ctx, cache: str) -> None:  # type: ignore[no-untyped-def]
    q = queries()["video_3_slots_3d"]
    plain = run(make_processor(vllm_ctx, None), q)
    proc = make_processor(vllm_ctx, cache)
    first = run(proc, q, uuid="media-1/regions-a")
    second = run(proc, q, uuid="media-1/regions-a")
    assert first["mm_hashes"]["image"] == ["media-1/regions-a"]  # the uuid is the cache key as given
    assert proc.cache.is_cached(["media-1/regions-a"]) == [True]
    for out in (first, second):
        assert out["prompt_token_ids"] == plain["prompt_token_ids"]
        (a,), (b,) = out["mm_placeholders"]["image"], plain["mm_placeholders"]["image"]
        assert (a.offset, a.length) == (b.offset, b.length) and torch.equal(a.is_embed, b.is_embed)
    # what the engine sends once the cache holds the item: its header only (no pixel work), same result
    third = run(proc, q, uuid="media-1/regions-a", header=True)
    assert third["prompt_token_ids"] == plain["prompt_token_ids"]
    assert third["mm_placeholders"]["image"][0].length == plain["mm_placeholders"]["image"][0].length
    assert (third["mm_kwargs"]["image"][0] is None) == (cache == "sender")
    item = second["mm_kwargs"]["image"][0]
    if cache == "sender":
        assert item is None  # the engine process already holds it: only the key crosses the process boundary
    else:
        for key, elem in plain["mm_kwargs"]["image"][0].items():
            assert torch.equal(item[key].data, elem.data), key


def test_region_order_is_part_of_the_item_hash(vllm_ctx) -> None:  # type: ignore[no-untyped-def]
    q = queries()["video_3_slots_3d"]
    swapped = SpatialQuery(q.frames, "Is <region0> left of <region1>?", q.regions, q.pointmaps, q.pointmap_valid, True)
    proc = make_processor(vllm_ctx, "processor")
    a, b = run(proc, q), run(proc, swapped)
    assert a["mm_hashes"]["image"] != b["mm_hashes"]["image"]
    assert int(b["mm_kwargs"]["image"][0]["num_slots"].data) == 2


def test_dummy_inputs_match_max_tokens_per_item(vllm_ctx) -> None:  # type: ignore[no-untyped-def]
    from vllm.multimodal import MULTIMODAL_REGISTRY

    proc = make_processor(vllm_ctx, "processor")
    mc = vllm_ctx["model_config"]
    expect = proc.info.get_mm_max_tokens_per_item(MAX_MODEL_LEN, {"image": 1})["image"]
    dummy = MULTIMODAL_REGISTRY.get_dummy_mm_inputs(mc, {"image": 1}, processor=proc)
    (ph,) = dummy["mm_placeholders"]["image"]
    assert ph.get_num_embeds() == expect
    item = dummy["mm_kwargs"]["image"][0]
    cfg = proc.info.get_hf_config()
    assert int(item["num_slots"].data) == proc.info.max_region_slots() == 2 * cfg.max_regions
    # the worst case respects the context: tiles capped so the dummy prompt fits max_model_len
    assert len(dummy["prompt_token_ids"]) <= MAX_MODEL_LEN
    assert expect == int(item["num_tiles"].data) * cfg.tokens_per_tile + 2 * cfg.max_regions
    # and with room to spare it is the real worst case: a max_frames video (or a full image grid)
    roomy = proc.info.get_mm_max_tokens_per_item(10**6, {"image": 1})["image"]
    assert roomy == max(cfg.max_frames, cfg.max_tiles + 1) * cfg.tokens_per_tile + 2 * cfg.max_regions


def test_bad_items_raise_clear_errors(vllm_ctx) -> None:  # type: ignore[no-untyped-def]
    from vllm.multimodal.processing import ProcessorInputs, TimingContext

    from model.vllm_plugin.processing import ItemNotPrepared, prepare_item

    proc = make_processor(vllm_ctx, None)
    q = queries()["image_1_region"]
    wrong = SpatialQuery(q.frames, q.question, [[RegionMask(0, np.ones((10, 10), bool))]])
    with pytest.raises(ModelInputError) as e:
        run(proc, wrong)
    assert e.value.code == "mask_size_mismatch"
    # a prompt that does not match the item (wrong tile count) is rejected, not silently misaligned
    items = proc.info.parse_mm_data({"image": prepare_item(q, [0], proc.info.get_hf_config())})
    tok = proc.info.get_tokenizer()
    ids = tok("<image>\nWhat is Region [0] <region>?", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="<image>"):
        proc.apply(ProcessorInputs(ids, items, None), TimingContext(enabled=False))
    with pytest.raises(ValueError, match="prepare_item"):
        proc.info.parse_mm_data({"image": [np.zeros((4, 4, 3), np.uint8)]})
    # a header-only item that misses the processor cache (evicted after the engine's check): a specific
    # error the engine answers by preparing the item
    with pytest.raises(ItemNotPrepared):
        run(make_processor(vllm_ctx, "processor"), q, uuid="never-seen", header=True)
    with pytest.raises(ModelInputError) as e:
        prepare_item(q, [0, 1], proc.info.get_hf_config())
    assert e.value.code == "region_out_of_range"
