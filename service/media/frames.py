"""Decode a video's sampled frames in this process: seek to the keyframe before each sample, display
rotation applied, a few undecodable frames filled from their neighbours. `decode_child.decode_video` is
the served entry point; this is what it runs in the child."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np

from service.media.limits import MediaError, MediaLimits, scaled_size
from service.media.probe import VideoInfo, check_file, open_container, probe_open
from service.media.sampling import select_frames


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


def decode_frames(
    path: str, num_frames: int, limits: MediaLimits, must_include: tuple[int, ...], max_side: int | None,
    seek: bool = True,
) -> DecodedVideo:
    check_file(path, limits)
    deadline = time.monotonic() + limits.decode_timeout_s
    container = open_container(path)
    try:
        if container.streams.video:
            # Frame + slice threads: several times faster; must be set before the codec opens.
            container.streams.video[0].thread_type = "AUTO"
        info = probe_open(container, limits, deadline)
        chosen = select_frames(info, num_frames, must_include, limits)
        stream = container.streams.video[0]
        # Decoded frame -> original index through its pts (robust to skipped corrupt packets).
        want = {int(info.pts[i]): k for k, i in enumerate(chosen)}
        out_w, out_h = scaled_size(info.display_size, max_side)
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
