"""Depth -> camera points -> one canonical world frame -> normalised scale.

One torch implementation serves every backend on any device: the Depth Anything backend runs it on
the model's device (GPU) on float32 maps straight from the network, the RGB-D path on the CPU in
float64 (exact). Public functions accept numpy arrays or torch tensors and answer in the kind of
their first argument (numpy in, numpy out; numpy inputs are wrapped without copying).

3x3 products are written as broadcast multiply-adds rather than matmul: with K = 3 a matmul is
memory-bound anyway, and elementwise ops never run in TF32 whatever `set_float32_matmul_precision`
another part of the process chose.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

if TYPE_CHECKING:
    from model.geometry.types import PointMaps

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

_MEDIAN_SAMPLE = 1_000_000  # a strided subsample this large estimates the median to well under 0.1 %


def as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor view of `x` (no copy for contiguous, writeable numpy arrays)."""
    if isinstance(x, torch.Tensor):
        return x
    a = np.ascontiguousarray(x)  # torch cannot wrap negative strides (np.rot90 views)
    if not a.flags.writeable:  # torch warns on read-only buffers (np.broadcast_to views)
        a = a.copy()
    return torch.from_numpy(a)


def like(out: torch.Tensor, ref: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """`out` in the kind of `ref`: the tensor itself, or its numpy view (CPU tensors only)."""
    return out if isinstance(ref, torch.Tensor) else out.numpy()


def quantile(x: torch.Tensor, q: float, *, select: bool | None = None) -> torch.Tensor:
    """numpy's default ('linear') quantile of a flat, non-empty tensor, as a 0-dim tensor on its device.

    Order statistics, not torch.quantile (which refuses inputs over 16M elements): on the CPU two
    O(n) selections (kthvalue), like np.quantile's partition; on a GPU one sort, because CUDA's
    kthvalue works on each slice in one thread block (a 1-D input is one slice). `select` forces
    either way (tests)."""
    n = x.numel()
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    if select is None:
        select = x.device.type == "cpu"
    if select:
        a = x.kthvalue(lo + 1).values
        b = x.kthvalue(hi + 1).values if hi != lo else a
    else:
        s = x.sort().values
        a, b = s[lo], s[hi]
    return a + (b - a) * (pos - lo)


def _mat3_apply(M: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """M [..., 3, 3] @ p [..., 3] per point (M broadcast against p)."""
    return p[..., 0:1] * M[..., :, 0] + p[..., 1:2] * M[..., :, 1] + p[..., 2:3] * M[..., :, 2]


def backproject(depth: ArrayT, K: np.ndarray | torch.Tensor) -> ArrayT:
    """z-depth [..., H, W] and intrinsics [3, 3] or [..., 3, 3] -> OpenCV camera points [..., H, W, 3].

    X = (u - cx) z / fx, Y = (v - cy) z / fy, Z = z; u = column, v = row. Skew is honoured.
    float32 stays float32 (large maps), float64 stays exact.
    """
    d = as_tensor(depth)
    d = d.to(torch.promote_types(d.dtype, torch.float32))
    h, w = d.shape[-2:]
    # K is tiny: invert it on the CPU in float64 (no cuSOLVER start-up on the GPU, no precision loss).
    Kinv = torch.linalg.inv(as_tensor(K).detach().to("cpu", torch.float64)).to(d.device, d.dtype)
    Kinv = Kinv[..., None, None, :, :]  # [..., 1, 1, 3, 3] against pixels [H, W]
    u = torch.arange(w, device=d.device, dtype=d.dtype)[:, None]  # [W, 1]
    v = torch.arange(h, device=d.device, dtype=d.dtype)[:, None, None]  # [H, 1, 1]
    # ray = Kinv @ [u, v, 1] is separable: a per-column term plus a per-row term.
    rays = u * Kinv[..., :, 0] + (v * Kinv[..., :, 1] + Kinv[..., :, 2])
    return like(rays * d[..., None], depth)


def transform(points: ArrayT, T: np.ndarray | torch.Tensor) -> ArrayT:
    """Apply 4x4 transforms [F, 4, 4] to points [F, H, W, 3] (in the points' dtype, on their device)."""
    p = as_tensor(points)
    T = as_tensor(T).to("cpu", torch.float64)
    if torch.equal(T, torch.eye(4, dtype=T.dtype).expand_as(T)):
        return points  # the monocular case (every frame its own reference): skip a pass over the maps
    R = T[:, None, None, :3, :3].to(p.device, p.dtype)
    t = T[:, None, None, :3, 3].to(p.device, p.dtype)
    return like(_mat3_apply(R, p) + t, points)


def canonicalize(
    points_cam: ArrayT, poses: np.ndarray | torch.Tensor, reference_frame: int = 0
) -> tuple[ArrayT, ArrayT]:
    """Camera-frame points [F, H, W, 3] + camera-to-world poses [F, 4, 4] -> points and poses in the
    reference camera's frame: X_ref = T_ref^-1 T_i X_cam. Returns (points_world, poses_world); the
    poses are float64 and, for tensor input, on the CPU."""
    P = as_tensor(poses).detach().to("cpu", torch.float64)
    if not 0 <= reference_frame < len(P):
        raise ValueError(f"reference_frame {reference_frame} outside 0..{len(P) - 1}")
    poses_world = torch.linalg.inv(P[reference_frame])[None] @ P  # float64 on the CPU: exact
    p = as_tensor(points_cam)
    p = p.to(torch.promote_types(p.dtype, torch.float32))
    return like(transform(p, poses_world), points_cam), like(poses_world, points_cam)


def normalize_scale(points: ArrayT, valid: np.ndarray | torch.Tensor) -> tuple[ArrayT, float]:
    """Divide by the median norm of the valid points (robust to outliers and holes).
    Returns (points / scale, scale); scale is 1 when nothing usable is valid."""
    p = as_tensor(points)
    idx = as_tensor(valid).to(p.device).reshape(-1).nonzero().squeeze(1)
    if len(idx) > _MEDIAN_SAMPLE:
        idx = idx[:: len(idx) // _MEDIAN_SAMPLE]
    norms = p.reshape(-1, 3)[idx].to(torch.float64).square().sum(-1).sqrt()
    norms = norms[torch.isfinite(norms) & (norms > 0)]
    scale = float(quantile(norms, 0.5)) if norms.numel() else 1.0
    return like(p / scale, points), scale


def to_host(t: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array of its own. From a GPU through a pinned buffer (PyTorch's caching host
    allocator hands the same block back on the next call): on an H100 a 128 MB pageable copy took
    0.095 s, pinned + one host memcpy 0.039 s (`sr3d bench media`)."""
    if t.device.type != "cuda":
        return t.cpu().numpy()
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    staged.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return staged.numpy().copy()  # the pinned block goes back to the cache; callers may keep the array


def finalize(
    points_cam: np.ndarray | torch.Tensor,
    valid: np.ndarray | torch.Tensor,
    intrinsics: np.ndarray,
    poses: np.ndarray | torch.Tensor,
    *,
    metric: bool,
    source: str,
    reference_frame: int = 0,
    base_scale: float = 1.0,
) -> PointMaps:
    """Shared tail of every backend: canonical frame, normalised, invalid points zeroed (finite).
    Runs where `points_cam` lives; the maps come back to the CPU once, as float32."""
    from model.geometry.types import PointMaps

    world, poses_w = canonicalize(as_tensor(points_cam), poses, reference_frame)
    valid_t = as_tensor(valid).to(world.device) & torch.isfinite(world).all(dim=-1)
    world = world.masked_fill(~valid_t[..., None], 0)  # out of place: `world` may alias the caller's array
    world, scale = normalize_scale(world, valid_t)
    poses_np = poses_w.numpy().copy()
    poses_np[:, :3, 3] /= scale
    return PointMaps(
        points=to_host(world.to(torch.float32)),
        valid=to_host(valid_t),
        intrinsics=np.asarray(intrinsics, dtype=np.float32),
        poses=poses_np.astype(np.float32),
        scale=float(scale * base_scale),
        metric=metric,
        source=source,
    )
