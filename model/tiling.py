"""Dynamic tiling of frames, point maps and region masks through one geometry (NVILA `dynamic_preprocess`).

Image: choose a (cols, rows) grid, resize the whole frame to (cols*S, rows*S), cut row-major into S×S tiles,
append an S×S thumbnail of the whole frame when there is more than one tile. Video: each frame is resized to
one S×S tile (no thumbnail). The point map, its validity and the region masks go through the same resize and
the same crops, so tile pixel (y, x) of every array refers to the same scene point:
- RGB: PIL bicubic (NVILA resizes PIL images with the default filter; SigLIP's processor is then a no-op resize).
- masks: area average (soft coverage in [0, 1]; a thin region never vanishes).
- points / validity: nearest (pixel-centre aligned, "nearest-exact"): averaging xyz across a depth edge would
  invent points floating between surfaces; patch pooling later averages only valid points.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.config import SR3DConfig
from model.errors import ModelInputError
from model.inputs import SpatialQuery

Grid = tuple[int, int, bool]  # (cols, rows, has_thumbnail)


def candidate_grids(max_tiles: int, min_tiles: int = 1) -> list[tuple[int, int]]:
    # Same candidate order as NVILA (sorted by tile count); the tie rule below depends on it.
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def find_grid(width: int, height: int, max_tiles: int = 12, tile_size: int = 448) -> tuple[int, int]:
    """(cols, rows) with the aspect ratio closest to width/height; on a tie the later (larger) grid wins
    when the image has more than half that grid's pixel area."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


@dataclass
class TiledInputs:
    pixel_values: torch.Tensor  # float32 [T, 3, S, S], SigLIP-normalised (mean = std = 0.5)
    points: torch.Tensor | None  # float32 [T, S, S, 3]
    point_valid: torch.Tensor | None  # bool [T, S, S]
    region_tiles: list[torch.Tensor]  # per region: float32 [T, S, S] soft masks in [0, 1]
    frame_of_tile: list[int]
    tiles_per_frame: list[int]
    grids: list[Grid]

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])


def validate_query(query: SpatialQuery, config: SR3DConfig) -> None:
    """Every cheap check, before any pixel is touched."""
    frames = query.frames
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ModelInputError("bad_frames", "frames must be a uint8 array [F, H, W, 3]")
    n, h, w = frames.shape[:3]
    if n < 1 or h < 1 or w < 1:
        raise ModelInputError("bad_frames", f"frames has an empty dimension: {frames.shape}")
    if not query.is_video and n != 1:
        raise ModelInputError("bad_frames", f"an image query has exactly one frame, got {n}")
    if n > config.max_frames:
        raise ModelInputError("too_many_frames", f"{n} frames > limit {config.max_frames}")
    if len(query.regions) > config.max_regions:
        raise ModelInputError("too_many_regions", f"{len(query.regions)} regions > limit {config.max_regions}")
    if query.pointmaps is not None:
        if query.pointmaps.shape != (n, h, w, 3):
            raise ModelInputError("bad_pointmap", f"pointmaps {query.pointmaps.shape} != frames {(n, h, w, 3)}")
        if query.pointmap_valid is not None and query.pointmap_valid.shape != (n, h, w):
            raise ModelInputError("bad_pointmap", f"pointmap_valid {query.pointmap_valid.shape} != {(n, h, w)}")
    for k, masks in enumerate(query.regions):
        if not masks:
            raise ModelInputError("empty_mask", f"region {k} has no mask")
        for m in masks:
            if not 0 <= m.frame < n:
                raise ModelInputError("bad_region_frame", f"region {k} is drawn on frame {m.frame}; there are {n}")
            if m.mask.shape != (h, w):
                raise ModelInputError("mask_size_mismatch", f"region {k} mask {m.mask.shape} != frame {(h, w)}")
        if not any(bool(np.any(m.mask)) for m in masks):
            raise ModelInputError("empty_mask", f"region {k} mask is empty")


def _resize_rgb(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(frame)
    return np.asarray(img.resize(size, Image.Resampling.BICUBIC))  # same-size resize is an exact copy


def _resize_area(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:  # [C, H, W] -> [C, h, w]
    if tuple(x.shape[-2:]) == (size[1], size[0]):
        return x
    return F.interpolate(x[None], size=(size[1], size[0]), mode="area")[0]


def _resize_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:  # [C, H, W] -> [C, h, w]
    if tuple(x.shape[-2:]) == (size[1], size[0]):
        return x
    return F.interpolate(x[None], size=(size[1], size[0]), mode="nearest-exact")[0]


def _cut(x: torch.Tensor, cols: int, rows: int, s: int) -> list[torch.Tensor]:  # [C, rows*s, cols*s] -> tiles
    return [x[:, r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(rows) for c in range(cols)]


def frame_grid(width: int, height: int, is_video: bool, config: SR3DConfig) -> Grid:
    if is_video:
        return (1, 1, False)
    cols, rows = find_grid(width, height, config.max_tiles, config.tile_size)
    return (cols, rows, cols * rows > 1)


def tiles_for_grid(grid: Grid) -> int:
    return grid[0] * grid[1] + int(grid[2])


def tile_query(query: SpatialQuery, config: SR3DConfig) -> TiledInputs:
    """Tile frames, point maps and masks identically. Call `validate_query` first."""
    s = config.tile_size
    n, h, w = query.frames.shape[:3]
    grid = frame_grid(w, h, query.is_video, config)
    cols, rows, thumb = grid
    big = (cols * s, rows * s)

    # One float "plane stack" per frame: [mask_0..mask_R-1, valid, x, y, z] resized with the right filter.
    num_regions = len(query.regions)
    pix, pts, val = [], [], []
    region_tiles: list[list[torch.Tensor]] = [[] for _ in range(num_regions)]
    for f in range(n):
        rgb = query.frames[f]
        parts = [_resize_rgb(rgb, big)]
        if thumb:
            parts.append(_resize_rgb(rgb, (s, s)))
        for i, part in enumerate(parts):
            t = torch.from_numpy(part.copy()).permute(2, 0, 1).float().div_(255.0).sub_(0.5).div_(0.5)
            pix.extend(_cut(t, cols, rows, s) if i == 0 else [t])

        for k, masks in enumerate(query.regions):
            on_frame = [m.mask for m in masks if m.frame == f]
            if on_frame:
                m = torch.from_numpy(np.logical_or.reduce(on_frame).astype(np.float32))[None]
                tiles = _cut(_resize_area(m, big), cols, rows, s)
                if thumb:
                    tiles.append(_resize_area(m, (s, s)))
                region_tiles[k].extend(t[0] for t in tiles)
            else:
                region_tiles[k].extend(torch.zeros(s, s) for _ in range(tiles_for_grid(grid)))

        if query.pointmaps is not None:
            p = torch.from_numpy(np.ascontiguousarray(query.pointmaps[f], dtype=np.float32)).permute(2, 0, 1)
            v = (torch.ones(1, h, w) if query.pointmap_valid is None
                 else torch.from_numpy(query.pointmap_valid[f].astype(np.float32))[None])
            v = v * torch.isfinite(p).all(0, keepdim=True)  # non-finite points are invalid, whatever the mask says
            pv = torch.cat([torch.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0), v])
            tiles = _cut(_resize_nearest(pv, big), cols, rows, s)
            if thumb:
                tiles.append(_resize_nearest(pv, (s, s)))
            pts.extend(t[:3].permute(1, 2, 0) for t in tiles)
            val.extend(t[3] > 0.5 for t in tiles)

    per_frame = tiles_for_grid(grid)
    return TiledInputs(
        pixel_values=torch.stack(pix).contiguous(),
        points=torch.stack(pts).contiguous() if pts else None,
        point_valid=torch.stack(val).contiguous() if val else None,
        region_tiles=[torch.stack(r).contiguous() for r in region_tiles],
        frame_of_tile=[f for f in range(n) for _ in range(per_frame)],
        tiles_per_frame=[per_frame] * n,
        grids=[grid] * n,
    )
