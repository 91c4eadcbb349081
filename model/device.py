"""Where a backend computes (the device) and what it loads (its weights, or the tiny demo model)."""
from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Callable, Iterator

import torch


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_dir_or_tiny(model_dir: str | None, prefix: str, build: Callable[[str], str]) -> tuple[str, tempfile.TemporaryDirectory[str] | None]:
    """A backend's weights: the given directory, or (demo / tests) a tiny random model built into a
    temporary directory that the caller keeps alive for as long as it uses the model."""
    if model_dir is not None:
        return model_dir, None
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    return str(build(tmp.name)), tmp


_THREAD = threading.local()


@contextlib.contextmanager
def thread_stream(device: torch.device) -> Iterator[None]:
    """Run the block on this thread's own CUDA stream (created once per thread and device); a no-op off CUDA.

    Point-map batches of concurrent jobs run in several threads (SR3D_DEPTH_STREAMS): on one stream, every
    host step of one batch (a result's copy to pinned memory, a `.cpu()` of the cameras, the median's
    selection) would wait for the other batch's kernels too; on their own streams one batch's network runs
    while another's results come back to the host. The maths is the same; only the order across batches is
    free. The block's results are synchronised before it returns (callers hand host arrays on)."""
    if device.type != "cuda":
        yield
        return
    streams = getattr(_THREAD, "streams", None)
    if streams is None:
        streams = _THREAD.streams = {}
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in streams:
        streams[key] = torch.cuda.Stream(device=key)
    stream = streams[key]
    stream.wait_stream(torch.cuda.current_stream(key))  # e.g. weights just loaded on the default stream
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()
