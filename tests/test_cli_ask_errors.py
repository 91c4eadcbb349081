"""`sr3d ask` failures end in one line on stderr and a non-zero exit, never a traceback (issue 28:
a dead URL was retried six times over ~12 s without naming it; a missing file ended in a traceback;
`--url` had no help text). Run as a user runs it: a subprocess of the real CLI."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e_helpers import find_fixture

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


def ask(*argv: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "service.cli", "ask", *argv], capture_output=True, text=True,
                       cwd=ROOT, timeout=60, env={**os.environ, **(env or {})})
    return p, time.monotonic() - t0


def dead_url() -> str:
    """A loopback port nothing listens on (bound, then closed: the kernel refuses connections)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_dead_url_fails_fast_in_one_line_naming_the_url() -> None:
    url = dead_url()
    video = str(find_fixture("intel_bottles_tabletop_8s.mp4"))
    p, took = ask(video, "--url", url, "--region", "0:40,120,200,330", "What is <region0>?")
    assert p.returncode == 1
    line = one_line(p.stderr)
    assert url in line and "cannot connect" in line
    assert took < 8, f"took {took:.1f} s"  # a short bounded retry (2 x 0.5 s), not a dozen seconds

    # The default comes from SR3D_URL when --url is not given.
    p, _ = ask(video, "--region", "0:40,120,200,330", "What is <region0>?", env={"SR3D_URL": url})
    assert p.returncode == 1 and url in one_line(p.stderr)


def test_missing_file_is_one_line_and_exit_2() -> None:
    p, _ = ask("nope.mp4", "--region", "0:1,1,5,5", "What is <region0>?", "--url", dead_url())
    assert p.returncode == 2
    assert one_line(p.stderr) == "sr3d ask: nope.mp4: no such file"
    p, _ = ask(str(find_fixture("intel_bottles_tabletop_8s.mp4")), "--mask", "0:nope.png",
               "What is <region0>?", "--url", dead_url())
    assert p.returncode == 2 and "nope.png" in one_line(p.stderr)


def test_malformed_url_is_one_line() -> None:
    p, _ = ask(str(find_fixture("intel_bottles_tabletop_8s.mp4")), "--url", "127.0.0.1:8000",
               "--region", "0:1,1,5,5", "What is <region0>?")
    assert p.returncode == 1 and "127.0.0.1:8000" in one_line(p.stderr)


def test_url_option_has_help_and_documented_default() -> None:
    p = subprocess.run([sys.executable, "-m", "service.cli", "ask", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60, env={k: v for k, v in os.environ.items() if k != "SR3D_URL"})
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    assert "--url URL base URL of the service (default: $SR3D_URL, else http://127.0.0.1:8000" in text
