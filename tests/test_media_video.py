"""Video probing, sampling and decoding on synthetic clips (frame index encoded in the pixels) and real ones."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from service.api.errors import status_for
from service.media.decode_child import decode_video
from service.media.limits import MediaError, MediaLimits
from service.media.probe import probe_video

DATA = Path(__file__).parent / "data" / "video"
BITS, W, H = 8, 128, 48  # 8 stripes of 16 px: frame index in binary, black = 0, white = 1


def _pattern(index: int) -> np.ndarray:
    img = np.zeros((H, W, 3), np.uint8)
    for b in range(BITS):
        if index >> b & 1:
            img[:, b * 16 : (b + 1) * 16] = 255
    return img


def _read_index(frame: np.ndarray) -> int:
    """Inverse of _pattern on a decoded (lossy) frame: the centre of each stripe."""
    centres = frame[:, 8::16, :].mean(axis=(0, 2))
    return int(sum(1 << b for b in range(BITS) if centres[b] > 127))


def _write(path: Path, pts_ms: list[int] | None = None, n: int = 60, rotation: int = 0, codec: str = "libx264",
           container_opts: dict | None = None) -> Path:
    out = av.open(str(path), "w", options=container_opts or {})
    s = out.add_stream(codec, rate=30)
    s.width, s.height, s.pix_fmt = W, H, "yuv420p"
    if codec == "libx264":
        s.options = {"crf": "10", "preset": "ultrafast"}
    if pts_ms is not None:
        s.time_base = s.codec_context.time_base = Fraction(1, 1000)
    if rotation:
        s.set_display_rotation(rotation)
    count = n if pts_ms is None else len(pts_ms)
    for i in range(count):
        frame = av.VideoFrame.from_ndarray(_pattern(i), format="rgb24")
        if pts_ms is not None:
            frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
        for p in s.encode(frame):
            out.mux(p)
    for p in s.encode():
        out.mux(p)
    out.close()
    return path


def _nearest_uniform(times: list[float], n: int) -> list[int]:
    """Independent statement of the sampling rule: n evenly spaced instants, nearest frame each."""
    picks = []
    for k in range(n):
        t = times[0] + (times[-1] - times[0]) * k / (n - 1)
        picks.append(min(range(len(times)), key=lambda i: (abs(times[i] - t), i)))
    return sorted(set(picks))


def test_cfr_samples_exact_frames(tmp_path: Path) -> None:
    path = _write(tmp_path / "cfr.mp4", n=60)
    info = probe_video(path)
    assert (info.codec, info.width, info.height, info.frame_count, info.rotation) == ("h264", W, H, 60, 0)
    video = decode_video(path, 8)
    expected = _nearest_uniform([i / 30 for i in range(60)], 8)
    assert list(video.indices) == expected
    assert [_read_index(f) for f in video.frames] == expected  # the pixels really are those frames
    assert video.frames.shape == (8, H, W, 3) and video.frames.dtype == np.uint8
    np.testing.assert_allclose(video.timestamps, np.array(expected) / 30, atol=1e-3)


def test_vfr_samples_by_time_not_index(tmp_path: Path) -> None:
    # 10 slow frames (~200 ms apart), a burst of 40 frames 10 ms apart, 10 slow frames again.
    pts = [203 * i for i in range(10)]
    pts += [pts[-1] + 10 * (i + 1) for i in range(40)]
    pts += [pts[-1] + 197 * (i + 1) for i in range(10)]
    path = _write(tmp_path / "vfr.mkv", pts_ms=pts)
    info = probe_video(path)
    np.testing.assert_allclose(info.timestamps, np.array(pts) / 1000, atol=1e-6)
    video = decode_video(path, 7)
    expected = _nearest_uniform([p / 1000 for p in pts], 7)
    assert expected != sorted(set(np.linspace(0, 59, 7).round().astype(int).tolist()))  # the test can tell
    assert list(video.indices) == expected
    assert [_read_index(f) for f in video.frames] == expected
    np.testing.assert_allclose(video.timestamps, np.array(pts)[expected] / 1000, atol=1e-6)


@pytest.mark.parametrize("rotation", [90, 270])
def test_rotation_applied_and_reported(tmp_path: Path, rotation: int) -> None:
    path = _write(tmp_path / "rot.mp4", n=20, rotation=rotation)
    info = probe_video(path)
    assert info.rotation == rotation and info.display_size == (H, W)
    video = decode_video(path, 4, must_include=[5])
    assert video.frames.shape == (5, W, H, 3) and video.rotation == rotation and video.source_size == (H, W)
    # Undo the display rotation: the coded picture (stripes across the width) comes back.
    got = [_read_index(np.rot90(f, k=-rotation // 90)) for f in video.frames]
    assert got == list(video.indices) and 5 in got


def test_must_include_and_index_of(tmp_path: Path) -> None:
    path = _write(tmp_path / "cfr.mp4", n=60)
    video = decode_video(path, 4, must_include=[7, 33, 0])
    assert list(video.indices) == sorted(set(_nearest_uniform([i / 30 for i in range(60)], 4)) | {7, 33})
    for original in (7, 33, 0):
        assert _read_index(video.frames[video.index_of(original)]) == original
    with pytest.raises(MediaError) as e:
        video.index_of(8)
    assert e.value.code == "frame_out_of_range"


def test_frame_out_of_range_and_too_many_frames(tmp_path: Path) -> None:
    path = _write(tmp_path / "cfr.mp4", n=30)
    with pytest.raises(MediaError) as e:
        decode_video(path, 4, must_include=[30])
    assert e.value.code == "frame_out_of_range" and status_for(e.value.code) == 422
    with pytest.raises(MediaError) as e:
        decode_video(path, 4, MediaLimits(max_frames=5), must_include=[1, 2, 3, 5, 9])
    assert e.value.code == "too_many_frames"
    with pytest.raises(MediaError) as e:
        decode_video(path, 65)
    assert e.value.code == "too_many_frames"


def test_max_side_downscales(tmp_path: Path) -> None:
    path = _write(tmp_path / "cfr.mp4", n=10)
    video = decode_video(path, 3, max_side=64)
    assert video.frames.shape == (3, 24, 64, 3) and video.source_size == (W, H)


@pytest.mark.parametrize("name,codec", [("intel_bottles_tabletop_8s.mp4", "h264"), ("intel_bottles_tabletop_8s.webm", "vp9")])
def test_real_clips(name: str, codec: str) -> None:
    info = probe_video(DATA / name)
    assert (info.codec, info.width, info.height, info.frame_count) == (codec, 640, 360, 250)
    assert abs(info.duration_s - 8.38) < 0.05
    video = decode_video(DATA / name, 16, must_include=[249])
    assert video.frames.shape == (16, 360, 640, 3) and video.indices[-1] == 249
    assert video.frames[:, 100:260].mean() > 60  # real content: a lit table, not black frames


def test_mp4_and_webm_give_the_same_frames() -> None:
    a = decode_video(DATA / "intel_bottles_tabletop_8s.mp4", 6)
    b = decode_video(DATA / "intel_bottles_tabletop_8s.webm", 6)
    assert list(a.indices) == list(b.indices)
    diff = np.abs(a.frames.astype(np.int16) - b.frames.astype(np.int16)).mean()
    assert diff < 4  # VP9 re-encode of the same frames (PSNR ~44 dB)


def test_in_process_decode_matches_isolated() -> None:
    a = decode_video(DATA / "intel_bottles_tabletop_8s.mp4", 5)
    b = decode_video(DATA / "intel_bottles_tabletop_8s.mp4", 5, isolate=False)
    assert np.array_equal(a.frames, b.frames) and list(a.indices) == list(b.indices)


# ------------------------------------------------------------------------------------ bad input


def _code(fn, *args, **kwargs) -> str:
    with pytest.raises(MediaError) as e:
        fn(*args, **kwargs)
    assert 400 <= status_for(e.value.code) < 500 and e.value.message
    return e.value.code


def test_text_file_named_mp4(tmp_path: Path) -> None:
    p = tmp_path / "notes.mp4"
    p.write_text("this is not a video\n" * 50)
    assert _code(decode_video, p, 4) == "unsupported_container"
    assert _code(probe_video, p) == "unsupported_container"


def test_truncated_without_index_is_corrupt(tmp_path: Path) -> None:
    full = _write(tmp_path / "full.mp4", n=60)  # PyAV writes the moov index at the end
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    assert _code(decode_video, cut, 4) == "corrupt_media"


def test_truncated_faststart_decodes_what_is_there(tmp_path: Path) -> None:
    data = (DATA / "intel_bottles_tabletop_8s.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    video = decode_video(cut, 8)
    assert 0 < video.indices[-1] < 249 and video.frames.shape[0] == len(video.indices)
    cut.write_bytes(data[:2000])  # the header alone, no frame data
    assert _code(decode_video, cut, 8) == "corrupt_media"


def test_ten_hour_header_rejected_before_decoding(tmp_path: Path) -> None:
    # Two tiny frames, the second stamped at 10 h: the duration header alone must trigger the cap.
    path = _write(tmp_path / "long.mkv", pts_ms=[0, 36_000_000], codec="mpeg4")
    assert path.stat().st_size < 10_000
    assert _code(probe_video, path) == "too_long"
    assert _code(decode_video, path, 4) == "too_long"


def test_too_many_source_frames(tmp_path: Path) -> None:
    path = _write(tmp_path / "cfr.mp4", n=30)
    assert _code(probe_video, path, MediaLimits(max_source_frames=20)) == "too_long"


def test_resolution_and_size_caps(tmp_path: Path) -> None:
    path = _write(tmp_path / "cfr.mp4", n=5)
    assert _code(probe_video, path, MediaLimits(max_width=100, max_height=40)) == "resolution_too_large"
    assert _code(decode_video, path, 2, MediaLimits(max_bytes=100)) == "file_too_large"


def test_unsupported_codec_and_container(tmp_path: Path) -> None:
    mjpeg = tmp_path / "mjpeg.mkv"
    out = av.open(str(mjpeg), "w")
    s = out.add_stream("mjpeg", rate=10)
    s.width, s.height, s.pix_fmt = 32, 32, "yuvj420p"
    for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
        out.mux(p)
    for p in s.encode():
        out.mux(p)
    out.close()
    assert _code(decode_video, mjpeg, 2) == "unsupported_codec"
    avi = _write(tmp_path / "clip.avi", n=5, codec="mpeg4")
    assert _code(decode_video, avi, 2) == "unsupported_container"


def test_decode_deadline(tmp_path: Path) -> None:
    path = DATA / "intel_bottles_tabletop_8s.mp4"
    assert _code(decode_video, path, 8, MediaLimits(decode_timeout_s=0.0)) == "decode_timeout"


def test_frames_cross_the_pipe_raw_and_a_short_or_stalled_sender_is_an_error() -> None:
    """The decoder child writes the frames' raw bytes straight into the parent's array (no Connection
    buffering); a child that dies mid-way is EOF (-> corrupt_media), one that stalls hits the deadline."""
    import os
    import threading
    import time

    from service.media.decode_child import _read_into, _write_all

    frames = np.random.default_rng(0).integers(0, 255, (3, 70, 90, 3), dtype=np.uint8)  # > one pipe buffer
    r, w = os.pipe()
    t = threading.Thread(target=lambda: (_write_all(w, memoryview(frames).cast("B")), os.close(w)))
    t.start()
    out = np.empty_like(frames)
    _read_into(r, out, time.monotonic() + 10)
    t.join()
    os.close(r)
    assert np.array_equal(out, frames)

    r, w = os.pipe()
    os.write(w, b"x" * 100)
    os.close(w)
    with pytest.raises(EOFError):
        _read_into(r, np.empty(1000, np.uint8), time.monotonic() + 10)
    os.close(r)

    r, w = os.pipe()
    os.write(w, b"x" * 100)
    t0 = time.monotonic()
    with pytest.raises(MediaError) as e:
        _read_into(r, np.empty(1000, np.uint8), time.monotonic() + 0.3)
    assert e.value.code == "decode_timeout" and time.monotonic() - t0 < 5
    os.close(r)
    os.close(w)


def test_the_frame_pipe_is_widened_where_the_system_allows() -> None:
    """32 frames of 640x480 are 29 MB: through Linux's default 64 KiB pipe that is ~450 wake-ups (0.05-0.15 s on
    the dev box); the decoder's pipe asks for 1 MiB, and a refusal (pipe-max-size, not Linux) leaves it working."""
    import fcntl
    import os

    from service.media.decode_child import _widen_pipe

    limit = Path("/proc/sys/fs/pipe-max-size")
    if not hasattr(fcntl, "F_GETPIPE_SZ") or not limit.exists() or int(limit.read_text()) < 1 << 20:
        pytest.skip("needs Linux pipes that may grow to 1 MiB (fcntl F_SETPIPE_SZ, /proc/sys/fs/pipe-max-size)")
    r, w = os.pipe()
    try:
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) < 1 << 20
        _widen_pipe(r)
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) == 1 << 20
    finally:
        os.close(r)
        os.close(w)
    _widen_pipe(r)  # a refusal (here: a closed descriptor, EBADF) is not an error


def _long(path: Path, codec: str, n: int = 600, gop: int = 30) -> Path:
    """A clip whose samples are sparser than its keyframes (n frames, a keyframe every `gop`)."""
    out = av.open(str(path), "w")
    s = out.add_stream(codec, rate=30)
    s.width, s.height, s.pix_fmt = W, H, "yuv420p"
    s.codec_context.gop_size = gop
    if codec == "libx264":  # B-frames (reordered output) and no scene-cut keyframes: the plainest hard case
        s.options = {"crf": "10", "preset": "veryfast", "bf": "2", "g": str(gop), "sc_threshold": "0"}
    for i in range(n):
        for p in s.encode(av.VideoFrame.from_ndarray(_pattern(i % 256), format="rgb24")):
            out.mux(p)
    for p in s.encode():
        out.mux(p)
    out.close()
    return path


@pytest.mark.parametrize("codec,ext", [("libx264", "mp4"), ("mpeg4", "mp4"), ("libvpx-vp9", "webm")])
def test_a_long_video_seeks_to_keyframes_for_the_same_frames(tmp_path: Path, codec: str, ext: str) -> None:
    """Sampling 8 of 600 frames with a keyframe every 30: decoding from the keyframe before each sample gives
    exactly the frames a decode of every frame gives, and decodes a fraction of them (a 10-minute upload would
    otherwise be decoded whole, into the decode timeout)."""
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder to make the clip")
    clip = _long(tmp_path / f"long.{ext}", codec)
    info = probe_video(clip)
    assert info.frame_count == 600 and 15 <= len(info.key_pts) <= 60  # every 30 frames (encoders add scene cuts)
    seek = decode_video(clip, 8, isolate=False)
    plain = decode_video(clip, 8, isolate=False, seek=False)
    assert np.array_equal(seek.indices, plain.indices) and np.array_equal(seek.frames, plain.frames)
    assert [_read_index(f) for f in seek.frames] == [int(i) % 256 for i in seek.indices]
    assert plain.frames_decoded == 600 and 0 < seek.frames_decoded < 600 // 3
    isolated = decode_video(clip, 8)  # the served path: the same frames from the child
    assert np.array_equal(isolated.frames, seek.frames) and isolated.frames_decoded == seek.frames_decoded


def test_a_seek_that_lands_past_its_target_falls_back_to_decoding_from_the_start(tmp_path: Path, monkeypatch) -> None:
    """Some files seek imprecisely. Here every seek lands 45 frames late: the frames it skipped are decoded by
    a pass from the start, so the answer is still exactly the plain decode's."""
    from service.media import frames

    clip = _long(tmp_path / "long.mp4", "mpeg4")
    real_open = frames.open_container

    class LateSeeks:
        def __init__(self, container: av.container.InputContainer) -> None:
            self._c = container

        def __getattr__(self, name: str):  # noqa: ANN204 - a proxy
            return getattr(self._c, name)

        def seek(self, offset: int, **kw) -> None:  # noqa: ANN003
            stream = kw.get("stream")
            late = int(45 / (30 * stream.time_base)) if offset and stream is not None else 0
            self._c.seek(offset + late, **kw)

    monkeypatch.setattr(frames, "open_container", lambda path: LateSeeks(real_open(path)))
    got = decode_video(clip, 8, isolate=False)
    monkeypatch.setattr(frames, "open_container", real_open)
    plain = decode_video(clip, 8, isolate=False, seek=False)
    assert np.array_equal(got.frames, plain.frames)
    assert [_read_index(f) for f in got.frames] == [int(i) % 256 for i in got.indices]
