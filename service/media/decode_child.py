"""`decode_video`: `frames.decode_frames` in a child process the parent kills at the deadline, so a packet
that makes FFmpeg spin forever cannot hold the worker; the frames come back over a pipe as raw bytes."""
from __future__ import annotations

import contextlib
import fcntl
import multiprocessing as mp
import os
import pickle
import select
import time
from collections.abc import Iterable

import numpy as np

from service.media.frames import DecodedVideo, decode_frames
from service.media.limits import MediaError, MediaLimits
from service.media.probe import check_file


def _child(conn, args) -> None:
    try:
        result = decode_frames(*args)
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
        ctx.set_forkserver_preload(["service.media.decode_child"])
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
        return decode_frames(*args)
    check_file(path, limits)  # fail fast without a process for the common rejections
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
