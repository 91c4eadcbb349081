"""DA3's dual DPT head: four backbone layers -> a feature pyramid -> depth + confidence (main branch).

The checkpoint also holds an auxiliary branch (per-pixel rays) with its own fusion chain. Poses come
from the camera decoder here, so the ray branch is loaded (the key layout stays exact) but never run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.geometry.da3.config import HeadConfig

_HIDDEN = 32  # width of the last conv before the output projection (fixed in the official head)


def _up(x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    if size is None:
        size = (x.shape[-2] * 2, x.shape[-1] * 2)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def uv_embedding(c: int, h: int, w: int, aspect: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embedding [c, h, w] of pixel-centre coordinates in a frame whose diagonal spans 2
    (aspect = W/H of the image): u's embedding in the first c/2 channels, v's in the rest."""
    diag = (aspect**2 + 1.0) ** 0.5
    sx, sy = aspect / diag, 1.0 / diag
    u = torch.linspace(-sx * (w - 1) / w, sx * (w - 1) / w, w, device=device)
    v = torch.linspace(-sy * (h - 1) / h, sy * (h - 1) / h, h, device=device)

    def sincos(p: torch.Tensor, dim: int) -> torch.Tensor:
        omega = 1.0 / 100.0 ** (torch.arange(dim // 2, device=device, dtype=torch.float32) / (dim / 2.0))
        ang = p[:, None] * omega
        return torch.cat([ang.sin(), ang.cos()], dim=-1)  # [n, dim]

    eu = sincos(u, c // 2)[None].expand(h, w, -1)
    ev = sincos(v, c // 2)[:, None].expand(h, w, -1)
    return torch.cat([eu, ev], dim=-1).permute(2, 0, 1).to(dtype)


class ResidualConvUnit(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """(top + RCU(lateral)) -> RCU -> 2x (or to `size`) bilinear -> 1x1 conv."""

    def __init__(self, c: int, lateral: bool = True) -> None:
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(c) if lateral else None
        self.resConfUnit2 = ResidualConvUnit(c)
        self.out_conv = nn.Conv2d(c, c, 1)

    def forward(self, top: torch.Tensor, lateral: torch.Tensor | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
        if lateral is not None and self.resConfUnit1 is not None:
            top = top + self.resConfUnit1(lateral)
        return self.out_conv(_up(self.resConfUnit2(top), size))


class Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def dpt_pyramid(cfg: HeadConfig) -> tuple[nn.ModuleList, nn.ModuleList, nn.Module]:
    """What every DPT head here builds first, under the official parameter names: the 1x1 projections
    of the four backbone layers, their resizes (strides x4, x2, x1, /2 relative to the patch grid), and
    the `scratch` module holding the `layer{i}_rn` convolutions (the caller adds its fusion blocks and
    output convolutions to it)."""
    f, oc = cfg.features, cfg.out_channels
    projects = nn.ModuleList(nn.Conv2d(cfg.dim_in, o, 1) for o in oc)
    resize_layers = nn.ModuleList([
        nn.ConvTranspose2d(oc[0], oc[0], 4, stride=4), nn.ConvTranspose2d(oc[1], oc[1], 2, stride=2),
        nn.Identity(), nn.Conv2d(oc[3], oc[3], 3, stride=2, padding=1),
    ])
    scratch = nn.Module()
    for i, o in enumerate(oc, start=1):
        setattr(scratch, f"layer{i}_rn", nn.Conv2d(o, f, 3, 1, 1, bias=False))
    return projects, resize_layers, scratch


class DualDPT(nn.Module):
    def __init__(self, cfg: HeadConfig, patch_size: int = 14) -> None:
        super().__init__()
        self.patch_size = patch_size
        f = cfg.features
        self.norm = nn.LayerNorm(cfg.dim_in)
        self.projects, self.resize_layers, s = dpt_pyramid(cfg)
        for suffix in ("", "_aux"):
            for i in range(1, 5):
                setattr(s, f"refinenet{i}{suffix}", FusionBlock(f, lateral=i != 4))
        s.output_conv1 = nn.Conv2d(f, f // 2, 3, 1, 1)
        s.output_conv2 = nn.Sequential(nn.Conv2d(f // 2, _HIDDEN, 3, 1, 1), nn.ReLU(), nn.Conv2d(_HIDDEN, cfg.output_dim, 1))
        # Ray branch: loaded for key compatibility, not run (see module docstring).
        convs = {5: [(f, f // 2), (f // 2, f), (f, f // 2), (f // 2, f), (f, f // 2)], 3: [(f, f // 2), (f // 2, f), (f, f // 2)],
                 1: [(f, f // 2)]}[cfg.aux_out1_conv_num]
        s.output_conv1_aux = nn.ModuleList(
            nn.Sequential(*(nn.Conv2d(a, b, 3, 1, 1) for a, b in convs)) for _ in range(cfg.aux_pyramid_levels)
        )
        s.output_conv2_aux = nn.ModuleList(
            nn.Sequential(nn.Conv2d(f // 2, _HIDDEN, 3, 1, 1), Permute(0, 2, 3, 1), nn.LayerNorm(_HIDDEN),
                          Permute(0, 3, 1, 2), nn.ReLU(), nn.Conv2d(_HIDDEN, 7, 1))
            for _ in range(cfg.aux_pyramid_levels)
        )
        self.scratch = s

    def _pos(self, x: torch.Tensor, aspect: float) -> torch.Tensor:
        return x + 0.1 * uv_embedding(x.shape[1], x.shape[2], x.shape[3], aspect, x.device, x.dtype)

    def forward_frames(self, feats: list[torch.Tensor], h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """feats: 4 x [N, P, C] patch tokens of N frames -> depth [N, h', w'], confidence [N, h', w']
        at the patch grid's pixel size (h' = h // patch * patch)."""
        ph, pw = h // self.patch_size, w // self.patch_size
        aspect = w / h
        pyr = []
        for i, t in enumerate(feats):
            x = self.norm(t).transpose(1, 2).reshape(len(t), -1, ph, pw)
            x = self._pos(self.projects[i](x), aspect)
            pyr.append(self.resize_layers[i](x))
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i + 1}_rn")(p) for i, p in enumerate(pyr))
        out = s.refinenet4(l4, size=l3.shape[2:])
        out = s.refinenet3(out, l3, size=l2.shape[2:])
        out = s.refinenet2(out, l2, size=l1.shape[2:])
        out = s.output_conv1(s.refinenet1(out, l1))
        out = _up(out, (ph * self.patch_size, pw * self.patch_size))
        logits = s.output_conv2(self._pos(out, aspect))
        return logits[:, 0].exp(), logits[:, -1].exp() + 1.0

    def forward(self, feats: list[torch.Tensor], h: int, w: int, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """feats: 4 x [B, S, P, C] -> depth, confidence [B, S, h', w'], `chunk` frames at a time (the
        full-resolution maps dominate memory)."""
        b, sv = feats[0].shape[:2]
        flat = [f.flatten(0, 1) for f in feats]
        parts = [self.forward_frames([f[i : i + chunk] for f in flat], h, w) for i in range(0, b * sv, chunk)]
        depth = torch.cat([p[0] for p in parts]).view(b, sv, *parts[0][0].shape[1:])
        conf = torch.cat([p[1] for p in parts]).view(b, sv, *parts[0][1].shape[1:])
        return depth, conf
