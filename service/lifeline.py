"""Processes a worker starts die with it, even when the worker is SIGKILLed.

vLLM runs its engine core in a child process (plus compile workers and a resource tracker). A
graceful stop closes them, but a SIGKILL or OOM-kill of the worker left them running and holding
the GPU, so a restarted worker on that GPU found its memory taken (issue 19). The kernel cannot be
asked to kill the children of a dead process, and vLLM's children are not ours to configure, so:

* the worker leads its own process group (every child inherits the group unless it leaves it);
* a tiny reaper, forked before anything else starts, asks the kernel for a signal when the worker
  dies (PR_SET_PDEATHSIG, Linux), then SIGTERMs the group (vLLM's engine core shuts down cleanly
  on SIGTERM), waits `grace_s`, and SIGKILLs what is left.

On a normal exit the group is already empty and the reaper just exits. Elsewhere than Linux this
is a no-op (the container runtime reaps the whole container there). Consequence of leading a group:
a wrapper that starts the worker (uv run, a shell pipeline) must forward Ctrl-C/SIGTERM to it, as
container runtimes, tini and `uv run` do. Started in a terminal's foreground (`make run`), the process
keeps the terminal's group instead, so that Ctrl-C stops it and everything it started.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_DEATH = signal.SIGUSR1  # what the kernel sends the reaper when the worker dies


def bind_children(grace_s: float = 3.0) -> int | None:
    """Make this process a process-group leader and fork its reaper; returns the reaper's pid
    (None where unsupported). Call once, early in main(), while the process has one thread."""
    if not sys.platform.startswith("linux"):
        return None
    if in_terminal_foreground():
        # Started from a terminal (`make run`, `sr3d serve` typed by hand): Ctrl-C already reaches this
        # whole process group, engine children included. A group of our own would hide the service from
        # the terminal, so Ctrl-C would stop only the wrapper (make) and leave the service running.
        return None
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)
    group = os.getpid()
    # Block the death signal before forking so the reaper cannot miss it between fork and sigwait.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {_DEATH})
    pid = os.fork()
    if pid == 0:
        try:
            _reap_when_parent_dies(group, grace_s)
        finally:
            os._exit(0)
    signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return pid


def in_terminal_foreground() -> bool:
    """True when stdin is a terminal whose foreground process group is ours (an interactive start)."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):  # no terminal, closed or replaced stdin
        return False


def _reap_when_parent_dies(group: int, grace_s: float) -> None:
    os.setpgid(0, 0)  # out of the group it will kill
    # Ctrl-C or SIGTERM aimed at the worker's group must not take the reaper down first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(_DEATH), 0, 0, 0) != 0:
        return
    if os.getppid() == group:  # still alive after prctl: wait for the kernel's signal
        signal.sigwait({_DEATH})
    _kill_group(group, grace_s)


def _kill_group(group: int, grace_s: float) -> None:
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        return  # nothing left: a clean exit
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
