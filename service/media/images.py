"""PNG/JPEG -> pixels: format, pixel count, aspect and decoded bytes checked from the header before
Pillow decodes; EXIF orientation applied, optionally downscaled while decoding."""
from __future__ import annotations

import io
import math
import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from service.media.limits import MediaError, MediaLimits, scaled_size


_IMAGE_FORMATS = {"PNG", "JPEG"}


def _as_stream(data: bytes | str | os.PathLike, limits: MediaLimits) -> BinaryIO:
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) > limits.max_bytes:
            raise MediaError("file_too_large", f"{len(data)} bytes exceeds the {limits.max_bytes}-byte limit")
        return io.BytesIO(bytes(data))
    size = os.path.getsize(data)
    if size > limits.max_bytes:
        raise MediaError("file_too_large", f"{size} bytes exceeds the {limits.max_bytes}-byte limit")
    return open(data, "rb")


def open_image(data: bytes | str | os.PathLike, limits: MediaLimits) -> Image.Image:
    """Open lazily (header only) and check format and pixel count before any pixel is decoded."""
    stream = _as_stream(data, limits)
    try:
        img = Image.open(stream, formats=sorted(_IMAGE_FORMATS))
    except Image.DecompressionBombError as e:
        raise MediaError("resolution_too_large", str(e)) from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise MediaError("unsupported_image_format", "not a PNG or JPEG image") from None
    w, h = img.size
    if w * h > limits.max_pixels:
        raise MediaError("resolution_too_large", f"{w}x{h} exceeds {limits.max_pixels} pixels")
    if w <= 0 or h <= 0:
        raise MediaError("corrupt_media", f"invalid image size {w}x{h}")
    limits.check_aspect(w, h)
    decoded = decoded_nbytes(img)
    if decoded > limits.max_decoded_bytes:
        raise MediaError("resolution_too_large", f"{w}x{h} {img.mode} decodes to {decoded} bytes > {limits.max_decoded_bytes}")
    return img


def decoded_nbytes(img: Image.Image) -> int:
    """Bytes of the decoded pixel buffer in the image's own mode, from the header alone. Palette
    images count as RGBA because callers convert them; 1-bit images as 1 byte per pixel."""
    w, h = img.size
    if img.mode == "P":
        return w * h * 4
    per_band = 2 if img.mode.startswith("I;16") else (4 if img.mode in ("I", "F") else 1)
    return w * h * max(1, len(img.getbands())) * per_band


def load_image(img: Image.Image) -> None:
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError("corrupt_media", f"cannot decode image: {e}") from None


def decode_image(data: bytes | str | os.PathLike, limits: MediaLimits = MediaLimits(), max_side: int | None = None) -> np.ndarray:
    """PNG/JPEG -> uint8 [H, W, 3], EXIF orientation applied (so it matches what the user saw).

    `max_side` downscales (box filter, in Pillow, before the RGB array exists) so the long side is at
    most that: a 40 MP photo becomes a frame the size of a decoded video frame. JPEGs are decoded
    at a reduced DCT scale when that still covers `max_side` (`draft`), so they never exist at full
    size in memory. The original (display) size is `image_size(data)`."""
    img = open_image(data, limits)
    if max_side is not None and img.format == "JPEG":
        w, h = img.size
        scale = max_side / max(w, h)
        if scale < 1:
            img.draft("RGB", (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
    load_image(img)
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError("corrupt_media", f"bad EXIF data: {e}") from None
    img = img.convert("RGB")
    if max_side is not None:
        out = scaled_size(img.size, max_side)
        if out != img.size:
            img = img.resize(out, Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


def image_size(data: bytes | str | os.PathLike, limits: MediaLimits = MediaLimits()) -> tuple[int, int]:
    """(W, H) of the image as displayed (EXIF rotation applied), from the header only."""
    img = open_image(data, limits)
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError):
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
