"""What one spatial question is, as the model sees it.

This is the one contract between `service/` (which decodes uploads and builds these) and `model/`
(which computes on them): both engines, the torch reference and the vLLM plugin, take exactly this.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from model.measure import Measurements


@dataclass
class RegionMask:
    """One region drawn on one frame. `frame` indexes `SpatialQuery.frames` (the sampled frames)."""

    frame: int
    mask: np.ndarray  # bool [H, W], same H, W as the frames


@dataclass
class SpatialQuery:
    frames: np.ndarray  # uint8 [F, H, W, 3]; F == 1 for a single image
    question: str  # user text; regions referenced as <region0>, <region1>, ...
    regions: list[list[RegionMask]] = field(default_factory=list)  # regions[k]: masks of region k
    # Canonical world-frame point maps (normalised scale), or None for the 2D path.
    pointmaps: np.ndarray | None = None  # float32 [F, H, W, 3]
    pointmap_valid: np.ndarray | None = None  # bool [F, H, W]; None = all valid
    is_video: bool = False  # video: one 448 tile per frame; image: dynamic tiling + thumbnail
    media_key: str | None = None  # content hash of the upload + sampling (cache keys, mm uuids)
    # What the point maps say about each region and pair (model/measure); None when not measured.
    measurements: Measurements | None = None


@dataclass
class GenerationParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks fix the output length


@dataclass
class TokenDelta:
    """A piece of the answer as it is generated."""

    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # On the first delta only, where the engine knows it: seconds per part of the time to this first token
    # (e.g. prepare, render, submit, wait, prefill, deliver); the worker reports them as encode_<part>_s.
    parts: dict[str, float] | None = None
