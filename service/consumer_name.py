"""Worker consumer names, and which of them belong to dead processes on this host.

The queue gives a consumer its own pending entries first on its first claim after a (re)start, but
only under the same name. Two ways a restarted worker gets its in-flight jobs back at once instead
of after claim_idle_ms (60 s) of XAUTOCLAIM idle time:

* SR3D_WORKER_NAME set (e.g. a StatefulSet pod name): the name is stable; the restarted worker reads
  its own pending list. The operator guarantees one live worker per name.
* unset: the name is `{hostname}-{pid}` (unique among live workers without any coordination; in a
  container, hostname = pod/container and pid is usually 1, so it is stable there too). On its first
  claim a worker adopts the pending entries of every consumer named `{its hostname}-{pid}` whose pid
  is no longer alive on this host (a crashed predecessor), see WorkQueue.claim (service/jobs/work_queue.py).
"""
from __future__ import annotations

import os
import socket

from service.procs import pid_alive


def consumer_name(configured: str | None = None) -> str:
    return configured or f"{socket.gethostname()}-{os.getpid()}"


def is_dead_local_consumer(name: str) -> bool:
    """True when `name` is `{this host}-{pid}` and that pid is not a live process here."""
    prefix = f"{socket.gethostname()}-"
    if not name.startswith(prefix):
        return False
    pid = name[len(prefix):]
    return pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid))


def consumer_is(name: str, pid: int) -> bool:
    """True when `name` is the default consumer name of process `pid` (`{hostname}-{pid}`)."""
    return name.endswith(f"-{pid}")
