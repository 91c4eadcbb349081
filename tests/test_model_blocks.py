"""Tiling geometry, projector, 3D-PE pooling, region pooling, prompt layout: the pure building blocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import NVILAConfig, SR3DConfig, config_from_dict, register_configs
from model.errors import ModelInputError
from model.inputs import RegionMask, SpatialQuery
from model.pos3d import PositionEncoding3D, pool_points_to_patches
from model.projector import MultimodalProjector, SpaceToChannel3x3
from model.prompt import build_prompt, expand_prompt, prompt_token_count
from model.regions import pool_region
from model.tiling import find_grid, tile_query, validate_query
from model.tokenizer_build import build_tokenizer

S = 448


@pytest.fixture(scope="module")
def cfg() -> SR3DConfig:
    return SR3DConfig(
        llm_cfg={"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 600},
        vision_tower_cfg={"hidden_size": 8, "patch_size": 14, "image_size": 448},
        pos3d_cfg={"num_freqs": 4, "mlp_hidden": 16},
    )


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return build_tokenizer()


# ------------------------------------------------------------------ config
def test_config_properties_and_roundtrip(cfg: SR3DConfig) -> None:
    assert cfg.tokens_per_tile == 121 and cfg.select_layer == -2
    assert cfg.get_text_config().num_attention_heads == 4
    assert cfg.vision_config.hidden_size == 8
    d = cfg.to_dict()
    assert not any(k.startswith("_sr3d") for k in d)
    back = config_from_dict(d)
    assert type(back) is SR3DConfig and back.llm_cfg == cfg.llm_cfg and back.region_cfg == cfg.region_cfg
    nv = config_from_dict({**d, "model_type": "llava_llama", "hidden_size": 3584})
    assert isinstance(nv, NVILAConfig) and nv.hidden_size == 64  # llm_cfg is the source of truth
    register_configs()
    register_configs()  # idempotent


# ------------------------------------------------------------------ tiling
@pytest.mark.parametrize(
    "w,h,grid",
    [
        (448, 448, (1, 1)),  # square, small: area not > half of 2x2 -> stays 1x1 on the 1:1 tie
        (1344, 1344, (3, 3)),  # square, large: ties 1:1 < 2:2 < 3:3, each wins on area
        (896, 896, (2, 2)),  # 802816 > half of 2x2 (401408) but not of 3x3 (903168)
        (896, 448, (2, 1)),
        (1920, 1080, (4, 2)),  # 2:1 and 4:2 tie; the image is big enough for 4x2
        (1000, 100, (10, 1)),
        (100, 1000, (1, 10)),
        (640, 480, (4, 3)),  # exact 4:3 exists (12 tiles): NVILA picks it even for a small image
    ],
)
def test_find_grid(w: int, h: int, grid: tuple[int, int]) -> None:
    assert find_grid(w, h, 12) == grid


def test_find_grid_respects_max_tiles() -> None:
    for w, h in [(5000, 100), (3000, 2000), (777, 333)]:
        for m in (1, 4, 6, 12):
            c, r = find_grid(w, h, m)
            assert 1 <= c * r <= m


def _pattern(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 7) % 256, (yy * 5) % 256, (xx + yy) % 256], -1).astype(np.uint8)


def test_image_tiles_match_source_crops(cfg: SR3DConfig) -> None:
    # A frame already at grid resolution: resize is the identity, so each tile must equal its crop exactly.
    h, w = 2 * S, 3 * S
    frame = _pattern(h, w)
    mask = np.zeros((h, w), bool)
    mask[S - 10:S + 30, 2 * S - 5:2 * S + 7] = True  # straddles four tiles
    pts = np.random.default_rng(0).standard_normal((1, h, w, 3)).astype(np.float32)
    valid = np.ones((1, h, w), bool)
    valid[0, :5, :5] = False
    q = SpatialQuery(frames=frame[None], question="<region0>", regions=[[RegionMask(0, mask)]],
                     pointmaps=pts, pointmap_valid=valid)
    t = tile_query(q, cfg)
    assert t.grids == [(3, 2, True)] and t.tiles_per_frame == [7] and t.frame_of_tile == [0] * 7
    assert t.pixel_values.shape == (7, 3, S, S) and t.pixel_values.dtype == torch.float32
    for i in range(6):
        r, c = divmod(i, 3)
        crop = frame[r * S:(r + 1) * S, c * S:(c + 1) * S]
        want = torch.from_numpy(crop).permute(2, 0, 1).float() / 255 * 2 - 1
        assert torch.equal(t.pixel_values[i], want)
        assert torch.equal(t.region_tiles[0][i], torch.from_numpy(mask[r * S:(r + 1) * S, c * S:(c + 1) * S].astype(np.float32)))
        assert torch.equal(t.points[i], torch.from_numpy(pts[0, r * S:(r + 1) * S, c * S:(c + 1) * S]))
    assert not t.point_valid[0, :5, :5].any() and t.point_valid[0, 5:, 5:].all()
    # thumbnail: area-averaged mask keeps the region's total coverage (scaled by the area ratio)
    assert t.region_tiles[0][6].sum().item() == pytest.approx(mask.sum() / 6, rel=1e-4)


def test_resized_mask_and_points_follow_image_geometry(cfg: SR3DConfig) -> None:
    # A frame of half the grid resolution: a mask block at pixel (y, x) lands at (2y, 2x) in the tiles,
    # and the point map marks the same pixels as the mask.
    h, w = S // 2, S  # 2:1 -> 2x1 grid at 896x448: scale 2 in both directions
    mask = np.zeros((h, w), bool)
    mask[40:60, 300:320] = True
    pts = np.zeros((1, h, w, 3), np.float32)
    pts[0, mask] = 1.0
    q = SpatialQuery(frames=_pattern(h, w)[None], question="", regions=[[RegionMask(0, mask)]], pointmaps=pts)
    t = tile_query(q, cfg)
    assert t.grids == [(2, 1, True)]
    m = t.region_tiles[0]
    full = torch.cat([m[0], m[1]], dim=1)  # stitch the two tiles back
    ys, xs = torch.nonzero(full > 0.5, as_tuple=True)
    assert (ys.min().item(), ys.max().item(), xs.min().item(), xs.max().item()) == (80, 119, 600, 639)
    pfull = torch.cat([t.points[0], t.points[1]], dim=1)[..., 0]
    assert torch.equal(pfull > 0.5, full > 0.5)


def test_video_one_tile_per_frame_and_region_only_on_its_frame(cfg: SR3DConfig) -> None:
    frames = np.stack([_pattern(120, 160)] * 3)
    mask = np.zeros((120, 160), bool)
    mask[10:20, 10:20] = True
    q = SpatialQuery(frames=frames, question="", regions=[[RegionMask(2, mask)]], is_video=True)
    t = tile_query(q, cfg)
    assert t.pixel_values.shape == (3, 3, S, S) and t.grids == [(1, 1, False)] * 3
    assert t.points is None and t.point_valid is None
    r = t.region_tiles[0]
    assert r[0].sum() == 0 and r[1].sum() == 0 and r[2].sum() > 0
    assert float(r.max()) <= 1.0 and float(r.min()) >= 0.0


def test_a_long_video_tiles_each_frame_exactly_as_alone(cfg: SR3DConfig) -> None:
    """Frames of a long video are prepared in chunks on several threads: every frame's tile, points and
    validity (non-finite points and the backend's invalid pixels dropped, cleaned to 0) must equal that frame
    tiled on its own, bit for bit."""
    rng = np.random.default_rng(3)
    n, h, w = 11, 60, 90  # more than one chunk, the last one short
    frames = rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8)
    pts = rng.standard_normal((n, h, w, 3)).astype(np.float32)
    pts[rng.random((n, h, w)) < 0.05] = np.nan
    pts[..., 2][rng.random((n, h, w)) < 0.05] = -np.inf
    valid = rng.random((n, h, w)) < 0.8
    whole = tile_query(SpatialQuery(frames=frames, question="", pointmaps=pts, pointmap_valid=valid, is_video=True), cfg)
    assert whole.points is not None and whole.point_valid is not None
    assert bool(torch.isfinite(whole.points).all()) and not bool(whole.point_valid.all())
    for i in range(n):
        one = tile_query(SpatialQuery(frames=frames[i:i + 1], question="", pointmaps=pts[i:i + 1],
                                      pointmap_valid=valid[i:i + 1], is_video=True), cfg)
        assert torch.equal(whole.tiles[i], one.tiles[0])
        assert torch.equal(whole.points[i], one.points[0]) and torch.equal(whole.point_valid[i], one.point_valid[0])


@pytest.mark.parametrize(
    "mutate,code",
    [
        (lambda q: setattr(q, "regions", [[RegionMask(0, np.ones((5, 5), bool))]]), "mask_size_mismatch"),
        (lambda q: setattr(q, "regions", [[RegionMask(0, np.zeros((60, 80), bool))]]), "empty_mask"),
        (lambda q: setattr(q, "regions", [[RegionMask(3, np.ones((60, 80), bool))]]), "bad_region_frame"),
        (lambda q: setattr(q, "regions", [[RegionMask(0, np.ones((60, 80), bool))]] * 9), "too_many_regions"),
        (lambda q: setattr(q, "frames", np.zeros((2, 60, 80, 3), np.uint8)), "bad_frames"),
        (lambda q: (setattr(q, "frames", np.zeros((65, 60, 80, 3), np.uint8)), setattr(q, "is_video", True)), "too_many_frames"),
        (lambda q: setattr(q, "pointmaps", np.zeros((1, 60, 81, 3), np.float32)), "bad_pointmap"),
    ],
)
def test_validate_query_codes(cfg: SR3DConfig, mutate, code: str) -> None:  # type: ignore[no-untyped-def]
    q = SpatialQuery(frames=np.zeros((1, 60, 80, 3), np.uint8), question="hi")
    validate_query(q, cfg)
    mutate(q)
    with pytest.raises(ModelInputError) as e:
        validate_query(q, cfg)
    assert e.value.code == code


# ------------------------------------------------------------------ projector
def test_projector_shapes_keys_and_merge_order(cfg: SR3DConfig) -> None:
    p = MultimodalProjector(cfg)
    assert list(p.state_dict()) == [f"layers.{i}.{n}" for i in (1, 2, 4, 5, 7) for n in ("weight", "bias")]
    assert p.layers[1].normalized_shape == (72,) and p.layers[2].out_features == 24
    assert p(torch.randn(3, 1024, 8)).shape == (3, 121, 64)
    # 3x3 merge: output token (0, 1) holds patches rows 0-2, cols 3-5, channel order (row, col, C)
    x = torch.arange(32 * 32, dtype=torch.float32).reshape(1, 1024, 1)
    m = SpaceToChannel3x3()(x)
    assert m.shape == (1, 121, 9)
    assert m[0, 1].tolist() == [3, 4, 5, 35, 36, 37, 67, 68, 69]
    assert m[0, 120].tolist() == [990, 991, 0, 1022, 1023, 0, 0, 0, 0]  # zero padding bottom/right


# ------------------------------------------------------------------ 3D-PE
def test_point_pooling_is_masked_mean() -> None:
    pts = torch.zeros(1, 28, 28, 3)
    pts[0, :14, :14] = 2.0
    pts[0, 0, 0] = 100.0
    valid = torch.ones(1, 28, 28, dtype=torch.bool)
    valid[0, 0, 0] = False  # the outlier is invalid and must not move the mean
    valid[0, 14:, 14:] = False  # a patch without any valid point
    pp, pv = pool_points_to_patches(pts, valid, patch=14)
    assert pp.shape == (1, 4, 3) and pv.tolist() == [[True, True, True, False]]
    assert torch.allclose(pp[0, 0], torch.full((3,), 2.0)) and torch.equal(pp[0, 3], torch.zeros(3))


def test_pos3d_zero_init_and_invalid_patches() -> None:
    pe = PositionEncoding3D(8, {"num_freqs": 4, "temperature": 1e4, "scale": 6.28, "mlp_hidden": 16})
    pts = torch.randn(2, 5, 3)
    ok = torch.ones(2, 5, dtype=torch.bool)
    assert torch.count_nonzero(pe(pts, ok)) == 0
    torch.nn.init.normal_(pe.mlp[2].weight)
    ok[0, 1] = False
    out = pe(pts, ok)
    assert out.shape == (2, 5, 8) and torch.count_nonzero(out[0, 1]) == 0 and torch.count_nonzero(out[0, 0]) > 0


# ------------------------------------------------------------------ region pooling
def test_pool_region_matches_hand_computation() -> None:
    # 2x1 image grid + thumbnail, feature grid 2x2 per tile (N=4), tile side 4 (2 pixels per patch).
    feats = torch.zeros(3, 4, 1)
    feats[0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    feats[1, :, 0] = torch.tensor([10.0, 20.0, 30.0, 40.0])
    feats[2, :, 0] = 1000.0  # thumbnail: must be ignored
    masks = torch.zeros(3, 4, 4)
    masks[0, 0:2, 0:2] = 1.0  # covers patch 0 of tile 0 fully
    masks[1, 0, 0] = 1.0  # covers a quarter of patch 0 of tile 1
    masks[2] = 1.0
    got = pool_region(feats, masks, [(2, 1, True)])
    want = (1.0 * 1.0 + 0.25 * 10.0) / 1.25
    assert got.shape == (1,) and got.item() == pytest.approx(want)
    # video: two frames carrying the mask are pooled jointly
    v = pool_region(feats[:2], masks[:2], [(1, 1, False), (1, 1, False)])
    assert v.item() == pytest.approx(want)
    with pytest.raises(ModelInputError) as e:
        pool_region(feats[:2], torch.zeros(2, 4, 4), [(1, 1, False)] * 2)
    assert e.value.code == "empty_mask"


# ------------------------------------------------------------------ prompt
def test_prompt_layout_and_expansion(cfg: SR3DConfig, tok) -> None:  # type: ignore[no-untyped-def]
    lay = build_prompt("Is <region1> left of <region0>?", 6, False, 2, tok, cfg)
    text = tok.decode(lay.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n<image>\n")
    assert text.endswith("Is Region [1] <region> left of Region [0] <region>?<|im_end|>\n<|im_start|>assistant\n")
    assert lay.region_order == [1, 0] and lay.num_tiles == 6 and lay.num_image_tokens_per_tile == 122
    ids, pos = expand_prompt(lay)
    assert len(ids) == prompt_token_count(lay) == lay.num_tokens == len(lay.input_ids) + 6 * 121
    assert len(pos) == 6 * 121 and all(ids[p] == lay.image_token_id for p in pos)
    assert ids[pos[120] + 1] == lay.newline_ids[0]  # every tile's 121 slots are followed by "\n"
    assert ids.count(lay.region_token_id) == 2
    # the visual prefix is identical for different questions on the same media (prefix caching)
    other, _ = expand_prompt(build_prompt("What is <region0> and <region1>?", 6, False, 2, tok, cfg))
    n = ids.index(lay.region_token_id) - 8
    assert other[:n] == ids[:n]


@pytest.mark.parametrize(
    "question,regions,code",
    [
        ("what is <image> here", 0, "placeholder_in_question"),
        ("what is <region> here", 0, "placeholder_in_question"),
        ("<|im_end|> hi", 0, "placeholder_in_question"),
        ("<vila/video>", 0, "placeholder_in_question"),
        ("where is <region2>?", 2, "region_out_of_range"),
        ("where is <region0>?", 2, "unreferenced_region"),
        ("<region0>" * 9, 9, "too_many_regions"),
    ],
)
def test_prompt_rejects(cfg: SR3DConfig, tok, question: str, regions: int, code: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelInputError) as e:
        build_prompt(question, 1, False, regions, tok, cfg)
    assert e.value.code == code
