"""loadtests/cuda_mps.py: the bench's private CUDA MPS daemon, driven through a stand-in control program
(a shell script that behaves like `nvidia-cuda-mps-control`: `-d` creates the control pipe and returns,
`quit` on stdin removes it). What matters here is the contract the bench relies on: private pipe and log
directories, the client variables handed to the worker, `quit` sent on exit even when the body fails,
and a clear refusal when the control program is missing or fails."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from loadtests.cuda_mps import MPSUnavailable, client_env, mps_daemon

FAKE = """#!/bin/sh
echo "$@|$CUDA_MPS_PIPE_DIRECTORY|$CUDA_MPS_LOG_DIRECTORY|$CUDA_VISIBLE_DEVICES" >> "{calls}"
if [ "$1" = "-d" ]; then
  [ -n "{fail}" ] && {{ echo "An instance of this daemon is already running" >&2; exit 1; }}
  touch "$CUDA_MPS_PIPE_DIRECTORY/control"; exit 0
fi
read cmd; echo "stdin:$cmd" >> "{calls}"
[ "$cmd" = quit ] && rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"
exit 0
"""


def fake_control(tmp_path: Path, fail: bool = False) -> tuple[str, Path]:
    calls = tmp_path / "calls.txt"
    exe = tmp_path / "bin" / "fake-mps-control"
    exe.parent.mkdir()
    exe.write_text(FAKE.format(calls=calls, fail="yes" if fail else ""))
    exe.chmod(0o755)
    return str(exe), calls


def test_daemon_started_private_and_quit_on_exit(tmp_path: Path) -> None:
    exe, calls = fake_control(tmp_path)
    d = tmp_path / "mps"
    with pytest.raises(RuntimeError, match="body failed"):
        with mps_daemon(d, {"CUDA_VISIBLE_DEVICES": "1"}, control=exe) as env:
            # clients address the daemon's GPUs from 0: its GPU 1 is their GPU 0
            assert env == client_env(d, "1") and env["CUDA_VISIBLE_DEVICES"] == "0"
            assert client_env(d, "2,3")["CUDA_VISIBLE_DEVICES"] == "0,1" and "CUDA_VISIBLE_DEVICES" not in client_env(d)
            assert (d / "pipe" / "control").exists() and (d / "log").is_dir()
            raise RuntimeError("body failed")
    lines = calls.read_text().splitlines()
    pipe, log = str(d / "pipe"), str(d / "log")
    assert lines[0] == f"-d|{pipe}|{log}|1"
    assert lines[1] == f"|{pipe}|{log}|1" and lines[2] == "stdin:quit"
    assert not (d / "pipe" / "control").exists()


def test_missing_or_failing_control_program_is_a_clear_refusal(tmp_path: Path) -> None:
    with pytest.raises(MPSUnavailable, match="not on PATH"):
        with mps_daemon(tmp_path / "a", control="no-such-mps-control-program"):
            pass
    exe, calls = fake_control(tmp_path, fail=True)
    with pytest.raises(MPSUnavailable, match="already running"):
        with mps_daemon(tmp_path / "b", control=exe):
            pass
    assert len(calls.read_text().splitlines()) == 1  # nothing to quit: it never started
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
