"""NVILA's `mlp_downsample_3x3_fix` projector with NVILA's exact state-dict keys.

`layers.0` is the parameter-free 3×3 space-to-channel merge, so the weights are
`layers.1` LayerNorm(9C), `layers.2` Linear(9C→3C), `layers.4` LayerNorm(3C), `layers.5` Linear(3C→H),
`layers.7` Linear(H→H) (indices 3 and 6 are GELUs) — the keys in NVILA's `mm_projector/model.safetensors`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from model.config import SR3DConfig


class SpaceToChannel3x3(nn.Module):
    """[T, n*n, C] -> [T, ceil(n/3)^2, 9C]: zero-pad the grid's bottom/right edge to a multiple of 3, then
    stack each 3×3 cell's features. Channel order (row offset, col offset, C) matches NVILA's flat_square_3x3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, n, c = x.shape
        side = math.isqrt(n)
        g = math.ceil(side / 3)
        x = x.reshape(t, side, side, c)
        pad = 3 * g - side
        if pad:
            x = nn.functional.pad(x, (0, 0, 0, pad, 0, pad))
        x = x.reshape(t, g, 3, g, 3, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(t, g * g, 9 * c)


class MultimodalProjector(nn.Module):
    def __init__(self, config: SR3DConfig) -> None:
        super().__init__()
        kind = config.mm_projector_cfg.get("mm_projector_type", "mlp_downsample_3x3_fix")
        if kind != "mlp_downsample_3x3_fix":
            raise ValueError(f"unsupported mm_projector_type {kind!r}; SR-3D/NVILA-Lite uses mlp_downsample_3x3_fix")
        c, h = config.vision_hidden_size, config.hidden_size
        self.layers = nn.Sequential(
            SpaceToChannel3x3(),
            nn.LayerNorm(9 * c),
            nn.Linear(9 * c, 3 * c),
            nn.GELU(),
            nn.LayerNorm(3 * c),
            nn.Linear(3 * c, h),
            nn.GELU(),
            nn.Linear(h, h),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [T, N, C] (N = 32×32 patches of a 448 tile) -> [T, 121, hidden]."""
        return self.layers(features)
