"""Where a backend computes (the device) and what it loads (its weights, or the tiny demo model)."""
from __future__ import annotations

import tempfile
from collections.abc import Callable

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
