"""The depth backend's input side: the HF processor on the device tensor, the processor-size knob."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.geometry import DepthAnythingBackend, build_tiny_depth_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.set_num_threads(1)
    return build_tiny_depth_model(str(tmp_path_factory.mktemp("depth")), input_size=112)


def test_preprocess_is_the_hf_processor_on_uint8_tensors(model_dir: str) -> None:
    """Frames go to the device as uint8 and the processor works on that tensor (its torchvision
    backend runs where the tensor is): the same pixel values as the processor on the numpy frames."""
    from transformers.image_processing_backends import TorchvisionBackend

    b = DepthAnythingBackend(model_dir, device="cpu")
    assert isinstance(b.processor, TorchvisionBackend)  # a PIL/numpy processor would ignore `device=`
    frames = np.random.default_rng(0).integers(0, 255, (3, 48, 64, 3), dtype=np.uint8)
    got = b.preprocess(torch.from_numpy(frames).permute(0, 3, 1, 2))
    want = b.processor(images=list(frames), return_tensors="pt")["pixel_values"]
    assert got.dtype == b.dtype and got.shape == want.shape == (3, 3, 84, 112)  # keep aspect, multiple of 14
    torch.testing.assert_close(got, want.to(b.dtype), rtol=0, atol=1e-5)


def test_input_size_shrinks_the_network_input_keeping_aspect(model_dir: str) -> None:
    b = DepthAnythingBackend(model_dir, device="cpu", input_size=56)
    frames = np.random.default_rng(1).integers(0, 255, (2, 48, 64, 3), dtype=np.uint8)
    pixels = b.preprocess(torch.from_numpy(frames).permute(0, 3, 1, 2))
    assert pixels.shape == (2, 3, 42, 56)
    want = b.processor(images=list(frames), return_tensors="pt", size={"height": 56, "width": 56})["pixel_values"]
    torch.testing.assert_close(pixels, want, rtol=0, atol=1e-5)
    pm = b.compute(frames)  # the maps still come back at the frames' size
    assert pm.points.shape == (2, 48, 64, 3) and np.isfinite(pm.points).all()
