"""DA3's DINOv2-style ViT: per-view attention in early blocks, then alternating per-view / cross-view
(all frames' tokens in one sequence) attention, with a camera token in slot 0 of every view.

Token layout per view: [camera/cls token, patch tokens...]. From `alt_start` the cls slot carries a
camera token: a learnt "reference" token for view 0 and a learnt "source" token for the others
(or tokens from the camera encoder when poses are given). With three or more views and no given
poses, the view whose class token is the most "balanced" is moved to the front just before that
(so it becomes the reference camera) and the outputs are put back in input order.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.geometry.da3.config import BackboneConfig
from model.geometry.da3.layers import Block, Rope2D

_MIN_VIEWS_FOR_REFERENCE_CHOICE = 3


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if cfg.alt_start != -1:
            self.camera_token = nn.Parameter(torch.zeros(1, 2, d))  # [reference, source]
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, d))
        self.rope = Rope2D(cfg.rope_freq) if cfg.rope_start != -1 else None
        self.blocks = nn.ModuleList(
            Block(
                d, cfg.num_heads, cfg.mlp_ratio, ls_init=1.0, ln_eps=1e-6, ffn=cfg.ffn,
                qk_norm=cfg.qknorm_start != -1 and i >= cfg.qknorm_start,
                rope=self.rope if cfg.rope_start != -1 and i >= cfg.rope_start else None,
            )
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d)

    def _pos_embed(self, gh: int, gw: int, dtype: torch.dtype) -> torch.Tensor:
        """The learnt square grid resampled (bicubic) to gh x gw patches, cls entry first."""
        pe = self.pos_embed
        m = int(math.isqrt(pe.shape[1] - 1))
        if gh == gw == m:
            return pe
        grid = pe[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
        # DINOv2 resamples with a scale factor nudged by 0.1 patch (its published weights were
        # trained that way); the output size is still gh x gw.
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([pe[:, :1].float(), grid], dim=1).to(dtype)

    def _positions(self, gh: int, gw: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE positions [1 + gh*gw, 2] for per-view blocks (row+1, col+1; 0 for the token slot) and for
        cross-view blocks (every patch at (1, 1): no positional bias across views)."""
        rows, cols = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
        local = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1) + 1
        zero = torch.zeros(1, 2, dtype=local.dtype, device=device)
        return torch.cat([zero, local]), torch.cat([zero, torch.ones_like(local)])

    @staticmethod
    def choose_reference(x: torch.Tensor) -> torch.Tensor:
        """Per batch item, the view whose class token is closest to the middle of the views' ranges in
        mean similarity to the others, norm and variance [B]."""
        cls = x[:, :, 0]
        unit = cls / cls.norm(dim=-1, keepdim=True)
        s = x.shape[1]
        sim = (unit @ unit.transpose(1, 2) - torch.eye(s, device=x.device)).sum(-1) / (s - 1)

        def spread(v: torch.Tensor) -> torch.Tensor:
            lo, hi = v.min(dim=1, keepdim=True).values, v.max(dim=1, keepdim=True).values
            return ((v - lo) / (hi - lo + 1e-8) - 0.5).abs()

        return (spread(sim) + spread(cls.norm(dim=-1)) + spread(unit.var(dim=-1))).argmin(dim=1)

    @staticmethod
    def _front_order(ref: torch.Tensor, s: int) -> torch.Tensor:
        """Per batch item, the view order with `ref` first and the rest in input order [B, S]."""
        idx = torch.arange(s, device=ref.device).expand(len(ref), s)
        shifted = torch.where(idx <= ref[:, None], idx - 1, idx)
        shifted[:, 0] = ref
        return shifted

    def forward(
        self, images: torch.Tensor, cam_token: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """images [B, S, 3, H, W] (normalised) -> per output layer (patch features [B, S, N, C'],
        camera token [B, S, C']) with C' = 2C when cat_token."""
        cfg = self.cfg
        b, s, _, h, w = images.shape
        gh, gw = h // cfg.patch_size, w // cfg.patch_size
        tok = self.patch_embed(images.flatten(0, 1))
        tok = torch.cat([self.cls_token.expand(len(tok), -1, -1), tok], dim=1)
        x = (tok + self._pos_embed(gh, gw, tok.dtype)).view(b, s, 1 + gh * gw, -1)
        pos_local, pos_global = self._positions(gh, gw, x.device)
        pos_global = pos_global.repeat(s, 1)

        order = None  # view permutation applied (reference first), undone on the outputs
        local = x
        outputs = []
        for i, blk in enumerate(self.blocks):
            alternating = cfg.alt_start != -1 and i >= cfg.alt_start
            if cfg.alt_start != -1 and i == cfg.alt_start - 1 and s >= _MIN_VIEWS_FOR_REFERENCE_CHOICE and cam_token is None:
                order = self._front_order(self.choose_reference(x), s)
                batch = torch.arange(b, device=x.device)[:, None]
                x, local = x[batch, order], local[batch, order]
            if cfg.alt_start != -1 and i == cfg.alt_start:
                if cam_token is None:
                    cam_token = torch.cat(
                        [self.camera_token[:, :1].expand(b, 1, -1), self.camera_token[:, 1:].expand(b, s - 1, -1)], dim=1
                    )
                x = torch.cat([cam_token[:, :, None].to(x.dtype), x[:, :, 1:]], dim=2)
            use_rope = self.rope is not None and i >= cfg.rope_start
            if alternating and i % 2 == 1:  # cross-view: one sequence per batch item
                x = blk(x.reshape(b, -1, x.shape[-1]), pos_global if use_rope else None).view_as(x)
            else:
                x = blk(x.flatten(0, 1), pos_local if use_rope else None).view_as(x)
                local = x
            if i in cfg.out_layers:
                out = torch.cat([local, x], dim=-1) if cfg.cat_token else x
                if order is not None:
                    out = out[torch.arange(b, device=x.device)[:, None], torch.argsort(order, dim=1)]
                outputs.append(out)
        d = cfg.embed_dim
        feats = []
        for out in outputs:
            token = out[:, :, 0]
            # The per-view half goes out un-normalised; the head has its own LayerNorm.
            normed = torch.cat([out[..., :d], self.norm(out[..., d:])], dim=-1) if cfg.cat_token else self.norm(out)
            feats.append((normed[:, :, 1:], token))
        return feats
