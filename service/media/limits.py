"""The caps one upload is held to, and the error every refusal in this package raises."""
from __future__ import annotations

from dataclasses import dataclass

from service.settings import StoreSettings


class MediaError(ValueError):
    """Bad or over-limit media. `code` is stable (API contract); service/api/errors.py maps it to a status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self):  # survive the trip back from the decode child
        return (MediaError, (self.code, self.message))


@dataclass(frozen=True)
class MediaLimits:
    """Caps for one upload. Width/height caps are orientation-independent: the long side is held to
    max(max_width, max_height) and the short side to the smaller one, so portrait phone video passes."""

    max_bytes: int = 256 * 1024 * 1024  # raw upload size
    max_width: int = 3840
    max_height: int = 2160
    max_pixels: int = 40_000_000  # images only (videos: max_width x max_height)
    max_duration_s: float = 600.0  # 10 minutes
    max_source_frames: int = 36_000  # 10 minutes at 60 fps
    # frames sampled for the model (including region frames); the deployment's SR3D_MAX_FRAMES default
    max_frames: int = StoreSettings.model_fields["max_frames"].default
    decode_timeout_s: float = 60.0
    # A 1x40000 image passes every pixel cap but scales to a 0-pixel side in the depth model and the
    # tiler; 32:1 is far past any real camera or panorama (360 degree: 2:1).
    max_aspect: float = 32.0
    # Bytes Pillow holds for one decoded image in its own mode (e.g. RGBA 4 B/px, I;16 2 B/px),
    # computed from the header before decoding; 40 MP RGB is 120 MB.
    max_decoded_bytes: int = 192 * 1024 * 1024

    def check_size(self, width: int, height: int) -> None:
        long_cap, short_cap = max(self.max_width, self.max_height), min(self.max_width, self.max_height)
        if width <= 0 or height <= 0:
            raise MediaError("corrupt_media", f"invalid frame size {width}x{height}")
        self.check_aspect(width, height)
        if max(width, height) > long_cap or min(width, height) > short_cap:
            raise MediaError(
                "resolution_too_large", f"{width}x{height} exceeds the {long_cap}x{short_cap} limit"
            )

    def check_aspect(self, width: int, height: int) -> None:
        if max(width, height) > self.max_aspect * min(width, height):
            raise MediaError("aspect_ratio_too_large", f"{width}x{height} is more elongated than {self.max_aspect:g}:1")


def scaled_size(display: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """(W, H) with the long side at most `max_side`, aspect kept: the size both decoders downscale to."""
    w, h = display
    if max_side is None or max(w, h) <= max_side:
        return w, h
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))

