"""Untrusted uploads -> pixels: probe, sample and decode videos, decode images, rasterise region masks.

Everything here runs on client-supplied bytes, so every cap is checked *before* the expensive step:
file size before opening, container magic before FFmpeg sees the file, resolution / duration / frame
count from headers (and a cheap packet scan) before any frame is decoded, image pixel count from the
PNG/JPEG header before Pillow allocates.

Time limit (both layers):
1. `decode_video` runs the decode in a child process (multiprocessing *forkserver*: safe when the
   parent has CUDA/torch threads, cheap per call once the server is up). The parent waits on a pipe
   with the deadline and kills the child if it passes, so even a single packet that makes FFmpeg
   spin forever cannot hold the worker.
2. Inside the decode loop the deadline is also checked between packets, so an ordinary slow file
   stops cooperatively with the same error and the child exits cleanly.

Coordinate convention: frames are returned *displayed* (container rotation applied). Boxes and mask
PNGs are in displayed-frame pixels too (`rotation=0`, the default). A client that drew on the coded,
unrotated frame passes the stream's rotation and the mask is rotated like the frames.

Error codes (`MediaError.code`; service/api/errors.py maps each to its HTTP status):
  malformed:    invalid_argument, invalid_box
  over a cap:   file_too_large, resolution_too_large, too_long
  unsupported:  unsupported_container, unsupported_codec, unsupported_image_format, no_video_stream
  undecodable:  corrupt_media, decode_timeout, too_many_frames, frame_out_of_range,
                mask_size_mismatch, invalid_mask, box_out_of_frame, empty_box
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import math
import multiprocessing as mp
import os
import pickle
import select
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
from PIL import Image, ImageOps

from service.settings import Settings
from service.sniff import HEAD_BYTES, VIDEO_FAMILIES, sniff


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
    max_frames: int = Settings.model_fields["max_frames"].default
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


@dataclass
class VideoInfo:
    container: str  # FFmpeg demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    codec: str  # normalised: h264 | hevc | vp8 | vp9 | av1 | mpeg4
    width: int  # coded (before rotation)
    height: int
    rotation: int  # CCW degrees, multiple of 90
    duration_s: float
    frame_count: int  # exact (counted from packets)
    fps: float  # average, frame_count / duration
    timestamps: np.ndarray = field(repr=False)  # float64 [frame_count], presentation order, seconds
    pts: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))  # raw, stream time_base
    # pts of the packets flagged as keyframes (random-access points), sorted: where a decode may seek to
    key_pts: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))

    @property
    def display_size(self) -> tuple[int, int]:
        """(W, H) of the frames `decode_video` returns."""
        return (self.height, self.width) if self.rotation % 180 else (self.width, self.height)


@dataclass
class DecodedVideo:
    frames: np.ndarray  # uint8 [F, H, W, 3], rotation applied
    indices: np.ndarray  # int64 [F], original (presentation-order) frame index of each sampled frame
    timestamps: np.ndarray  # float64 [F], seconds from the first frame
    rotation: int  # CCW degrees that were applied
    source_size: tuple[int, int]  # displayed (W, H) of the source == frames' W, H
    info: VideoInfo | None = None
    frames_decoded: int = 0  # frames the decoder produced to get these (seeking skips the rest)

    def index_of(self, original_index: int) -> int:
        """Position in `frames` of an original frame index (which must be in the sample)."""
        pos = int(np.searchsorted(self.indices, original_index))
        if pos >= len(self.indices) or self.indices[pos] != original_index:
            raise MediaError("frame_out_of_range", f"frame {original_index} was not sampled")
        return pos


# --------------------------------------------------------------------------------------- sniffing

_FORMAT_WHITELIST = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm"
_ALLOWED_CODECS = {"h264", "hevc", "vp8", "vp9", "av1", "mpeg4"}
_CODEC_ALIASES = {"libdav1d": "av1", "libaom-av1": "av1", "libvpx": "vp8", "libvpx-vp9": "vp9", "h265": "hevc"}


def _sniff_container(head: bytes) -> str:
    """Recognise MP4/MOV and Matroska/WebM by magic bytes (service.sniff, the gateway's rule too)
    before FFmpeg probes anything."""
    family = sniff(head)
    if family not in VIDEO_FAMILIES:
        raise MediaError("unsupported_container", "not an MP4/MOV/WebM/MKV file")
    return family


def _check_file(path: str | os.PathLike, limits: MediaLimits) -> int:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise MediaError("invalid_argument", f"cannot read upload: {e.strerror}") from None
    if size > limits.max_bytes:
        raise MediaError("file_too_large", f"{size} bytes exceeds the {limits.max_bytes}-byte limit")
    if size == 0:
        raise MediaError("corrupt_media", "empty file")
    with open(path, "rb") as f:
        _sniff_container(f.read(HEAD_BYTES))
    return size


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    try:
        return av.open(
            str(path), options={"format_whitelist": _FORMAT_WHITELIST, "protocol_whitelist": "file"}
        )
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise MediaError("corrupt_media", f"cannot open the container ({type(e).__name__})") from None


def _codec_name(stream: av.video.stream.VideoStream) -> str:
    name = stream.codec_context.name
    return _CODEC_ALIASES.get(name, name)


# ------------------------------------------------------------------------------------------ probe


def _probe_open(container: av.container.InputContainer, limits: MediaLimits, deadline: float) -> VideoInfo:
    if not container.streams.video:
        raise MediaError("no_video_stream", "the file has no video stream")
    stream = container.streams.video[0]
    codec = _codec_name(stream)
    if codec not in _ALLOWED_CODECS:
        raise MediaError("unsupported_codec", f"codec {codec!r} is not one of {sorted(_ALLOWED_CODECS)}")
    width, height = stream.codec_context.width, stream.codec_context.height
    limits.check_size(width, height)

    # Header durations first (free); MKV/WebM have no stream duration, the container one covers them.
    durations = []
    if container.duration is not None:
        durations.append(container.duration / 1_000_000)
    if stream.duration is not None and stream.time_base is not None:
        durations.append(float(stream.duration * stream.time_base))
    if durations and max(durations) > limits.max_duration_s:
        raise MediaError("too_long", f"duration {max(durations):.0f} s exceeds {limits.max_duration_s:.0f} s")
    if stream.frames and stream.frames > limits.max_source_frames:
        raise MediaError("too_long", f"{stream.frames} frames exceed {limits.max_source_frames}")

    # Exact presentation timestamps from a packet scan: no decoding, stops at the frame cap.
    tb = stream.time_base
    pts: list[int] = []
    keys: list[int] = []
    try:
        for packet in container.demux(stream):
            if time.monotonic() > deadline:
                raise MediaError("decode_timeout", "probing took too long")
            if packet.size == 0:
                continue  # flush packet
            if packet.pts is None:
                if packet.dts is None:
                    continue
                pts.append(packet.dts)
            else:
                pts.append(packet.pts)
            if packet.is_keyframe:
                keys.append(pts[-1])
            if len(pts) > limits.max_source_frames:
                raise MediaError("too_long", f"more than {limits.max_source_frames} frames")
    except av.FFmpegError:
        pass  # truncated tail: keep the packets read so far
    if not pts:
        raise MediaError("corrupt_media", "no decodable video packets")
    raw = np.unique(np.asarray(pts, dtype=np.int64))
    ts = (raw - raw[0]).astype(np.float64) * float(tb)
    duration = float(ts[-1]) + (float(ts[-1]) / max(len(ts) - 1, 1) if len(ts) > 1 else 0.0)
    if duration > limits.max_duration_s:
        raise MediaError("too_long", f"duration {duration:.0f} s exceeds {limits.max_duration_s:.0f} s")

    rotation = _first_frame_rotation(container, stream, deadline)
    return VideoInfo(
        container=container.format.name,
        codec=codec,
        width=width,
        height=height,
        rotation=rotation,
        duration_s=duration,
        frame_count=len(ts),
        fps=len(ts) / duration if duration > 0 else 0.0,
        timestamps=ts,
        pts=raw,
        key_pts=np.unique(np.asarray(keys, dtype=np.int64)),
    )


def _first_frame_rotation(container, stream, deadline: float) -> int:
    """PyAV 18 exposes the display matrix on frames only, so decode the first frame (size-capped)."""
    container.seek(0, stream=stream)
    for packet in container.demux(stream):
        if time.monotonic() > deadline:
            raise MediaError("decode_timeout", "probing took too long")
        try:
            for frame in packet.decode():
                return int(round(frame.rotation / 90.0)) * 90 % 360
        except av.FFmpegError:
            continue
    raise MediaError("corrupt_media", "no frame could be decoded")


def probe_video(path: str | os.PathLike, limits: MediaLimits = MediaLimits()) -> VideoInfo:
    """Container/codec allowlist, size, duration and frame-count checks; decodes at most one frame."""
    _check_file(path, limits)
    deadline = time.monotonic() + limits.decode_timeout_s
    container = _open(path)
    try:
        return _probe_open(container, limits, deadline)
    finally:
        container.close()


# ----------------------------------------------------------------------------------------- sample


def sample_indices(timestamps: np.ndarray, num_frames: int) -> np.ndarray:
    """Uniform in *time* (correct for variable frame rate): targets evenly spaced from the first to the
    last timestamp, each mapped to the nearest frame; duplicates (fewer frames than asked) dropped."""
    n = len(timestamps)
    if num_frames <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    if num_frames >= n:
        return np.arange(n, dtype=np.int64)
    targets = np.linspace(timestamps[0], timestamps[-1], num_frames)
    right = np.clip(np.searchsorted(timestamps, targets), 1, n - 1)
    left = right - 1
    nearest = np.where(targets - timestamps[left] <= timestamps[right] - targets, left, right)
    return np.unique(nearest).astype(np.int64)


def _select(info: VideoInfo, num_frames: int, must_include: Iterable[int], limits: MediaLimits) -> np.ndarray:
    if num_frames < 0:
        raise MediaError("invalid_argument", "num_frames must be >= 0")
    if num_frames > limits.max_frames:
        raise MediaError("too_many_frames", f"{num_frames} frames asked, the limit is {limits.max_frames}")
    extra = sorted({int(i) for i in must_include})
    for i in extra:
        if i < 0 or i >= info.frame_count:
            raise MediaError(
                "frame_out_of_range", f"frame {i} is outside the video (0..{info.frame_count - 1})"
            )
    chosen = np.union1d(sample_indices(info.timestamps, num_frames), np.asarray(extra, dtype=np.int64))
    if len(chosen) > limits.max_frames:
        raise MediaError(
            "too_many_frames",
            f"{len(chosen)} frames (sampled + region frames) exceed the limit of {limits.max_frames}",
        )
    if len(chosen) == 0:
        raise MediaError("invalid_argument", "no frames requested")
    return chosen.astype(np.int64)


# ----------------------------------------------------------------------------------------- decode


def _decode_targets(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, want: dict[int, int],
    got: np.ndarray, key_pts: np.ndarray | None, store: Callable[[int, av.VideoFrame], None], deadline: float,
    limits: MediaLimits,
) -> int:
    """Decode forward until every wanted pts (`want`: pts -> sample slot) not yet `got` was output, handing
    each wanted frame to `store(slot, frame)` and marking it got. With `key_pts`, jump to the keyframe at or
    before the next missing target whenever that keyframe lies past the frames already decoded: a long
    video's 32 samples cost ~32 half-GOPs instead of every frame (a 10-minute 4K upload decoded linearly ran
    into the decode timeout). Decoding from a keyframe gives the same pixels. Returns the frames decoded."""
    decoded = 0
    pos: int | None = None  # pts of the last frame out of the decoder; None = not started
    for t in sorted(want):
        if got[want[t]]:
            continue
        start = 0
        if key_pts is not None and len(key_pts) and key_pts[0] <= t:
            start = int(key_pts[np.searchsorted(key_pts, t, side="right") - 1])
        if pos is None or (key_pts is not None and start > pos):
            container.seek(start, stream=stream, backward=True, any_frame=False)  # flushes the decoder
            pos = None
        for packet in container.demux(stream):
            if time.monotonic() > deadline:
                raise MediaError("decode_timeout", f"decoding took more than {limits.decode_timeout_s:.0f} s")
            try:
                out = packet.decode()
            except av.FFmpegError:
                continue  # skip a corrupt packet; the decoder resyncs at the next keyframe
            for frame in out:  # all of a packet's frames: a later one may be a target too
                p = frame.pts if frame.pts is not None else frame.dts
                if p is None:
                    continue
                decoded += 1
                pos = int(p)
                k = want.get(pos)
                if k is not None and not got[k]:
                    store(k, frame)
                    got[k] = True
            if pos is not None and pos >= t:
                break
        else:
            return decoded  # end of stream
    return decoded


def _decode_in_process(
    path: str, num_frames: int, limits: MediaLimits, must_include: tuple[int, ...], max_side: int | None,
    seek: bool = True,
) -> DecodedVideo:
    _check_file(path, limits)
    deadline = time.monotonic() + limits.decode_timeout_s
    container = _open(path)
    try:
        if container.streams.video:
            # Frame + slice threads: several times faster; must be set before the codec opens.
            container.streams.video[0].thread_type = "AUTO"
        info = _probe_open(container, limits, deadline)
        chosen = _select(info, num_frames, must_include, limits)
        stream = container.streams.video[0]
        # Decoded frame -> original index through its pts (robust to skipped corrupt packets).
        want = {int(info.pts[i]): k for k, i in enumerate(chosen)}
        out_w, out_h = _output_size(info.display_size, max_side)
        coded_w, coded_h = (out_h, out_w) if info.rotation % 180 else (out_w, out_h)
        frames = np.zeros((len(chosen), out_h, out_w, 3), dtype=np.uint8)
        got = np.zeros(len(chosen), dtype=bool)

        def store(k: int, frame: av.VideoFrame) -> None:
            arr = frame.to_ndarray(format="rgb24", width=coded_w, height=coded_h)
            frames[k] = np.rot90(arr, k=info.rotation // 90) if info.rotation else arr

        decoded = _decode_targets(container, stream, want, got, info.key_pts if seek else None, store, deadline, limits)
        if not got.all() and seek:  # a seek that landed wrong: the missing frames by a plain pass from the start
            decoded += _decode_targets(container, stream, want, got, None, store, deadline, limits)
        if not got.all():
            missing = [int(chosen[k]) for k in np.flatnonzero(~got)]
            if got.sum() == 0:
                raise MediaError("corrupt_media", "no frame could be decoded")
            # Partially corrupt: fill each missing frame with its nearest decoded neighbour, so the
            # sample keeps its shape; refuse when more than a quarter is missing (not "usable").
            if len(missing) * 4 > len(chosen):
                raise MediaError("corrupt_media", f"{len(missing)} of {len(chosen)} frames could not be decoded")
            ok = np.flatnonzero(got)
            for k in np.flatnonzero(~got):
                frames[k] = frames[ok[np.argmin(np.abs(ok - k))]]
        return DecodedVideo(
            frames=frames,
            indices=chosen,
            timestamps=info.timestamps[chosen],
            rotation=info.rotation,
            source_size=info.display_size,
            info=info,
            frames_decoded=decoded,
        )
    finally:
        container.close()


def _output_size(display: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    w, h = display
    if max_side is None or max(w, h) <= max_side:
        return w, h
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _child(conn, args) -> None:
    try:
        result = _decode_in_process(*args)
        frames = np.ascontiguousarray(result.frames)
        result.frames = np.zeros((0,), dtype=np.uint8)
        conn.send_bytes(pickle.dumps(("ok", result, frames.shape)))
        _write_all(conn.fileno(), memoryview(frames).cast("B"))
    except MediaError as e:
        conn.send_bytes(pickle.dumps(("err", e, None)))
    except Exception as e:  # noqa: BLE001 - anything else from FFmpeg on hostile input is "corrupt"
        conn.send_bytes(pickle.dumps(("err", MediaError("corrupt_media", f"{type(e).__name__}: {e}"), None)))
    finally:
        conn.close()


# The frames (e.g. 32 x 640x480 RGB = 29 MB) cross the pipe as raw bytes straight into the parent's array:
# Connection.send_bytes/recv_bytes would buffer them through BytesIO and copy them three more times
# (a 32-frame decode, child included, went from 0.21 to 0.18 s on the dev box).
def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _read_into(fd: int, out: np.ndarray, deadline: float) -> None:
    """Fill `out` from the pipe; decode_timeout past `deadline`, EOFError when the child died mid-way
    (the caller reports that as corrupt_media)."""
    view = memoryview(out).cast("B")
    got = 0
    while got < len(view):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise MediaError("decode_timeout", "decoder stopped while sending frames")
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError
        got += n


def _widen_pipe(fd: int) -> None:
    """A 1 MiB pipe buffer instead of Linux's 64 KiB: 29 MB of frames cross in ~30 wakeups, not ~450
    (dev box, 32 frames 640x480: 0.05-0.15 -> 0.02-0.04 s). Best effort: the system's pipe-max-size may refuse."""
    with contextlib.suppress(AttributeError, OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)


_CTX: mp.context.BaseContext | None = None


def _context() -> mp.context.BaseContext:
    global _CTX
    if _CTX is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["service.media"])
        _CTX = ctx
    return _CTX


def decode_video(
    path: str | os.PathLike,
    num_frames: int,
    limits: MediaLimits = MediaLimits(),
    must_include: Iterable[int] = (),
    *,
    max_side: int | None = None,
    isolate: bool = True,
    seek: bool = True,
) -> DecodedVideo:
    """Sample `num_frames` frames uniformly in time plus every frame in `must_include` (original
    indices, e.g. frames that regions were drawn on) and decode them, rotation applied.

    `max_side` downscales (in swscale, while converting) so the long side is at most that; masks must
    then be resized with `resize_mask`. `isolate=False` decodes in this process (deadline checked only
    between packets): for callers that already run this in a killable pool. `seek=False` decodes every
    frame from the start (the reference the keyframe-seeking default is tested and benchmarked against).
    """
    args = (str(path), int(num_frames), limits, tuple(int(i) for i in must_include), max_side, seek)
    if not isolate:
        return _decode_in_process(*args)
    _check_file(path, limits)  # fail fast without a process for the common rejections
    recv, send = _context().Pipe(duplex=False)
    _widen_pipe(recv.fileno())
    proc = _context().Process(target=_child, args=(send, args), daemon=True)
    proc.start()
    send.close()
    # Grace on top of the in-child deadline: the child's own check reports the nicer error first.
    deadline = time.monotonic() + limits.decode_timeout_s + 2.0
    try:
        if not recv.poll(max(0.0, deadline - time.monotonic())):
            raise MediaError("decode_timeout", f"decoding took more than {limits.decode_timeout_s:.0f} s")
        status, payload, shape = pickle.loads(recv.recv_bytes())
        if status == "err":
            raise payload
        payload.frames = np.empty(shape, dtype=np.uint8)
        _read_into(recv.fileno(), payload.frames, deadline)
        return payload
    except EOFError:
        raise MediaError("corrupt_media", "the decoder process died") from None
    finally:
        recv.close()
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)


# ------------------------------------------------------------------------------------------ image

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


def _open_image(data: bytes | str | os.PathLike, limits: MediaLimits) -> Image.Image:
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


def _load(img: Image.Image) -> None:
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
    img = _open_image(data, limits)
    if max_side is not None and img.format == "JPEG":
        w, h = img.size
        scale = max_side / max(w, h)
        if scale < 1:
            img.draft("RGB", (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
    _load(img)
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError("corrupt_media", f"bad EXIF data: {e}") from None
    img = img.convert("RGB")
    if max_side is not None:
        out = _output_size(img.size, max_side)
        if out != img.size:
            img = img.resize(out, Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


def image_size(data: bytes | str | os.PathLike, limits: MediaLimits = MediaLimits()) -> tuple[int, int]:
    """(W, H) of the image as displayed (EXIF rotation applied), from the header only."""
    img = _open_image(data, limits)
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError):
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# ------------------------------------------------------------------------------------------ masks


def _rotate_mask(mask: np.ndarray, rotation: int) -> np.ndarray:
    if rotation % 90:
        raise MediaError("invalid_argument", f"rotation {rotation} is not a multiple of 90")
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(mask, k=k)) if k else mask


def _coded_size(size: tuple[int, int], rotation: int) -> tuple[int, int]:
    w, h = size
    return (h, w) if rotation % 180 else (w, h)


def mask_from_png(data: bytes, size: tuple[int, int], rotation: int = 0) -> np.ndarray:
    """Mask PNG -> bool [H, W] on the displayed frame of size `size` = (W, H).

    In region: any non-zero colour/grey value; with an alpha channel, also alpha > 0 (so both
    "white on black" and "paint on transparent" exports work). With `rotation` != 0 the PNG is in the
    coded (unrotated) frame, i.e. its size is (H, W) for 90/270, and is rotated like the frames.
    """
    expect = _coded_size(size, rotation)
    try:  # the exact-size check below is the pixel cap; a header over any cap is simply the wrong size
        img = _open_image(data, MediaLimits(max_pixels=max(1, expect[0] * expect[1])))
    except MediaError as e:
        if e.code != "resolution_too_large":
            raise
        raise MediaError("mask_size_mismatch", f"mask is larger than the {expect[0]}x{expect[1]} frame") from None
    if img.format != "PNG":
        raise MediaError("invalid_mask", "masks must be PNG")
    if img.size != expect:
        raise MediaError(
            "mask_size_mismatch", f"mask is {img.size[0]}x{img.size[1]}, the frame is {expect[0]}x{expect[1]}"
        )
    _load(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    arr = np.asarray(img)
    if arr.ndim == 2:
        mask = arr != 0
    else:
        # Channel by channel, in place: one bool plane of transient memory instead of a bool copy of
        # every channel (a 40 MP RGBA mask: 40 MB, not 160 MB on top of the pixels).
        alpha = img.mode in ("LA", "RGBA", "La", "RGBa")
        colour = arr.shape[-1] - 1 if alpha else arr.shape[-1]
        mask = arr[..., 0] != 0
        for c in range(1, colour):
            mask |= arr[..., c] != 0
        if alpha:
            mask &= arr[..., -1] != 0
    del arr, img
    return _rotate_mask(mask, rotation)


def mask_from_box(box: Iterable[float], size: tuple[int, int], rotation: int = 0) -> np.ndarray:
    """Box [x0, y0, x1, y1] in pixels (pixel u spans [u, u+1)) -> bool [H, W] on the displayed frame.

    Parts outside the frame are clipped; a box entirely outside is `box_out_of_frame`, a degenerate
    one `empty_box`. With `rotation` != 0 the box is in coded-frame coordinates.
    """
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise MediaError("invalid_box", "a box is four numbers [x0, y0, x1, y1]") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise MediaError("invalid_box", "box coordinates must be finite")
    if x1 <= x0 or y1 <= y0:
        raise MediaError("empty_box", f"box {[x0, y0, x1, y1]} has no area (need x1 > x0, y1 > y0)")
    w, h = _coded_size(size, rotation)
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        raise MediaError("box_out_of_frame", f"box {[x0, y0, x1, y1]} is outside the {w}x{h} frame")
    u0, v0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    u1, v1 = min(w, math.ceil(x1)), min(h, math.ceil(y1))
    mask = np.zeros((h, w), dtype=bool)
    mask[v0:v1, u0:u1] = True
    return _rotate_mask(mask, rotation)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to (W, H) (for frames decoded with `max_side`)."""
    h, w = mask.shape
    if (w, h) == tuple(size):
        return mask
    out_w, out_h = size
    rows = np.minimum((np.arange(out_h) + 0.5) * h / out_h, h - 1).astype(np.int64)
    cols = np.minimum((np.arange(out_w) + 0.5) * w / out_w, w - 1).astype(np.int64)
    return mask[rows[:, None], cols[None, :]]


# ------------------------------------------------------------------------------------------- hash


def content_hash(data: bytes | str | os.PathLike | BinaryIO, chunk: int = 1 << 20) -> str:
    """sha256 hex of the upload, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    if isinstance(data, (bytes, bytearray, memoryview)):
        h.update(data)
        return h.hexdigest()
    if isinstance(data, (str, os.PathLike, Path)):
        with open(data, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        return h.hexdigest()
    while block := data.read(chunk):
        h.update(block)
    return h.hexdigest()
