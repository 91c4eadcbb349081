"""`marks` region mode: regions drawn into the frames, referenced in words (for checkpoints without SR-3D's
trained region modules, e.g. the public NVILA-Lite-8B).

Each region is outlined on every frame that carries one of its masks, in its own colour, with its number in
a filled label at the top-left of its bounding box; `<regionK>` in the question becomes `config.mark_text`
("the region marked K (red outline)"), a phrase a base VLM can ground: visual prompting with numbered,
coloured marks (Set-of-Mark style) needs no trained weights. Line width and digit size scale with the frame,
so after the resize to a 448² tile the outline is >= 2 px wide and a digit >= 14 px tall.
Pure array operations (numpy + torch pooling); the frames are copied, never drawn on in place.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from model.config import SR3DConfig
from model.errors import CheckpointError
from model.inputs import SpatialQuery
from model.region_refs import REGION_REF

REGION_MODES = ("auto", "embedding", "marks")

# Distinct, nameable colours (max_regions defaults to 8); named in the rewritten question.
COLOURS: list[tuple[str, tuple[int, int, int]]] = [
    ("red", (230, 25, 25)), ("green", (30, 200, 40)), ("blue", (30, 80, 240)), ("yellow", (250, 220, 20)),
    ("magenta", (220, 40, 220)), ("cyan", (20, 220, 230)), ("orange", (250, 140, 10)), ("white", (255, 255, 255)),
]

# 3x5 bitmap digits, one string per row ("#" = ink).
_DIGITS = {
    "0": ("###", "#.#", "#.#", "#.#", "###"), "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"), "3": ("###", "..#", "###", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"), "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"), "7": ("###", "..#", ".#.", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"), "9": ("###", "#.#", "###", "..#", "###"),
}
_GLYPHS = {d: np.array([[c == "#" for c in row] for row in rows]) for d, rows in _DIGITS.items()}


def resolve_region_mode(requested: str, trained: bool) -> str:
    """auto -> `embedding` when the checkpoint carries trained SR-3D region modules, else `marks`.
    `embedding` without trained weights is refused: never answer with a random region projector."""
    if requested not in REGION_MODES:
        raise CheckpointError("bad_config", f"region mode {requested!r} is not one of {REGION_MODES}")
    if requested == "embedding" and not trained:
        raise CheckpointError("no_region_weights", "region mode `embedding` needs SR-3D's trained region modules "
                              "(sr3d/ weights); this checkpoint has none. Use `marks` or `auto`.")
    if requested == "auto":
        return "embedding" if trained else "marks"
    return requested


def colour_of(k: int) -> tuple[str, tuple[int, int, int]]:
    return COLOURS[k % len(COLOURS)]


def mark_phrase(k: int, config: SR3DConfig) -> str:
    return config.mark_text.format(k=k, colour=colour_of(k)[0])


def rewrite_question(question: str, config: SR3DConfig) -> str:
    return REGION_REF.sub(lambda m: mark_phrase(int(m.group(1)), config), question)


def _scale(h: int, w: int, tile: int) -> float:
    return max(h, w) / tile  # source pixels per pixel of a tile-sized resize


def _outline(mask: np.ndarray, radius: int) -> np.ndarray:
    """bool [H, W] -> the band of width ~2*radius around the mask's boundary."""
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    k = 2 * radius + 1
    grown = F.max_pool2d(x, k, stride=1, padding=radius)
    shrunk = 1.0 - F.max_pool2d(1.0 - x, k, stride=1, padding=radius)
    return ((grown - shrunk)[0, 0] > 0.5).numpy()


def _label(frame: np.ndarray, text: str, top: int, left: int, px: int, colour: tuple[int, int, int]) -> None:
    """Draw `text` (digits) in black on a filled `colour` box, each glyph cell `px` source pixels."""
    h, w = frame.shape[:2]
    pad = px
    box_h, box_w = 5 * px + 2 * pad, len(text) * 4 * px - px + 2 * pad
    top = min(max(0, top), max(0, h - box_h))
    left = min(max(0, left), max(0, w - box_w))
    frame[top:top + box_h, left:left + box_w] = colour
    for i, ch in enumerate(text):
        glyph = np.kron(_GLYPHS[ch], np.ones((px, px), dtype=bool))
        y, x = top + pad, left + pad + i * 4 * px
        region = frame[y:y + glyph.shape[0], x:x + glyph.shape[1]]
        region[glyph[:region.shape[0], :region.shape[1]]] = (0, 0, 0)


def draw_marks(frames: np.ndarray, regions: list[list], tile_size: int) -> np.ndarray:  # type: ignore[type-arg]
    """uint8 [F, H, W, 3] + regions (lists of RegionMask) -> a marked copy."""
    out = frames.copy()
    h, w = frames.shape[1:3]
    s = _scale(h, w, tile_size)
    radius = max(1, math.ceil(1.5 * s))  # ~3 tile px wide outline
    px = max(1, math.ceil(3 * s))  # 5 rows * 3 tile px = 15 tile px tall digits
    for k, masks in enumerate(regions):
        _, rgb = colour_of(k)
        for f in sorted({m.frame for m in masks}):
            mask = np.logical_or.reduce([np.asarray(m.mask, bool) for m in masks if m.frame == f])
            if not mask.any():
                continue
            out[f][_outline(mask, radius)] = rgb
            ys, xs = np.nonzero(mask)
            _label(out[f], str(k), int(ys.min()) - (5 * px + 2 * px), int(xs.min()), px, rgb)
    return out


def mark_regions(query: SpatialQuery, config: SR3DConfig) -> SpatialQuery:
    """The query as the base model sees it in `marks` mode: marked frames, regions in words, no region slots.
    Call after the query's references were checked (`model.prompt.check_question`)."""
    return replace(query, frames=draw_marks(query.frames, query.regions, config.tile_size),
                   question=rewrite_question(query.question, config), regions=[])
