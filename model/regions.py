"""Region extractor: stitched-feature soft mask pooling + region projector (SR-3D, no deconv refinement).

For each frame, the tile features (thumbnail excluded) and the tile masks are stitched back into one map in
the original tile order (row-major), the mask is area-averaged down to the feature grid (one value per 14×14
patch = its mask coverage), and the region vector is the coverage-weighted mean of the features over every
frame that carries the region's mask [I]. One vector per region -> MLP (vision -> LLM hidden) -> it replaces
that region's `<region>` placeholder embedding.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.errors import ModelInputError

Grid = tuple[int, int, bool]


def _stitch(x: torch.Tensor, cols: int, rows: int) -> torch.Tensor:
    """[rows*cols, h, w, C] row-major tiles -> [rows*h, cols*w, C]."""
    _, h, w, c = x.shape
    return x.reshape(rows, cols, h, w, c).permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def stitched_maps(features: torch.Tensor, region_tiles: torch.Tensor, grids: Sequence[Grid]):
    """Yield (feature map [Hf, Wf, C], mask coverage [Hf, Wf]) per frame, thumbnails dropped."""
    t, n, c = features.shape
    side = math.isqrt(n)
    s = region_tiles.shape[-1]
    start = 0
    for cols, rows, thumb in grids:
        k = cols * rows
        feat = _stitch(features[start:start + k].reshape(k, side, side, c), cols, rows)
        mask = _stitch(region_tiles[start:start + k].unsqueeze(-1), cols, rows)[..., 0]
        start += k + int(thumb)
        if s % side == 0:
            cov = F.avg_pool2d(mask[None, None], s // side)[0, 0]  # exact area average
        else:
            cov = F.interpolate(mask[None, None], size=(rows * side, cols * side), mode="area")[0, 0]
        yield feat, cov
    if start != t:
        raise ValueError(f"grids describe {start} tiles, features have {t}")


def pool_region(features: torch.Tensor, region_tiles: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
    """features [T, N, C], region_tiles [T, S, S] -> [C]: soft average over all frames with the mask."""
    num = features.new_zeros(features.shape[-1], dtype=torch.float32)
    den = 0.0
    for feat, cov in stitched_maps(features, region_tiles.to(torch.float32), grids):
        total = float(cov.sum())
        if total <= 0.0:
            continue
        num += torch.einsum("hw,hwc->c", cov.to(feat.dtype), feat).float()
        den += total
    if den <= 1e-6:
        raise ModelInputError("empty_mask", "a region mask covers no vision patch after resizing")
    return (num / den).to(features.dtype)


class RegionExtractor(nn.Module):
    def __init__(self, vision_dim: int, hidden: int, cfg: dict[str, Any]) -> None:
        super().__init__()
        mid = int(cfg.get("mlp_hidden") or hidden)
        self.region_projector = nn.Sequential(nn.Linear(vision_dim, mid), nn.GELU(), nn.Linear(mid, hidden))

    def forward(self, features: torch.Tensor, region_tiles: Sequence[torch.Tensor], grids: Sequence[Grid]) -> torch.Tensor:
        """-> [R, hidden] (R may be 0)."""
        if not region_tiles:
            w = self.region_projector[2].weight
            return w.new_zeros(0, w.shape[0])
        pooled = torch.stack([pool_region(features, m.to(features.device), grids) for m in region_tiles])
        return self.region_projector(pooled.to(self.region_projector[0].weight.dtype))
