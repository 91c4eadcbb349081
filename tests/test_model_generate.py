"""The tiny SR-3D checkpoint end to end on CPU: checkpoint I/O, the 3D path, batched streaming generation."""
from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.checkpoint import convert_to_flat, load_model, save_model
from model.errors import CheckpointError, ModelInputError
from model.inputs import GenerationParams, RegionMask, SpatialQuery, TokenDelta
from model.modeling import SR3DForConditionalGeneration

RNG = np.random.default_rng(0)


def _mask(h: int, w: int, y: int, x: int, s: int = 20) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y:y + s, x:x + s] = True
    return m


def video_query() -> SpatialQuery:  # 4 frames, 1 region, point maps
    frames = RNG.integers(0, 255, (4, 96, 128, 3), dtype=np.uint8)
    return SpatialQuery(frames=frames, question="How far is <region0> from the camera?",
                        regions=[[RegionMask(1, _mask(96, 128, 10, 20)), RegionMask(3, _mask(96, 128, 40, 60))]],
                        pointmaps=RNG.standard_normal((4, 96, 128, 3)).astype(np.float32), is_video=True)


def tiled_image_query() -> SpatialQuery:  # 2:1 image -> 2 tiles + thumbnail, no regions
    return SpatialQuery(frames=RNG.integers(0, 255, (1, 100, 200, 3), dtype=np.uint8), question="Describe the room.")


def three_region_query() -> SpatialQuery:
    h, w = 120, 120
    return SpatialQuery(frames=RNG.integers(0, 255, (1, h, w, 3), dtype=np.uint8),
                        question="Is <region2> between <region0> and <region1>?",
                        regions=[[RegionMask(0, _mask(h, w, 0, 0))], [RegionMask(0, _mask(h, w, 50, 50))],
                                 [RegionMask(0, _mask(h, w, 90, 90, 30))]])


def _logits(model: SR3DForConditionalGeneration, q: SpatialQuery) -> torch.Tensor:
    with torch.inference_mode():
        e = model.embed(model.prepare(q))
        return model.llm(inputs_embeds=e[None]).logits[0, -8:]


GREEDY = GenerationParams(max_tokens=12, ignore_eos=True)


# ------------------------------------------------------------------ checkpoint
def test_tiny_checkpoint_layout_and_tokenizer(tiny_checkpoint: Path, tiny_model: SR3DForConditionalGeneration) -> None:
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "llava_llama" and cfg["architectures"] == ["LlavaLlamaModel"]
    assert {"llm_cfg", "vision_tower_cfg", "mm_projector_cfg", "pos3d_cfg", "region_cfg"} <= set(cfg)
    for sub in ("llm", "vision_tower", "mm_projector", "sr3d"):
        assert list((tiny_checkpoint / sub).glob("*.safetensors")), sub
    proj = load_file(str(next((tiny_checkpoint / "mm_projector").glob("*.safetensors"))))
    assert sorted(proj) == sorted(f"layers.{i}.{n}" for i in (1, 2, 4, 5, 7) for n in ("weight", "bias"))
    tok = tiny_model.tokenizer
    for t in ("<image>", "<region>", "<vila/video>", "<vila/sentinel>", "<|im_start|>", "<|im_end|>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert tiny_model.config.tokens_per_tile == 121 and tiny_model.device.type == "cpu"


def test_save_load_roundtrip_identical_logits(tiny_model: SR3DForConditionalGeneration, tmp_path: Path) -> None:
    save_model(tiny_model, tmp_path / "copy")
    again = load_model(tmp_path / "copy")
    q = video_query()
    assert torch.equal(_logits(tiny_model, q), _logits(again, q))


def test_convert_to_flat(tiny_checkpoint: Path, tiny_model: SR3DForConditionalGeneration, tmp_path: Path) -> None:
    dst = tmp_path / "flat"
    convert_to_flat(tiny_checkpoint, dst)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "sr3d" and cfg["architectures"] == ["SR3DForConditionalGeneration"]
    assert cfg["llm_cfg"]["hidden_size"] == 64 and cfg["vision_tower_cfg"]["patch_size"] == 14
    assert (dst / "tokenizer.json").is_file() and not (dst / "llm").exists()
    keys: set[str] = set()
    for f in dst.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            keys |= set(sf.keys())
    assert {k.split(".", 1)[0] for k in keys} == {"llm", "vision_tower", "mm_projector", "pos3d", "region_extractor"}
    assert "mm_projector.layers.1.weight" in keys and "llm.lm_head.weight" in keys
    assert "region_extractor.region_projector.0.weight" in keys and "pos3d.mlp.2.weight" in keys
    flat = load_model(dst)
    q = three_region_query()
    assert torch.equal(_logits(tiny_model, q), _logits(flat, q))
    with pytest.raises(CheckpointError):
        convert_to_flat(tiny_checkpoint, dst)  # refuses to write into a non-empty directory


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_sr3d_extras_gives_2d_model(tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ck = _copy(tiny_checkpoint, tmp_path / "nvila")
    shutil.rmtree(ck / "sr3d")
    with caplog.at_level(logging.WARNING):
        m = load_model(ck)
    assert "no sr3d/" in caplog.text
    assert torch.count_nonzero(m.pos3d.mlp[2].weight) == 0


def test_checkpoint_errors(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ck = _copy(tiny_checkpoint, tmp_path / "bad")
    proj = next((ck / "mm_projector").glob("*.safetensors"))
    good = load_file(str(proj))

    proj.unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(ck)
    assert e.value.code == "missing_file"

    save_file({**good, "layers.2.weight": torch.zeros(3, 3)}, str(proj))
    with pytest.raises(CheckpointError) as e:
        load_model(ck)
    assert e.value.code == "wrong_shape" and "layers.2.weight" in str(e.value)

    save_file({**good, "layers.9.weight": torch.zeros(3)}, str(proj))
    with pytest.raises(CheckpointError) as e:
        load_model(ck)
    assert e.value.code == "unknown_keys"

    save_file({k: v for k, v in good.items() if k != "layers.7.bias"}, str(proj))
    with pytest.raises(CheckpointError) as e:
        load_model(ck)
    assert e.value.code == "missing_keys"

    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "nowhere")
    assert e.value.code == "missing_file"


# ------------------------------------------------------------------ 3D path
def test_pos3d_zero_init_equals_2d_path(tiny_model: SR3DForConditionalGeneration) -> None:
    q3d = video_query()
    q2d = copy.copy(q3d)
    q2d.pointmaps = None
    # the demo checkpoint's 3D-PE is non-zero: point maps change the embeddings ...
    assert not torch.allclose(tiny_model.embed(tiny_model.prepare(q3d)), tiny_model.embed(tiny_model.prepare(q2d)))
    # ... and with a zero-initialised 3D-PE the logits equal the 2D (plain NVILA) path exactly
    m = copy.deepcopy(tiny_model)
    m.pos3d.reset_output()
    assert torch.equal(_logits(m, q3d), _logits(m, q2d))


# ------------------------------------------------------------------ generation
def test_batch_equals_single_greedy(tiny_model: SR3DForConditionalGeneration) -> None:
    queries = [video_query(), tiled_image_query(), three_region_query()]
    prepared = [tiny_model.prepare(q) for q in queries]
    assert [p.tiled.num_tiles for p in prepared] == [4, 3, 1]
    alone = [tiny_model.generate([p], [GREEDY])[0] for p in prepared]
    together = tiny_model.generate(prepared, [GREEDY] * 3)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert len({tuple(r.token_ids) for r in alone}) == 3  # the inputs really differ
    for r, p in zip(together, prepared):
        assert r.prompt_tokens == p.prompt_tokens == p.layout.num_tokens
        assert r.completion_tokens == 12 and r.finish_reason == "length"


def test_streaming_deltas_concatenate_to_text(tiny_model: SR3DForConditionalGeneration) -> None:
    prepared = [tiny_model.prepare(q) for q in (video_query(), three_region_query())]
    deltas: dict[int, list[TokenDelta]] = {0: [], 1: []}
    params = [GenerationParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True), GREEDY]
    results = tiny_model.generate(prepared, params, on_delta=lambda i, d: deltas[i].append(d))
    tok = tiny_model.tokenizer
    for i, r in enumerate(results):
        ds = deltas[i]
        assert "".join(d.text for d in ds) == r.text
        assert [t for d in ds for t in d.token_ids] == r.token_ids
        assert r.text == tok.decode(r.token_ids, skip_special_tokens=True)
        assert [d.finished for d in ds] == [False] * (len(ds) - 1) + [True]
        assert ds[-1].finish_reason == "length" and ds[-1].completion_tokens == len(r.token_ids)
    # seeded sampling is reproducible
    again = tiny_model.generate(prepared[:1], params[:1])[0]
    assert again.token_ids == results[0].token_ids


def test_stop_token_ends_row(tiny_model: SR3DForConditionalGeneration) -> None:
    p = tiny_model.prepare(tiled_image_query())
    im_end = tiny_model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    m = copy.deepcopy(tiny_model)
    with torch.no_grad():  # force the model to always predict <|im_end|>
        m.llm.lm_head.bias = torch.nn.Parameter(torch.zeros(m.llm.lm_head.out_features))
        m.llm.lm_head.bias[im_end] = 1e4
    r = m.generate([p], [GenerationParams(max_tokens=10)])[0]
    assert r.finish_reason == "stop" and r.token_ids == [im_end] and r.text == ""
    r = m.generate([p], [GenerationParams(max_tokens=5, ignore_eos=True)])[0]
    assert r.finish_reason == "length" and r.token_ids == [im_end] * 5


def test_abort_via_callback(tiny_model: SR3DForConditionalGeneration) -> None:
    prepared = [tiny_model.prepare(q) for q in (tiled_image_query(), three_region_query())]
    seen = {0: 0, 1: 0}

    def on_delta(i: int, d: TokenDelta) -> bool:
        seen[i] += 1
        return not (i == 0 and seen[i] == 3)

    res = tiny_model.generate(prepared, [GREEDY, GREEDY], on_delta=on_delta)
    assert res[0].finish_reason == "abort" and res[0].completion_tokens == 3 and seen[0] == 3
    assert res[1].finish_reason == "length" and res[1].completion_tokens == 12 and seen[1] == 12


@pytest.mark.parametrize(
    "make,code",
    [
        (lambda q: setattr(q, "regions", [[RegionMask(0, np.ones((10, 10), bool))]]), "mask_size_mismatch"),
        (lambda q: setattr(q, "regions", [[RegionMask(0, np.zeros((120, 120), bool))]]), "empty_mask"),
        (lambda q: setattr(q, "question", "Where is <region5>?"), "region_out_of_range"),
        (lambda q: setattr(q, "regions", q.regions * 3), "too_many_regions"),
        (lambda q: setattr(q, "question", "<image> <region0> <region1> <region2>"), "placeholder_in_question"),
        (lambda q: setattr(q, "question", "Where is <region0>?"), "unreferenced_region"),
    ],
)
def test_prepare_rejects_bad_input(tiny_model: SR3DForConditionalGeneration, make, code: str) -> None:  # type: ignore[no-untyped-def]
    q = three_region_query()
    make(q)
    with pytest.raises(ModelInputError) as e:
        tiny_model.prepare(q)
    assert e.value.code == code
