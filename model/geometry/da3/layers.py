"""Transformer pieces shared by the DA3 backbone and its camera encoder.

Attribute names follow the official checkpoint's keys (norm1, attn.qkv, ls1.gamma, mlp.fc1, ...), so
`load_state_dict` takes the published safetensors unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """The giant backbone's FFN: silu(a) * b from one fused projection; hidden width 2/3 of the MLP's,
    rounded up to a multiple of 8 (the checkpoint's w12/w3 shapes)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Rope2D:
    """2-D rotary position embedding: the first half of each head's channels is rotated by the token's
    row, the second half by its column (rotate-half convention, base frequency `base`). Stateless
    apart from a cos/sin table cache."""

    def __init__(self, base: float = 100.0) -> None:
        self.base = base
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, dim: int, n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dim, n, device, dtype)
        if key not in self._cache:
            inv = 1.0 / self.base ** (torch.arange(0, dim, 2, device=device).float() / dim)
            ang = (torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv).to(dtype)
            ang = torch.cat([ang, ang], dim=-1)
            table = (ang.cos(), ang.sin())
            if device.type == "cuda":  # built on this thread's stream; other threads' streams read it next
                torch.cuda.current_stream(device).synchronize()
            self._cache[key] = table
        return self._cache[key]

    @staticmethod
    def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., h:], t[..., :h]], dim=-1) * sin

    def __call__(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """t [B, heads, N, d]; pos int [B, N, 2] (row, column) or [N, 2] (same for all)."""
        half = t.shape[-1] // 2
        cos, sin = self._table(half, int(pos.max()) + 1, t.device, t.dtype)
        if pos.dim() == 2:
            pos = pos[None]
        rows = (cos[pos[..., 0]][:, None], sin[pos[..., 0]][:, None])
        cols = (cos[pos[..., 1]][:, None], sin[pos[..., 1]][:, None])
        return torch.cat([self._rotate(t[..., :half], *rows), self._rotate(t[..., half:], *cols)], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, rope: Rope2D | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block with layer scale."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, ls_init: float, ln_eps: float,
        ffn: str = "mlp", qk_norm: bool = False, rope: Rope2D | None = None,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, rope=rope)
        self.ls1 = LayerScale(dim, ls_init)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = SwiGLU(dim, hidden) if ffn == "swiglu" else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim, ls_init)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos))
        return x + self.ls2(self.mlp(self.norm2(x)))
