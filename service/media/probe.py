"""Video file -> `VideoInfo`: size and container magic first, then the container and codec allowlists,
resolution and duration from the headers, and a packet scan for every frame's pts and the keyframes.
Decodes at most one frame (for the rotation)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import av
import numpy as np

from service.media.limits import MediaError, MediaLimits
from service.media.sniff import HEAD_BYTES, VIDEO_FAMILIES, sniff


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


_FORMAT_WHITELIST = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm"
_ALLOWED_CODECS = {"h264", "hevc", "vp8", "vp9", "av1", "mpeg4"}
_CODEC_ALIASES = {"libdav1d": "av1", "libaom-av1": "av1", "libvpx": "vp8", "libvpx-vp9": "vp9", "h265": "hevc"}


def _sniff_container(head: bytes) -> str:
    """Recognise MP4/MOV and Matroska/WebM by magic bytes (service/media/sniff.py, the gateway's rule too)
    before FFmpeg probes anything."""
    family = sniff(head)
    if family not in VIDEO_FAMILIES:
        raise MediaError("unsupported_container", "not an MP4/MOV/WebM/MKV file")
    return family


def check_file(path: str | os.PathLike, limits: MediaLimits) -> int:
    """The file's size, once it is under the byte cap, not empty, and an MP4/MOV/WebM/MKV by its magic."""
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


def open_container(path: str | os.PathLike) -> av.container.InputContainer:
    """Open with FFmpeg held to the allowed demuxers and to local files (no protocol a container could name)."""
    try:
        return av.open(
            str(path), options={"format_whitelist": _FORMAT_WHITELIST, "protocol_whitelist": "file"}
        )
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise MediaError("corrupt_media", f"cannot open the container ({type(e).__name__})") from None


def _codec_name(stream: av.video.stream.VideoStream) -> str:
    name = stream.codec_context.name
    return _CODEC_ALIASES.get(name, name)


def probe_open(container: av.container.InputContainer, limits: MediaLimits, deadline: float) -> VideoInfo:
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
    check_file(path, limits)
    deadline = time.monotonic() + limits.decode_timeout_s
    container = open_container(path)
    try:
        return probe_open(container, limits, deadline)
    finally:
        container.close()
