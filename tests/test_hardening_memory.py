"""Issue 14 items 2, 6 and 8: size caps computed from decoded sizes before anything is decoded.

The peak-RSS checks run each request in a fresh interpreter (loadtests/mem_peak.py, ru_maxrss after
imports vs after the request) so that one test's allocations cannot hide another's.
"""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from service.api.errors import status_for
from PIL import Image

from loadtests.mem_peak import measure
from model.geometry import SceneError, load_scene_npz
from service.media.images import decode_image, image_size
from service.media.limits import MediaError, MediaLimits
from service.media.masks import mask_from_png

pytestmark = pytest.mark.timeout(300)

K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])


def _npz_with_header(shape: tuple[int, ...], data: bytes, descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in (("intrinsics", K), ("poses", np.eye(4)[None])):
            with zf.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, arr)
        with zf.open("depth.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
            f.write(data)
    return buf.getvalue()


def test_scene_shape_product_overflowing_int64_is_a_coded_input_error() -> None:
    with pytest.raises(SceneError) as e:
        load_scene_npz(_npz_with_header((2**40, 2**40, 2**40), b"\0" * 64))
    assert e.value.code == "scene_too_large"


def test_scene_member_shorter_than_its_header_is_invalid() -> None:
    with pytest.raises(SceneError) as e:
        load_scene_npz(_npz_with_header((1, 4, 4), b"\0" * 8))
    assert e.value.code == "invalid_scene_file"


def test_scene_decoded_bytes_budget_counts_every_member() -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, depth=np.ones((1, 8, 8), np.float32), intrinsics=K, poses=np.eye(4)[None],
                        extra=np.zeros(1000, np.float64))
    with pytest.raises(SceneError) as e:
        load_scene_npz(buf.getvalue(), max_decoded_bytes=4000)
    assert e.value.code == "scene_too_large"


def test_scene_streamed_depth_equals_numpy_load() -> None:
    rng = np.random.default_rng(0)
    for depth, extra in ((rng.uniform(0.5, 4, (3, 6, 5)).astype(np.float64), {}),
                         ((rng.uniform(0.5, 4, (3, 6, 5)) * 5000).astype(np.uint16), {"depth_scale": np.array(5000.0)}),
                         (np.asfortranarray(rng.uniform(0.5, 4, (3, 6, 5)).astype(np.float32)), {})):
        buf = io.BytesIO()
        np.savez_compressed(buf, depth=depth, intrinsics=K, poses=np.tile(np.eye(4), (3, 1, 1)), **extra)
        scene = load_scene_npz(buf.getvalue())
        want = depth.astype(np.float32) / np.float32(extra["depth_scale"]) if extra else depth.astype(np.float32)
        assert scene.depth.dtype == np.float32 and np.array_equal(scene.depth, want)


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def test_extreme_aspect_ratio_image_is_a_coded_input_error() -> None:
    """The 1x40000 PNG that reached the depth preprocessor (height 0) and was retried 3 times."""
    with pytest.raises(MediaError) as e:
        decode_image(_png(40000, 1))
    assert e.value.code == "aspect_ratio_too_large" and status_for(e.value.code) == 422
    with pytest.raises(MediaError):
        MediaLimits().check_size(2000, 20)  # the same rule for video frames


def test_image_decoded_bytes_checked_from_header() -> None:
    data = _png(3000, 3000, "RGBA")  # 36 MB decoded
    with pytest.raises(MediaError) as e:
        decode_image(data, MediaLimits(max_decoded_bytes=30_000_000))
    assert e.value.code == "resolution_too_large"
    assert decode_image(data, MediaLimits(max_decoded_bytes=40_000_000)).shape == (3000, 3000, 3)


def test_image_downscaled_at_decode_keeps_display_size() -> None:
    data = _png(3000, 1000)
    assert decode_image(data, max_side=896).shape == (299, 896, 3)
    assert image_size(data) == (3000, 1000)


def test_mask_from_png_channels() -> None:
    img = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 9, 255))  # colour + opaque: in
    img.putpixel((1, 0), (9, 0, 0, 0))  # colour, transparent: out
    img.putpixel((2, 1), (0, 0, 0, 255))  # black, opaque: out
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    mask = mask_from_png(buf.getvalue(), (4, 2))
    assert mask.tolist() == [[True, False, False, False], [False, False, False, False]]


# ---- peak RSS per request (fresh processes) -------------------------------------------------------


def test_scene_bomb_rejected_before_inflating() -> None:
    """Issue: a 1.0 MB npz of zeros (16 x 2160x3840 float64) took 2.8 GB -> 13.6 GB and 27 s."""
    r = measure("scene_bomb")
    assert r["outcome"] == "SceneError scene_too_large", r
    assert r["delta_mb"] < 32 and r["seconds"] < 2, r


def test_mask_named_by_64_annotations_decoded_once() -> None:
    """Issue: one 6000x6600 mask PNG x 8 regions x 8 annotations peaked at 7.9 GB."""
    r = measure("mask_fanout")
    assert r["outcome"].endswith("64 annotations"), r
    assert r["delta_mb"] < 600, r


def test_huge_image_bounded() -> None:
    r = measure("image_huge")
    assert r["outcome"].startswith("frames [1, 2301, 2092,"), r  # 4.8 MP: twice the tiler's 12 tiles
    assert r["delta_mb"] < 500, r


def test_largest_accepted_scene_bounded() -> None:
    r = measure("scene_max")
    assert r["outcome"].startswith("point maps"), r
    assert r["delta_mb"] < 2500, r
