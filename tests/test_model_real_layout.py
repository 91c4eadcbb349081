"""The real NVILA layout: VILA's media tokens and embedding resize, subfolder configs, refusals, NVILA's prompt
layout (per-frame and per-tile token counts), the flat vLLM conversion, region modes. Runs on the replica
checkpoint (tests/replica.py: NVILA-Lite-8B's files and Qwen2's real vocabulary, tiny random weights).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import check_servable, convert_to_flat, load_model
from model.errors import CheckpointError, ModelInputError
from model.inputs import RegionMask, SpatialQuery
from model.prompt import layout_query

pytestmark = pytest.mark.timeout(600)


def test_replica_has_no_media_tokens_and_the_loader_adds_them_with_vilas_ids(replica_checkpoint: Path,
                                                                              replica_model) -> None:  # type: ignore[no-untyped-def]
    saved = json.loads((replica_checkpoint / "llm" / "tokenizer.json").read_text())
    added = {t["content"] for t in saved["added_tokens"]}
    assert not added & {"<image>", "<vila/video>", "<vila/sentinel>", "<region>"}
    assert len(saved["model"]["vocab"]) == 151643  # Qwen2's regular vocabulary
    tok = replica_model.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<vila/sentinel>", "<image>", "<vila/video>", "<region>")}
    # llava/constants.py: 151648 sentinel, 151649 image, 151650 video; SR-3D's placeholder after them
    assert ids == {"<vila/sentinel>": 151648, "<image>": 151649, "<vila/video>": 151650, "<region>": 151651}
    # VILA resizes the table to its tokenizer (drops Qwen2-7B's padding rows 151651..152063)
    assert replica_model.llm.get_input_embeddings().weight.shape[0] == 151651
    assert replica_model.llm.get_output_embeddings().weight.shape[0] == 151651
    assert replica_model.config.text_config.vocab_size == 151651
    assert replica_model.region_mode == "marks"  # no sr3d/ region modules


def test_subfolder_configs_are_authoritative(replica_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(replica_checkpoint, ckpt)
    top = json.loads((ckpt / "config.json").read_text())
    top["llm_cfg"]["num_hidden_layers"] = 7  # a stale top-level copy: VILA ignores it
    top["vision_tower_cfg"]["num_hidden_layers"] = 9
    (ckpt / "config.json").write_text(json.dumps(top))
    model = load_model(ckpt)
    assert model.config.text_config.num_hidden_layers == 2
    assert model.config.vision_config.num_hidden_layers == 2


@pytest.mark.parametrize("field,value", [
    ("image_aspect_ratio", "resize"),
    ("image_aspect_ratio", "dynamic_s2"),
    ("video_encoder", json.dumps({"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]})),
    ("image_encoder", json.dumps({"_target_": "llava.model.encoders.BasicImageEncoder", "start_tokens": "<im>"})),
    ("video_max_tiles", 4),
])
def test_unsupported_nvila_options_are_refused(replica_checkpoint: Path, tmp_path: Path, field: str, value) -> None:  # type: ignore[no-untyped-def]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(replica_checkpoint, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    assert e.value.code == "unsupported_config" and field in e.value.message


def _video(n: int, regions: int = 0) -> SpatialQuery:
    frames = np.full((n, 96, 128, 3), 90, np.uint8)
    masks = []
    for k in range(regions):
        m = np.zeros((96, 128), bool)
        m[10 + 30 * k:30 + 30 * k, 20:60] = True
        masks.append([RegionMask(0, m)])
    q = "What is between " + " and ".join(f"<region{k}>" for k in range(regions)) + "?" if regions else "What is here?"
    return SpatialQuery(frames, q, masks, is_video=True)


@pytest.mark.parametrize("checkpoint", ["replica_model", "tiny_model"])
def test_video_prompt_grows_by_122_tokens_per_frame(checkpoint: str, request: pytest.FixtureRequest) -> None:
    """NVILA: per frame 121 projected features + the embedding of "\\n", no literal newline token."""
    model = request.getfixturevalue(checkpoint)
    counts = [layout_query(_video(n), model.tokenizer, model.config, 1 << 20)[1].num_tokens for n in (1, 2, 3, 8)]
    assert [b - a for a, b in zip(counts, counts[1:])] == [122, 122, 5 * 122]
    lay = layout_query(_video(3), model.tokenizer, model.config, 1 << 20)[1]
    image = lay.image_token_id
    at = [i for i, t in enumerate(lay.input_ids) if t == image]
    assert at == [at[0], at[0] + 1, at[0] + 2]  # frames' media tokens are adjacent: no "\n" between them


def test_image_tiles_cost_123_tokens_each(replica_model) -> None:  # type: ignore[no-untyped-def]
    """NVILA's dynamic tiling writes "<image>\\n" per tile: 121 features + "\\n" embedding + the literal "\\n"."""
    tok, cfg = replica_model.tokenizer, replica_model.config
    wide = SpatialQuery(np.zeros((1, 448, 3 * 448, 3), np.uint8), "What is here?")  # 3x1 grid + thumbnail
    one = SpatialQuery(np.zeros((1, 448, 448, 3), np.uint8), "What is here?")  # 1 tile, no thumbnail
    a, b = (layout_query(q, tok, cfg, 1 << 20)[1] for q in (one, wide))
    assert (a.num_tiles, b.num_tiles) == (1, 4)
    assert b.num_tokens - a.num_tokens == 3 * 123
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    assert nl == [198] and a.newline_ids == nl  # Qwen2's "\n"


def test_prompt_text_is_vilas_chat_template_with_stripped_user_turn(replica_model) -> None:  # type: ignore[no-untyped-def]
    tok, cfg = replica_model.tokenizer, replica_model.config
    lay = layout_query(SpatialQuery(np.zeros((2, 64, 64, 3), np.uint8), "  How many chairs?  \n", is_video=True),
                       tok, cfg, 1 << 20)[1]
    text = tok.decode(lay.input_ids)
    assert text == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n<image><image>"
                    "  How many chairs?<|im_end|>\n<|im_start|>assistant\n")


def test_flat_conversion_keeps_vilas_vocabulary_and_names_placeholder_ids(replica_checkpoint: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    convert_to_flat(replica_checkpoint, flat)
    cfg = json.loads((flat / "config.json").read_text())
    assert cfg["llm_cfg"]["vocab_size"] == 151651
    assert cfg["sr3d_token_ids"] == {"image": 151649, "region": 151651}  # region past the table: OOV for vLLM
    assert cfg["region_cfg"]["trained"] is False
    model = load_model(flat)
    assert model.llm.get_input_embeddings().weight.shape[0] == 151651 and model.region_mode == "marks"
    with pytest.raises(CheckpointError) as e:
        load_model(flat, region_mode="embedding")
    assert e.value.code == "no_region_weights"


def test_embedding_mode_without_region_weights_is_refused(replica_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        load_model(replica_checkpoint, region_mode="embedding")
    assert e.value.code == "no_region_weights" and "marks" in e.value.message


def test_marks_mode_rewrites_references_and_feeds_no_region_slots(replica_model) -> None:  # type: ignore[no-untyped-def]
    q = _video(3, regions=2)
    marked, lay = layout_query(q, replica_model.tokenizer, replica_model.config, 1 << 20, region_mode="marks")
    text = replica_model.tokenizer.decode(lay.input_ids)
    assert "the region marked 0 (red outline)" in text and "the region marked 1 (green outline)" in text
    assert lay.region_order == [] and lay.region_token_id not in lay.input_ids
    assert marked.regions == [] and not np.array_equal(marked.frames[0], q.frames[0])
    assert np.array_equal(marked.frames[1], q.frames[1])  # only frames carrying a mask are drawn on
    # the rules still apply to the user's text in marks mode
    bad = SpatialQuery(q.frames, "What is <region0>?", q.regions, is_video=True)
    with pytest.raises(ModelInputError) as e:
        layout_query(bad, replica_model.tokenizer, replica_model.config, 1 << 20, region_mode="marks")
    assert e.value.code == "unreferenced_region"


def test_replica_generates_in_marks_mode(replica_model) -> None:  # type: ignore[no-untyped-def]
    from model.inputs import GenerationParams

    prepared = replica_model.prepare(_video(2, regions=2))
    (res,) = replica_model.generate([prepared], [GenerationParams(max_tokens=4, ignore_eos=True)])
    assert len(res.token_ids) == 4 and all(0 <= t < 151651 for t in res.token_ids)
    assert res.prompt_tokens == len(prepared.input_ids)


def test_check_servable_accepts_nvila_lite_fields(replica_model) -> None:  # type: ignore[no-untyped-def]
    check_servable(replica_model.config, Path("replica"))  # dynamic tiling, basic encoders, 3x3 projector
    assert torch.isfinite(replica_model.llm.get_input_embeddings().weight).all()
