"""The vLLM plugin's CPU half against NVlabs/VILA's numbers (tests/data/vila_parity.json; how they were made:
tests/test_model_parity_vila.py) on the NVILA-Lite replica: the processor's expanded prompt is VILA's, and
vLLM's input embeddings (`embed_multimodal` + `embed_input_ids`, placeholder ids out of the vocabulary masked
by `handle_oov_mm_token`) have VILA's checksums. Greedy tokens need vLLM's LLM forward, i.e. a GPU:
tests/gpu/test_vllm_equality.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vllm (extra `vllm`) is not installed: the plugin cannot be exercised")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

from model.inputs import RegionMask, SpatialQuery  # noqa: E402
from tests.test_model_parity_vila import REF, assert_close_checksums, checksums, queries, vila_ids  # noqa: E402


@pytest.fixture(scope="module")
def monkeypatch_module():  # type: ignore[no-untyped-def]
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def replica_vllm(replica_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch_module):  # type: ignore[no-untyped-def]
    from tests.vllm_support import cpu_vllm_model

    with cpu_vllm_model(replica_checkpoint, tmp_path_factory.mktemp("vllm-replica"), monkeypatch_module) as built:
        yield built


def _processed(built, query: SpatialQuery):  # type: ignore[no-untyped-def]
    """What the VLLMEngine sends, through vLLM's own processor: -> (expanded ids, placeholder mask, mm kwargs)."""
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import ProcessorInputs, TimingContext

    from model.prompt import layout_query
    from model.vllm_plugin.processing import prepare_item

    proc = MULTIMODAL_REGISTRY.create_processor(built["model_config"])
    cfg, tok = proc.info.get_hf_config(), proc.info.get_tokenizer()
    _, lay = layout_query(query, tok, cfg, context=1 << 20)
    mm = proc.info.parse_mm_data({"image": prepare_item(query, lay.region_order, cfg)})
    out = proc.apply(ProcessorInputs(lay.input_ids, mm, None), TimingContext(enabled=False))
    ids = list(out["prompt_token_ids"])
    (ph,) = out["mm_placeholders"]["image"]
    mask = torch.zeros(len(ids), dtype=torch.bool)
    mask[ph.offset:ph.offset + ph.length] = ph.is_embed if ph.is_embed is not None else True
    return lay, ids, mask, out["mm_kwargs"]["image"][0]


def test_placeholder_ids_past_the_vocabulary_are_masked(replica_vllm) -> None:  # type: ignore[no-untyped-def]
    # VILA's table ends at <vila/video> (151650); SR-3D's <region> (151651) lies past it
    assert replica_vllm["model"]._has_oov_mm_tokens is True


@pytest.mark.parametrize("name", ["tiled_image", "video_8_frames"])
def test_plugin_input_embeddings_match_vila(replica_vllm, name: str) -> None:  # type: ignore[no-untyped-def]
    from vllm.multimodal.utils import group_and_batch_mm_kwargs

    model = replica_vllm["model"]
    lay, ids, mask, item = _processed(replica_vllm, queries()[name])
    assert lay.input_ids == vila_ids(name)  # the engine's prompt is VILA's
    ((_, _, batch),) = list(group_and_batch_mm_kwargs([("image", item)], device="cpu"))
    with torch.inference_mode():
        mm = model.embed_multimodal(**batch)
        emb = model.embed_input_ids(torch.tensor(ids), mm, is_multimodal=mask)
    assert_close_checksums(checksums(emb), REF[name])


def test_region_slot_past_the_vocabulary_embeds_safely(replica_vllm) -> None:  # type: ignore[no-untyped-def]
    """A region slot (embedding layout) carries id 151651 = the table size: vLLM must not look it up."""
    from vllm.multimodal.utils import group_and_batch_mm_kwargs

    model = replica_vllm["model"]
    frames = np.random.default_rng(1).integers(0, 256, (2, 120, 160, 3), dtype=np.uint8)
    m = np.zeros((120, 160), bool)
    m[20:80, 30:90] = True
    q = SpatialQuery(frames, "Where is <region0>?", [[RegionMask(1, m)]], is_video=True)
    lay, ids, mask, item = _processed(replica_vllm, q)
    assert lay.region_token_id == 151651 and ids.count(151651) == 1
    ((_, _, batch),) = list(group_and_batch_mm_kwargs([("image", item)], device="cpu"))
    with torch.inference_mode():
        mm = model.embed_multimodal(**batch)
        emb = model.embed_input_ids(torch.tensor(ids), mm, is_multimodal=mask)
    assert emb.shape == (len(ids), 64) and torch.isfinite(emb).all()
    assert torch.equal(emb[ids.index(151651)], mm[0][-1])  # the region vector, not a table row
