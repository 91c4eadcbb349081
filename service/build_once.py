"""Build a model directory once, whatever number of processes start at the same time."""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """Make `target` (a directory holding config.json) by `build(tmp_dir)` unless it exists.

    Gateway + worker, or several workers, may race here: an flock serialises them, and the build is
    written to a temp dir that is renamed into place, so nobody ever sees half a directory."""
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
            try:
                build(tmp)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target
