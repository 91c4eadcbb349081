"""DA3 camera decoder (camera token -> pose encoding) and encoder (known poses -> camera tokens).

Pose encoding (9 numbers per view): camera-to-world translation (3), rotation quaternion (x, y, z, w;
scalar last) (4), vertical and horizontal field of view in radians (2). The principal point is the
image centre.
"""
from __future__ import annotations

import torch
from torch import nn

from model.geometry.da3.config import CameraConfig
from model.geometry.da3.layers import Block, Mlp


def quat_to_rotation(q: torch.Tensor) -> torch.Tensor:
    """Quaternions [..., 4] (x, y, z, w; any norm) -> rotation matrices [..., 3, 3]."""
    x, y, z, w = q.unbind(-1)
    s = 2.0 / (q * q).sum(-1)
    rows = [
        1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
        s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
        s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
    ]
    return torch.stack(rows, -1).view(*q.shape[:-1], 3, 3)


def rotation_to_quat(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] -> unit quaternions (x, y, z, w) with w >= 0. Each of the four
    component formulas divides by its own magnitude: the largest one is the numerically safe choice."""
    m = R.reshape(*R.shape[:-2], 9)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.unbind(-1)
    four = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    mag = four.clamp_min(0).sqrt()  # 2|w|, 2|x|, 2|y|, 2|z|
    cand = torch.stack([
        torch.stack([m21 - m12, m02 - m20, m10 - m01, mag[..., 0] ** 2], -1),
        torch.stack([mag[..., 1] ** 2, m10 + m01, m02 + m20, m21 - m12], -1),
        torch.stack([m10 + m01, mag[..., 2] ** 2, m12 + m21, m02 - m20], -1),
        torch.stack([m02 + m20, m12 + m21, mag[..., 3] ** 2, m10 - m01], -1),
    ], -2) / (2 * mag.clamp_min(0.1))[..., None]
    best = mag.argmax(-1)
    q = torch.gather(cand, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    return torch.where(q[..., 3:4] < 0, -q, q)


def decode_pose(enc: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose encoding [..., 9] -> camera-to-world [..., 4, 4] and intrinsics [..., 3, 3] for an h x w image."""
    R = quat_to_rotation(enc[..., 3:7])
    c2w = torch.zeros(*enc.shape[:-1], 4, 4, dtype=enc.dtype, device=enc.device)
    c2w[..., :3, :3] = R
    c2w[..., :3, 3] = enc[..., :3]
    c2w[..., 3, 3] = 1
    K = torch.zeros(*enc.shape[:-1], 3, 3, dtype=enc.dtype, device=enc.device)
    K[..., 0, 0] = (w / 2.0) / torch.tan(enc[..., 8] / 2.0).clamp_min(1e-6)
    K[..., 1, 1] = (h / 2.0) / torch.tan(enc[..., 7] / 2.0).clamp_min(1e-6)
    K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = w / 2.0, h / 2.0, 1.0
    return c2w, K


def encode_pose(c2w: torch.Tensor, K: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `decode_pose` (principal point dropped)."""
    fov_h = 2 * torch.atan((h / 2) / K[..., 1, 1])
    fov_w = 2 * torch.atan((w / 2) / K[..., 0, 0])
    return torch.cat([c2w[..., :3, 3], rotation_to_quat(c2w[..., :3, :3]), fov_h[..., None], fov_w[..., None]], -1).float()


class CameraDec(nn.Module):
    """Camera token [B, S, C] -> pose encoding [B, S, 9]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.fc_t = nn.Linear(dim, 3)
        self.fc_qvec = nn.Linear(dim, 4)
        self.fc_fov = nn.Sequential(nn.Linear(dim, 2), nn.ReLU())

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        f = self.backbone(token).float()
        return torch.cat([self.fc_t(f), self.fc_qvec(f), self.fc_fov(f)], dim=-1)


class CameraEnc(nn.Module):
    """Known cameras (camera-to-world [B, S, 4, 4], intrinsics [B, S, 3, 3]) -> camera tokens [B, S, C]
    that replace the learnt reference/source tokens in the backbone."""

    def __init__(self, cfg: CameraConfig) -> None:
        super().__init__()
        d = cfg.enc_dim_out
        self.pose_branch = Mlp(9, d // 2, d)
        self.token_norm = nn.LayerNorm(d)
        self.trunk = nn.Sequential(*(
            Block(d, cfg.enc_num_heads, cfg.enc_mlp_ratio, ls_init=0.01, ln_eps=1e-5) for _ in range(cfg.enc_trunk_depth)
        ))
        self.trunk_norm = nn.LayerNorm(d)

    def forward(self, c2w: torch.Tensor, K: torch.Tensor, h: int, w: int) -> torch.Tensor:
        t = self.token_norm(self.pose_branch(encode_pose(c2w, K, h, w)))
        return self.trunk_norm(self.trunk(t))
