"""SR-3D's 3D positional encoding: sinusoidal(xyz) -> point-wise MLP, added to SigLIP patch features.

[I] Added to the vision features of each 14×14 patch (1152-d, before the projector) so that region features
pooled from the same map carry it too. The last Linear starts at zero: an untrained (or absent) 3D-PE leaves
the model exactly NVILA (2D behaviour). Patches without any valid point get 0.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def pool_points_to_patches(points: torch.Tensor, valid: torch.Tensor, patch: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    """points [T, S, S, 3], valid [T, S, S] -> (mean valid point per patch [T, N, 3], any-valid [T, N])."""
    t, s, _, _ = points.shape
    w = valid.to(points.dtype).unsqueeze(1)  # [T, 1, S, S]
    num = F.avg_pool2d(points.permute(0, 3, 1, 2) * w, patch)  # [T, 3, n, n]; avg/avg = masked mean
    den = F.avg_pool2d(w, patch)
    ok = den > 0
    mean = torch.where(ok, num / den.clamp_min(1e-12), torch.zeros_like(num))
    n = s // patch
    return mean.permute(0, 2, 3, 1).reshape(t, n * n, 3), ok.reshape(t, n * n)


def sinusoidal_3d(xyz: torch.Tensor, num_freqs: int, temperature: float, scale: float) -> torch.Tensor:
    """[..., 3] -> [..., 6 * num_freqs]: per axis sin/cos at geometrically spaced frequencies."""
    k = torch.arange(num_freqs, device=xyz.device, dtype=torch.float32)
    freqs = scale / (float(temperature) ** (k / num_freqs))
    ang = xyz.float().unsqueeze(-1) * freqs  # [..., 3, F]
    return torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(-2)


class PositionEncoding3D(nn.Module):
    def __init__(self, vision_dim: int, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.num_freqs = int(cfg["num_freqs"])
        self.temperature = float(cfg["temperature"])
        self.scale = float(cfg["scale"])
        hidden = int(cfg.get("mlp_hidden") or vision_dim)
        self.mlp = nn.Sequential(nn.Linear(6 * self.num_freqs, hidden), nn.GELU(), nn.Linear(hidden, vision_dim))
        self.reset_output()

    def reset_output(self) -> None:
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, patch_points: torch.Tensor, patch_valid: torch.Tensor) -> torch.Tensor:
        """[T, N, 3], [T, N] -> [T, N, vision_dim] (0 where no valid point)."""
        w = self.mlp[0].weight
        enc = sinusoidal_3d(patch_points, self.num_freqs, self.temperature, self.scale).to(w.dtype)
        return self.mlp(enc) * patch_valid.unsqueeze(-1).to(w.dtype)
