"""Which floating-point type the VLM computes in (SR3D_MODEL_DTYPE).

NVIDIA runs NVILA inference in float16: NVlabs/VILA `llava/model/builder.py` (`load_pretrained_model`
sets `torch_dtype=torch.float16` and casts the vision tower and projector to float16) and the HF remote code
NVILA checkpoints ship (`modeling_vila.py` `post_config` casts llm, mm_projector and vision_tower to
float16; `generate_content` feeds `.half()` images). The weights are stored in bfloat16. So `auto` on a GPU is
float16, the dtype NVIDIA's own answers (and published scores) come from; bfloat16 (the stored type, a wider
exponent: no overflow above 65504) and float32 stay available. On a CPU `auto` is float32: VILA's code
does not run there (`.cuda()`), and half-precision matmuls on CPUs are slow or missing.
"""
from __future__ import annotations

from typing import Literal

import torch

ModelDtype = Literal["auto", "float16", "bfloat16", "float32"]
# NVILA's inference dtype in NVIDIA's code (see the module doc); tests/data/vila_parity.json records it too.
OFFICIAL_GPU_DTYPE = torch.float16


def resolve_model_dtype(setting: str, device: str | torch.device) -> torch.dtype:
    """`auto` -> float16 on CUDA (NVIDIA's), float32 elsewhere; a named dtype is taken as given."""
    if setting == "auto":
        return OFFICIAL_GPU_DTYPE if str(device).startswith("cuda") else torch.float32
    if setting not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"model dtype must be auto, float16, bfloat16 or float32, not {setting!r}")
    return getattr(torch, setting)
