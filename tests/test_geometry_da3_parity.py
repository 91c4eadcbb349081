"""Parity of the in-house Depth Anything 3 port (model/geometry/da3) with the official network.

We computed the numbers in tests/data/da3_parity.json once, outside this repository, by running the
upstream network code; which repository and commit is recorded in that file's `official` entry. Its `src/`
was put on sys.path in a throwaway venv (torch 2.13.0 CPU, einops, addict, omegaconf, safetensors); none
of that code is in this repository. The run used exactly the tiny checkpoint `build_tiny_da3(dir, seed=0)`
writes:

- The official modules were built at the tiny sizes of the checkpoint's config.json:
  `DinoV2(name="vits", out_layers=[2,3,4,5], alt_start=2, qknorm_start=2, rope_start=2, cat_token=True)`
  with `.pretrained` replaced by `DinoVisionTransformer(img_size=112, patch_size=14, embed_dim=32,
  depth=6, num_heads=2, mlp_ratio=4, ffn_layer="mlp", <same alt/qknorm/rope/cat_token>)`,
  `DualDPT(dim_in=64, output_dim=2, features=16, out_channels=[8,16,32,32])`, `CameraDec(dim_in=64)`,
  `CameraEnc(dim_out=32, num_heads=2, trunk_depth=2)`, all inside `DepthAnything3Net`, wrapped as
  `.model` and loaded from model.safetensors with `load_state_dict(strict=True)` (so the key names
  are exactly the official ones).
- Inputs: `_images(seed, views, h, w)` below (uint8 from numpy's default_rng, ImageNet-normalised),
  batch 1, float32, no autocast; `DepthAnything3Net.forward(x)` with the default reference-view
  strategy (saddle_balanced), and for the last case `forward(x, w2c, K)` with `_given_cameras`.
- Stored: camera-to-world poses (inverse of the official world-to-camera output), intrinsics,
  per-view depth/confidence mean/std/min/max and every 7th pixel of both maps.

The pre-processing (frames -> the network's input) has its own reference, the file's `preprocessing`
entry: the official `InputProcessor` (src/depth_anything_3/utils/io/input_processor.py, same commit, called
unchanged with process_res=504, "upper_bound_resize") run in another throwaway venv (its versions are
recorded there: OpenCV 4.x and numpy<2, as the official pyproject allows) on seeded uint8 frames of real
frame sizes. 1280x800 (16:10) is the rounding tie: the long side to 504 gives 315 rows, 7 past a multiple of
14, which the official code rounds UP to 322 (Python's round-half-even gave 308); 1296x968 (ScanNet) shrinks
then enlarges (376 -> 378: INTER_AREA, then INTER_CUBIC); 320x240 enlarges only. Stored: the output's size,
its pixels back in uint8 (sha256, every 13th pixel, mean) and sums of the normalised tensor.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.geometry.da3 import build_tiny_da3, load_da3
from model.geometry.da3.preprocess import network_size, normalise, resize_frames

DATA = json.loads((Path(__file__).parent / "data" / "da3_parity.json").read_text())
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _images(seed: int, s: int, h: int, w: int) -> torch.Tensor:
    u8 = np.random.default_rng(seed).integers(0, 256, size=(s, h, w, 3), dtype=np.uint8)
    x = (u8.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(x).permute(0, 3, 1, 2)[None].contiguous()


def _given_cameras(s: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    c2w = np.tile(np.eye(4), (s, 1, 1))
    for i, a in enumerate(np.linspace(0, 0.3, s)):
        c2w[i, :3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
        c2w[i, :3, 3] = [0.1 * i, -0.05 * i, 0.02 * i]
    K = np.tile(np.array([[0.9 * w, 0, w / 2], [0, 0.9 * w, h / 2], [0, 0, 1.0]]), (s, 1, 1))
    return c2w, K


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    d = tmp_path_factory.mktemp("da3-tiny")
    build_tiny_da3(d)
    digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    assert digest == DATA["weights_sha256"], "build_tiny_da3 no longer writes the weights the reference was made with"
    return load_da3(d)


@pytest.mark.parametrize("case", DATA["cases"], ids=[c["name"] for c in DATA["cases"]])
def test_port_matches_official(net, case):
    x = _images(case["seed"], case["views"], case["height"], case["width"])
    if case["cameras"]:
        c2w_in, K_in = _given_cameras(case["views"], case["height"], case["width"])
        out = net(x, torch.from_numpy(c2w_in).float()[None], torch.from_numpy(K_in).float()[None])
    else:
        out = net(x)
    depth, conf = out.depth[0].numpy(), out.conf[0].numpy()
    assert list(depth.shape) == case["depth_shape"]
    np.testing.assert_allclose(out.c2w[0].double().numpy(), case["c2w"], atol=2e-5)
    np.testing.assert_allclose(out.intrinsics[0].double().numpy(), case["intrinsics"], rtol=2e-5)
    np.testing.assert_allclose(depth[:, ::7, ::7], case["depth_sub"], rtol=2e-5)
    np.testing.assert_allclose(conf[:, ::7, ::7], case["conf_sub"], rtol=2e-5)
    for stat, ref in (("mean", "depth_mean"), ("std", "depth_std"), ("min", "depth_min"), ("max", "depth_max")):
        np.testing.assert_allclose(getattr(depth, stat)((1, 2)), case[ref], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(conf.mean((1, 2)), case["conf_mean"], rtol=2e-5)
    np.testing.assert_allclose(conf.std((1, 2)), case["conf_std"], rtol=2e-5, atol=1e-7)


def test_official_preset_layout_loads(tmp_path):
    """A directory in the published form (config.json naming only the preset, weights under the
    official key names) loads with the preset's architecture: DA3-Small here (random weights)."""
    import json as _json

    from model.geometry.da3 import build_random_da3, load_config

    build_random_da3(tmp_path, "da3-small")
    assert _json.loads((tmp_path / "config.json").read_text()) == {"model_name": "da3-small"}
    cfg = load_config(tmp_path)
    assert (cfg.backbone.embed_dim, cfg.backbone.depth, cfg.backbone.alt_start, cfg.head.dim_in) == (384, 12, 4, 768)
    net = load_da3(tmp_path)
    out = net(_images(0, 2, 28, 42))
    assert out.depth.shape == (1, 2, 28, 42) and torch.isfinite(out.depth).all()
    (tmp_path / "config.json").write_text(_json.dumps({"model_name": "da3mono-large"}))
    with pytest.raises(ValueError, match="not a multi-view DA3 preset"):
        load_config(tmp_path)


def test_missing_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    build_tiny_da3(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.cam_dec.fc_t.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_da3(tmp_path)


PRE = DATA["preprocessing"]


@pytest.mark.parametrize("case", PRE["cases"], ids=[c["name"] for c in PRE["cases"]])
def test_preprocessing_matches_official(case):
    frames = np.random.default_rng(case["seed"]).integers(0, 256, size=(case["views"], case["height"], case["width"], 3),
                                                         dtype=np.uint8)
    assert list(network_size(case["height"], case["width"], case["process_res"])) == case["net_shape"]
    u8 = resize_frames(frames, case["process_res"])
    assert list(u8.shape[1:3]) == case["net_shape"]
    ref_sub = np.frombuffer(bytes.fromhex(case["u8_sub_hex"]), np.uint8).reshape(case["u8_sub_shape"])
    # Same OpenCV kernels on uint8: equal pixels (one grey level of slack for a different OpenCV build).
    assert np.abs(u8[:, ::13, ::13].astype(int) - ref_sub).max() <= 1
    assert u8.mean() == pytest.approx(case["u8_mean"], abs=1e-3)
    x = normalise(u8).double()
    assert list(x.shape) == [1, case["views"], 3, *case["net_shape"]]
    assert float(x.sum()) == pytest.approx(case["x_sum"], rel=1e-5, abs=1e-2)
    assert float(x.abs().sum()) == pytest.approx(case["x_abs_sum"], rel=1e-5)


def test_preprocessing_ties_round_up() -> None:
    """Issue 28: 16:10 frames hit the tie (315 rows at 504); the official code gives 322, round-half-even 308."""
    assert network_size(800, 1280, 504) == (322, 504)
    assert network_size(1280, 800, 504) == (504, 322)
    assert network_size(574, 1008, 504) == (294, 504)  # 287 -> 294 (the example)
