"""Container family from an upload's first bytes: the one rule shared by the gateway (which refuses a
type before storing it) and the media decoder (which refuses it before FFmpeg sees the file), so an
upload the gateway accepts is never refused by the worker for its type, and the reverse.
No dependencies: the gateway imports it without PyAV.
"""
from __future__ import annotations

HEAD_BYTES = 16  # enough for every rule below

# ISO-BMFF / QuickTime top-level boxes a file may start with. QuickTime writers often put a `wide`
# (or `free`/`skip`) box first, and old .mov files start with `moov`/`mdat` and have no `ftyp`.
_MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"}

# family -> file extensions it may carry
FAMILY_EXT: dict[str, frozenset[str]] = {
    "mp4": frozenset({".mp4", ".m4v", ".mov"}),
    "matroska": frozenset({".webm", ".mkv"}),
    "png": frozenset({".png"}),
    "jpeg": frozenset({".jpg", ".jpeg"}),
    "npz": frozenset({".npz"}),
}
VIDEO_FAMILIES = frozenset({"mp4", "matroska"})


def sniff(head: bytes) -> str | None:
    """mp4 | matroska | png | jpeg | npz, or None when the bytes are none of these."""
    if len(head) >= 8 and head[4:8] in _MP4_BOXES:
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML
        return "matroska"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:4] == b"PK\x03\x04":  # zip: numpy's npz
        return "npz"
    return None
