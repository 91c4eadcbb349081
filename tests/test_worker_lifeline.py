"""A SIGKILLed worker takes its engine processes with it (service/lifeline.py, issue 19).

The stand-in worker is a real Python process that calls `bind_children()` as `sr3d worker` does,
then starts an "engine core" the way vLLM does (a multiprocessing spawn child), which itself starts
a grandchild. The engine core holds an exclusive flock on a file, standing in for its GPU memory:
a restarted worker's engine core can only take it once the old one is really gone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest


pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")]

ROOT = Path(__file__).resolve().parents[1]

STAND_IN = textwrap.dedent('''
    import fcntl, multiprocessing as mp, os, signal, subprocess, sys, time

    def engine_core(gpu: str, pids: str, ignore_term: bool) -> None:
        if ignore_term:  # a core stuck in a kernel call: only SIGKILL gets it
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        gpu_fd = os.open(gpu, os.O_CREAT | os.O_RDWR)
        fcntl.flock(gpu_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while another core holds the "GPU"
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(pids, "w") as f:
            f.write(f"{os.getpid()} {helper.pid}")
        time.sleep(600)

    if __name__ == "__main__":
        from service.lifeline import bind_children
        bind_children(grace_s=1.0)
        gpu, pids, ignore_term = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
        core = mp.get_context("spawn").Process(target=engine_core, args=(gpu, pids, ignore_term))
        core.start()
        core.join()
        sys.exit(f"engine core exited with {core.exitcode}")
''')


# Generous: the reaper's grace is 1 s, but a loaded 2-core box may take a while to schedule it.
GONE_S = 15.0


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def start_worker(tmp: Path, name: str, ignore_term: bool = False) -> tuple[subprocess.Popen[bytes], list[int]]:
    """The stand-in worker and, once its engine core runs, [core pid, core's helper pid]."""
    script = tmp / "stand_in_worker.py"
    script.write_text(STAND_IN)
    pids = tmp / f"{name}.pids"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp / "gpu0.lock"), str(pids), "1" if ignore_term else "0"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        if proc.poll() is not None:
            raise AssertionError(f"stand-in worker exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("engine core did not start")
        time.sleep(0.05)
    return proc, [int(p) for p in pids.read_text().split()]


@pytest.mark.parametrize("ignore_term", [False, True], ids=["core-exits-on-sigterm", "core-ignores-sigterm"])
def test_sigkilled_worker_takes_its_engine_with_it_and_a_restart_starts_cleanly(tmp_path: Path, ignore_term: bool) -> None:
    started: list[int] = []
    try:
        proc, (core, helper) = start_worker(tmp_path, "first", ignore_term)
        reapers = [c.pid for c in psutil.Process(proc.pid).children() if c.pid != core]
        started += [proc.pid, core, helper, *reapers]
        group = os.getpgid(core)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_gone([core, helper, *reapers], timeout=GONE_S) == []
        assert group == proc.pid  # the worker led the engine's process group
        # A restarted worker on the same "GPU" gets it (its core exits at once while the old core holds the lock).
        proc2, (core2, helper2) = start_worker(tmp_path, "second")
        started += [proc2.pid, core2, helper2]
        assert alive(core2) and proc2.poll() is None
        proc2.send_signal(signal.SIGKILL)
        proc2.wait(10)
        assert wait_gone([core2, helper2], timeout=GONE_S) == []
    finally:
        for pid in started:  # only what this test started, and only if the code under test left it
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sr3d_worker_binds_its_children(tmp_path: Path, redis_url: str) -> None:
    """The real `sr3d worker` leads its own group and forks the reaper before loading anything; both
    are gone a few seconds after the worker is SIGKILLed (the CPU torch engine has no child of its own)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": redis_url, "SR3D_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--metrics-host", "127.0.0.1",
                             "--metrics-port", "0"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=False)
    try:
        deadline = time.monotonic() + 60
        while not (kids := psutil.Process(proc.pid).children()):
            assert proc.poll() is None and time.monotonic() < deadline, "no reaper forked"
            time.sleep(0.05)
        assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
        reaper = kids[0].pid
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_gone([reaper], timeout=GONE_S) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_started_in_a_terminal_it_keeps_the_terminals_group_so_ctrl_c_reaches_it() -> None:
    """`make run` in a terminal: Ctrl-C goes to the terminal's foreground group. A service that had
    moved to a group of its own would survive Ctrl-C (make dies, the server keeps port 8000)."""
    import pty

    code = ("import os; from service.lifeline import bind_children, in_terminal_foreground; "
            "before = os.getpgrp(); fg = in_terminal_foreground(); reaper = bind_children(); "
            "print('RESULT', fg, reaper, os.getpgrp() == before, flush=True)")
    pid, fd = pty.fork()
    if pid == 0:  # the child: session leader with the pty as its controlling terminal, in its foreground
        os.chdir(Path(__file__).resolve().parents[1])
        os.execv(sys.executable, [sys.executable, "-c", code])
    out = b""
    deadline = time.monotonic() + 60
    while b"\n" not in out.partition(b"RESULT")[2] and time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    line = out.partition(b"RESULT")[2].split(b"\n")[0].decode().split()
    assert line == ["True", "None", "True"], out.decode(errors="replace")


def test_without_a_terminal_it_leads_its_own_group_with_a_reaper() -> None:
    code = ("import os; from service.lifeline import bind_children; reaper = bind_children(); "
            "print(reaper is not None, os.getpgrp() == os.getpid())")
    out = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["True", "True"], out.stderr
