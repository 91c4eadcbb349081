"""`marks` region mode drawing (model/marks.py): every region outlined in its own colour with its number, on the
frames that carry it, still visible after the resize to a 448² tile; `<regionK>` rewritten to its phrase."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from model.config import SR3DConfig
from model.errors import CheckpointError
from model.inputs import RegionMask
from model.marks import COLOURS, draw_marks, resolve_region_mode, rewrite_question


def _box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _count(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> np.ndarray:
    return (np.abs(img.astype(int) - np.array(rgb)).max(-1) <= tol)


def test_outlines_and_labels_survive_the_resize_to_a_448_tile() -> None:
    h, w = 1080, 1920  # a full-HD frame shrinks ~4.3x to 448²
    frames = np.full((2, h, w, 3), 128, np.uint8)
    regions = [[RegionMask(0, _box(h, w, 300, 700, 200, 600))], [RegionMask(1, _box(h, w, 400, 900, 1200, 1700))]]
    out = draw_marks(frames, regions, 448)
    assert np.array_equal(frames[0], np.full((h, w, 3), 128, np.uint8))  # input untouched
    tiles = [np.asarray(Image.fromarray(f).resize((448, 448), Image.Resampling.BICUBIC)) for f in out]
    red, green = COLOURS[0][1], COLOURS[1][1]
    # region 0 only on frame 0, region 1 only on frame 1
    assert _count(tiles[0], red).sum() > 0 and _count(tiles[0], green).sum() == 0
    assert _count(tiles[1], green).sum() > 0 and _count(tiles[1], red).sum() == 0
    # the outline is at least 2 tile pixels wide: along the box's left edge (x = 200 / 1920 * 448 ≈ 47)
    row = _count(tiles[0], red)[int(500 / h * 448)]
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]]))))[::2]
    assert runs.max() >= 2
    # the number label is a filled box at least 14 tile pixels tall holding dark (digit) pixels
    label = _count(tiles[0], red)[:int(300 / h * 448) + 2]
    ys = np.flatnonzero(label.any(1))
    assert ys.max() - ys.min() + 1 >= 14
    x0, x1 = np.flatnonzero(label.any(0))[[0, -1]]
    patch = tiles[0][ys.min():ys.max() + 1, x0:x1 + 1]
    assert (patch.max(-1) < 80).sum() >= 10  # black glyph strokes inside the label


def test_references_become_phrases_with_the_colour() -> None:
    cfg = SR3DConfig()
    q = rewrite_question("Is <region1> left of <region0>? And <region1>?", cfg)
    assert q == ("Is the region marked 1 (green outline) left of the region marked 0 (red outline)? "
                 "And the region marked 1 (green outline)?")


@pytest.mark.parametrize("requested,trained,mode", [("auto", True, "embedding"), ("auto", False, "marks"),
                                                    ("marks", True, "marks"), ("embedding", True, "embedding")])
def test_region_mode_resolution(requested: str, trained: bool, mode: str) -> None:
    assert resolve_region_mode(requested, trained) == mode


def test_embedding_without_trained_weights_is_refused() -> None:
    with pytest.raises(CheckpointError) as e:
        resolve_region_mode("embedding", False)
    assert e.value.code == "no_region_weights"
