"""A job's point maps -> one compact little-endian binary scene for the browser's 3D view.

The page draws what the model saw: a subsample of the sampled frames' points in the canonical frame
(OpenCV axes, normalised scale; see `PointMaps`), their colours, which region each point belongs
to, and the cameras. Size is bounded by construction: at most `MAX_POINTS` points and `MAX_FRAMES`
cameras, so a scene is at most ~1.6 MB whatever the upload.

Layout (all little-endian; every float section starts 4-byte aligned, so a browser can view the
bytes as a Float32Array without copying):

    offset  type          field
    0       char[8]       magic  b"SR3DSCN1"
    8       u32           header bytes (= 48; sections follow it)
    12      u32           N  points
    16      u32           F  cameras (sampled frames)
    20      u32           R  regions
    24      u32           W  frame width  (pixels of the intrinsics)
    28      u32           H  frame height
    32      f32           scale: metres per unit when metric, else the normalisation factor
    36      u32           flags: bit 0 = metric
    40      u32[2]        reserved (0)
    48      f32[F,4,4]    camera-to-world poses, row-major
    ..      f32[F,4]      intrinsics fx, fy, cx, cy
    ..      u32[F]        original frame index of each camera (0 for an image)
    ..      f32[N,3]      positions
    ..      u8[N,3]       colours (RGB)
    ..      u8[N]         region: 0 = none, k + 1 = region k (the lowest k when regions overlap)
    ..      u8[N]         camera (frame position 0..F-1) the point came from
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAGIC = b"SR3DSCN1"
HEADER = struct.Struct("<8sIIIIIIfI8x")  # 48 bytes
MAX_POINTS = 100_000
MAX_FRAMES = 255  # camera ids are u8
MAX_REGIONS = 254  # region ids are u8, 0 = none
DEFAULT_POINTS = 60_000
REGION_SHARE = 0.35  # at most this share of the budget goes to region points (kept dense: they are the point)


@dataclass(frozen=True)
class Scene:
    """A parsed scene (tests and tools; the browser parses the same bytes itself)."""

    positions: np.ndarray  # f32 [N, 3]
    colors: np.ndarray  # u8 [N, 3]
    region: np.ndarray  # u8 [N]
    camera: np.ndarray  # u8 [N]
    poses: np.ndarray  # f32 [F, 4, 4]
    intrinsics: np.ndarray  # f32 [F, 4]
    frame_indices: np.ndarray  # u32 [F]
    num_regions: int
    size: tuple[int, int]  # (W, H)
    scale: float
    metric: bool


def pack_scene(
    frames: np.ndarray,
    points: np.ndarray,
    valid: np.ndarray | None,
    region_masks: Sequence[Sequence[tuple[int, np.ndarray]]],
    poses: np.ndarray,
    intrinsics: np.ndarray,
    frame_indices: Sequence[int],
    *,
    scale: float = 1.0,
    metric: bool = False,
    max_points: int = DEFAULT_POINTS,
    seed: int = 0,
) -> bytes:
    """frames u8 [F,H,W,3]; points f32 [F,H,W,3] (canonical frame); valid bool [F,H,W] or None;
    region_masks: per region, (frame position, bool [H,W] mask) pairs; poses [F,4,4]; intrinsics
    [F,3,3] or [3,3]. The subsample is deterministic for a given `seed`."""
    f, h, w, _ = frames.shape
    if points.shape != (f, h, w, 3):
        raise ValueError(f"points {points.shape} do not match frames {frames.shape}")
    if not 1 <= f <= MAX_FRAMES:
        raise ValueError(f"{f} frames; a scene holds 1..{MAX_FRAMES}")
    if len(region_masks) > MAX_REGIONS:
        raise ValueError(f"{len(region_masks)} regions; a scene holds at most {MAX_REGIONS}")
    max_points = max(1, min(int(max_points), MAX_POINTS))

    # Work on index lists, never on whole maps: the cost is O(region pixels + budget), not O(F*H*W),
    # because this runs on the worker's path between point maps and the engine.
    hw = h * w
    flat_points = points.reshape(-1, 3)
    flat_valid = valid.reshape(-1) if valid is not None else None

    def usable(idx: np.ndarray) -> np.ndarray:
        keep = np.isfinite(flat_points[idx]).all(axis=-1)
        if flat_valid is not None:
            keep &= flat_valid[idx]
        return idx[keep]

    ids, labels = [np.zeros(0, np.int64)], [np.zeros(0, np.uint8)]
    for k, region in enumerate(region_masks):
        for pos, mask in region:
            px = np.flatnonzero(np.asarray(mask, dtype=bool).reshape(-1)) + int(pos) * hw
            ids.append(px)
            labels.append(np.full(len(px), k + 1, np.uint8))
    all_ids, all_labels = np.concatenate(ids), np.concatenate(labels)
    # np.unique keeps the first occurrence and the lists run in region order: the lowest id wins.
    region_ids, first = np.unique(all_ids, return_index=True)
    region_labels = all_labels[first]
    keep = np.isin(region_ids, usable(region_ids), assume_unique=True)
    region_ids, region_labels = region_ids[keep], region_labels[keep]

    rng = np.random.default_rng(seed)
    n_rest_max = f * hw - len(region_ids)
    n_region = min(len(region_ids), max(int(max_points * REGION_SHARE), max_points - n_rest_max))
    pick = _pick(np.arange(len(region_ids)), n_region, rng)
    region_ids, region_labels = region_ids[pick], region_labels[pick]
    # The rest: a uniform sample of the other usable pixels (oversampled, then trimmed).
    want = min(max_points - n_region, n_rest_max)
    cand = np.sort(rng.integers(0, f * hw, size=min(f * hw, 2 * want + 1024)))
    cand = cand[np.concatenate(([True], cand[1:] != cand[:-1]))]  # dedupe (np.unique's hashing is slower here)
    cand = usable(cand[~np.isin(cand, region_ids, assume_unique=True)])
    rest = _pick(cand, want, rng)

    chosen = np.concatenate([region_ids, rest])
    labels_out = np.concatenate([region_labels, np.zeros(len(rest), np.uint8)])
    order = np.argsort(chosen, kind="stable")  # frame-major: cheaper reads, the browser can draw per frame
    chosen, labels_out = chosen[order], labels_out[order]

    K = np.asarray(intrinsics, dtype=np.float32)
    K = np.broadcast_to(K, (f, 3, 3)) if K.ndim == 2 else K
    header = HEADER.pack(MAGIC, HEADER.size, len(chosen), f, len(region_masks), w, h, float(scale), int(bool(metric)))
    sections = [
        np.ascontiguousarray(poses, dtype="<f4").reshape(f, 4, 4),
        np.stack([K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]], axis=1).astype("<f4"),
        np.asarray(frame_indices, dtype="<u4").reshape(f),
        points.reshape(-1, 3)[chosen].astype("<f4"),
        frames.reshape(-1, 3)[chosen].astype(np.uint8),
        labels_out,
        (chosen // hw).astype(np.uint8),
    ]
    return header + b"".join(s.tobytes() for s in sections)


def _pick(candidates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n >= len(candidates):
        return candidates
    return np.sort(rng.choice(candidates, size=n, replace=False))


def max_scene_bytes(max_points: int = MAX_POINTS, frames: int = MAX_FRAMES) -> int:
    """The largest scene `pack_scene` can produce: the cap a reader may enforce."""
    return HEADER.size + frames * (64 + 16 + 4) + max_points * (12 + 3 + 1 + 1)


def unpack_scene(data: bytes) -> Scene:
    """Parse (and bounds-check) bytes written by `pack_scene`."""
    if len(data) < HEADER.size:
        raise ValueError("scene shorter than its header")
    magic, hsize, n, f, r, w, h, scale, flags = HEADER.unpack_from(data)
    if magic != MAGIC or hsize != HEADER.size:
        raise ValueError("not an SR-3D scene")
    expect = hsize + f * (64 + 16 + 4) + n * (12 + 3 + 1 + 1)
    if len(data) != expect:
        raise ValueError(f"scene is {len(data)} bytes, its header says {expect}")
    off = hsize

    def take(dtype: str, count: int, shape: tuple[int, ...]) -> np.ndarray:
        nonlocal off
        a = np.frombuffer(data, dtype=dtype, count=count, offset=off).reshape(shape)
        off += a.nbytes
        return a

    poses = take("<f4", f * 16, (f, 4, 4))
    intr = take("<f4", f * 4, (f, 4))
    idx = take("<u4", f, (f,))
    pos = take("<f4", n * 3, (n, 3))
    col = take("u1", n * 3, (n, 3))
    reg = take("u1", n, (n,))
    cam = take("u1", n, (n,))
    return Scene(pos, col, reg, cam, poses, intr, idx, r, (w, h), float(scale), bool(flags & 1))
