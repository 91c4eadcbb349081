"""The vLLM model class on CPU: flat weights load completely, and `embed_multimodal` on a batch of processed
items equals the model core's embeddings at the image and region slots.

Without a GPU vLLM's platform is "unspecified" and has no attention backend to name when the Qwen2 layers
are *constructed*; the test hands it FlexAttention's class for that only. The LLM forward is not run here
(tests/gpu compares generated tokens on a GPU); the vision tower, 3D-PE, projector and regions are.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vllm (extra `vllm`) is not installed: the plugin cannot be exercised")
pytestmark = pytest.mark.vllm

from model.inputs import RegionMask, SpatialQuery  # noqa: E402


@pytest.fixture(scope="module")
def vllm_model(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch_module):  # type: ignore[no-untyped-def]
    from tests.vllm_support import cpu_vllm_model

    with cpu_vllm_model(tiny_checkpoint, tmp_path_factory.mktemp("vllm-model"), monkeypatch_module) as built:
        yield built


@pytest.fixture(scope="module")
def monkeypatch_module():  # type: ignore[no-untyped-def]
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_flat_weights_load_every_parameter(vllm_model) -> None:  # type: ignore[no-untyped-def]
    model = vllm_model["model"]
    assert {n for n, _ in model.named_parameters()} - vllm_model["loaded"] == set()


def test_embed_multimodal_equals_model_core(vllm_model, tiny_model) -> None:  # type: ignore[no-untyped-def]
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import ProcessorInputs, TimingContext
    from vllm.multimodal.utils import group_and_batch_mm_kwargs

    from model.prompt import layout_query
    from model.vllm_plugin.processing import prepare_item

    rng = np.random.default_rng(0)
    vid = rng.integers(0, 255, (4, 120, 160, 3), np.uint8)
    pts = rng.normal(size=(4, 120, 160, 3)).astype(np.float32)
    m0, m1 = np.zeros((120, 160), bool), np.zeros((120, 160), bool)
    m0[10:50, 10:60] = True
    m1[60:100, 90:150] = True
    queries = [
        SpatialQuery(vid, "Is <region1> left of <region0>? Where is <region1>?",
                     [[RegionMask(0, m0)], [RegionMask(2, m1)]], pointmaps=pts, is_video=True),
        SpatialQuery(rng.integers(0, 255, (1, 300, 760, 3), np.uint8), "Describe the scene."),
    ]
    proc = MULTIMODAL_REGISTRY.create_processor(vllm_model["model_config"])
    cfg, tok = proc.info.get_hf_config(), proc.info.get_tokenizer()
    items = []
    for q in queries:
        _, lay = layout_query(q, tok, cfg, context=1 << 20)
        mm = proc.info.parse_mm_data({"image": prepare_item(q, lay.region_order, cfg)})
        items.append(("image", proc.apply(ProcessorInputs(lay.input_ids, mm, None), TimingContext(enabled=False))["mm_kwargs"]["image"][0]))
    # both items in one encoder batch, as vLLM's model runner does
    ((_, num, batch),) = list(group_and_batch_mm_kwargs(items, device="cpu"))
    assert num == 2
    with torch.inference_mode():
        got = vllm_model["model"].embed_multimodal(**batch)
    assert len(got) == 2
    for q, emb in zip(queries, got):
        p = tiny_model.prepare(q)
        ids = torch.tensor(p.input_ids)
        slots = (ids == p.layout.image_token_id) | (ids == p.layout.region_token_id)
        with torch.inference_mode():
            ref = tiny_model.embed(p)[slots]
        torch.testing.assert_close(emb, ref, rtol=1e-5, atol=1e-5)
