"""Images, mask PNGs and boxes: decoding, orientation, and every bad input's error code."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.api.errors import status_for
from service.media.images import decode_image
from service.media.limits import MediaError, MediaLimits
from service.media.masks import mask_from_box, mask_from_png, resize_mask


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _code(fn, *args, **kwargs) -> str:
    with pytest.raises(MediaError) as e:
        fn(*args, **kwargs)
    assert 400 <= status_for(e.value.code) < 500
    return e.value.code


def _png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG claiming width x height with one tiny IDAT: nothing big is allocated."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decode_png_and_jpeg() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(_png(arr)), arr)
    smooth = np.zeros((30, 40, 3), np.uint8)
    smooth[..., 0] = np.arange(40)[None] * 6
    smooth[..., 1] = np.arange(30)[:, None] * 8
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG", quality=95)
    out = decode_image(buf.getvalue())
    assert out.shape == (30, 40, 3) and np.abs(out.astype(int) - smooth).mean() < 5


def test_decode_image_from_path_and_grey_alpha(tmp_path) -> None:
    p = tmp_path / "a.png"
    p.write_bytes(_png(np.full((5, 7, 4), 200, np.uint8)))
    out = decode_image(p)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8


def test_exif_orientation_applied() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the left of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(buf.getvalue())
    assert out.shape == (40, 20, 3)  # portrait as displayed
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # the stored left edge is now on top


def test_huge_png_rejected_from_header() -> None:
    data = _png_header_only(20000, 20000)
    assert len(data) < 200
    assert _code(decode_image, data) == "resolution_too_large"


def test_image_caps_and_formats() -> None:
    png = _png(np.zeros((10, 10, 3), np.uint8))
    assert _code(decode_image, png, MediaLimits(max_pixels=50)) == "resolution_too_large"
    assert _code(decode_image, png, MediaLimits(max_bytes=10)) == "file_too_large"
    assert _code(decode_image, b"hello, not an image") == "unsupported_image_format"
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    assert _code(decode_image, gif.getvalue()) == "unsupported_image_format"
    noisy = _png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert _code(decode_image, noisy[: len(noisy) // 2]) == "corrupt_media"


def test_mask_png_any_nonzero() -> None:
    grey = np.zeros((6, 8), np.uint8)
    grey[1:3, 2:5] = 1
    assert np.array_equal(mask_from_png(_png(grey), size=(8, 6)), grey > 0)
    rgba = np.zeros((6, 8, 4), np.uint8)  # paint on transparent
    rgba[4, 7] = (255, 0, 0, 255)
    rgba[0, 0] = (0, 0, 0, 255)  # opaque black background pixel: not in the region
    m = mask_from_png(_png(rgba), size=(8, 6))
    assert m.sum() == 1 and m[4, 7]


def test_mask_png_rotation_and_mismatch() -> None:
    coded = np.zeros((6, 8), np.uint8)  # drawn on the coded 8x6 frame
    coded[0, 7] = 255  # top-right
    m = mask_from_png(_png(coded), size=(6, 8), rotation=90)  # displayed frame is 6 wide, 8 high
    assert m.shape == (8, 6) and m[0, 0]  # CCW 90: top-right goes to top-left
    assert _code(mask_from_png, _png(coded), size=(6, 8)) == "mask_size_mismatch"
    assert _code(mask_from_png, _png_header_only(20000, 20000), size=(8, 6)) == "mask_size_mismatch"
    jpeg = io.BytesIO()
    Image.new("L", (8, 6)).save(jpeg, format="JPEG")
    assert _code(mask_from_png, jpeg.getvalue(), size=(8, 6)) == "invalid_mask"


def test_box_masks() -> None:
    m = mask_from_box([1.2, 2, 3.5, 4], size=(10, 5))
    expect = np.zeros((5, 10), bool)
    expect[2:4, 1:4] = True
    assert np.array_equal(m, expect)
    clipped = mask_from_box([-5, -5, 2, 2], size=(10, 5))
    assert clipped.sum() == 4 and clipped[:2, :2].all()
    rot = mask_from_box([9, 0, 10, 1], size=(5, 10), rotation=90)  # coded 10x5 top-right pixel
    assert rot.shape == (10, 5) and rot[0, 0] and rot.sum() == 1


@pytest.mark.parametrize(
    "box,code",
    [([20, 0, 30, 3], "box_out_of_frame"), ([0, -9, 3, 0], "box_out_of_frame"), ([3, 1, 3, 4], "empty_box"),
     ([5, 4, 2, 1], "empty_box"), ([0, 0, float("nan"), 1], "invalid_box"), ([1, 2, 3], "invalid_box")],
)
def test_bad_boxes(box, code) -> None:
    assert _code(mask_from_box, box, size=(10, 5)) == code


def test_resize_mask() -> None:
    m = np.zeros((4, 6), bool)
    m[:2, :3] = True
    r = resize_mask(m, (3, 2))
    assert r.shape == (2, 3) and r[0, 0] and not r[1, 2]
