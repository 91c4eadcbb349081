"""`sr3d gateway` with three probes, for load tests that must say what delays a request:

    python -m loadtests.gateway_probe      (SR3D_HOST / SR3D_PORT as for `sr3d gateway`; PROBE_OUT=<file>)

* loop lag: a task that sleeps 10 ms at a time and records how late it woke (the time every other
  callback of the event loop held it, plus any time the OS did not run the process);
* request timing: per HTTP request, the time from the ASGI call to the last body byte sent, with
  the path and the key's last 4 characters (server-side latency, without the client's own delays);
* garbage collections: each one's generation and duration (a full collection stops the loop for as
  long as it takes to walk every tracked object that is not frozen);
* a stack sampler (unless PROBE_STACKS=0): a thread that looks at the event loop thread's Python stack every 2 ms and
  records its innermost frame and the innermost frame of the project's own code (what the loop was
  busy with when a request waited); nothing when the loop waits for I/O.

Everything goes to PROBE_OUT as JSON lines ({"t": wall time, "lag": s} / {"t", "req": path, "key",
"s", "status"} / {"t", "gc": generation, "s"} / {"t", "busy": "service/...:function", "leaf": "package:function"}), flushed every 250 ms, so a reader can split them
by the phases of its run. The gateway itself is `service.commands.gateway`'s, unchanged.
"""
from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import threading
import time
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.app import create_app
from service.heap import freeze_startup_heap
from service.http_timeouts import uvicorn_config
from service.logging import setup_logging
from service.settings import Settings

LAG_STEP_S = 0.01
SAMPLE_S = 0.002


class Sink:
    def __init__(self, path: str) -> None:
        self.f = open(path, "a", buffering=1 << 16)  # noqa: SIM115 - closed at exit by the OS; flushed periodically
        self.lock = threading.Lock()

    def write(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, separators=(",", ":"))
        with self.lock:
            self.f.write(line + "\n")

    def flush(self) -> None:
        with self.lock:
            self.f.flush()


class Timing:
    """Server-side duration of every request (until its last body message)."""

    def __init__(self, app: ASGIApp, sink: Sink) -> None:
        self.app, self.sink = app, sink

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, wall = time.perf_counter(), time.time()
        auth = dict(scope.get("headers", [])).get(b"authorization", b"").decode(errors="replace")
        status = 0

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.sink.write({"t": wall, "req": f"{scope['method']} {scope['path']}", "key": auth[-4:],
                                 "s": round(time.perf_counter() - t0, 6), "status": status})

        await self.app(scope, receive, timed_send)


async def lag_probe(sink: Sink) -> None:
    n = 0
    while True:
        t = time.perf_counter()  # not loop.time(): uvloop's clock has millisecond steps
        await asyncio.sleep(LAG_STEP_S)
        sink.write({"t": time.time(), "lag": round(time.perf_counter() - t - LAG_STEP_S, 6)})
        n += 1
        if n % 25 == 0:
            sink.flush()


def stack_sampler(sink: Sink, loop_thread: int, stop: threading.Event) -> None:
    """The loop thread's innermost interesting frame every SAMPLE_S (the sampler needs the GIL, so a
    long C call of the loop thread shows as fewer samples, at the frame that made it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    while not stop.wait(SAMPLE_S):
        frame = sys._current_frames().get(loop_thread)
        if frame is None or frame.f_code.co_filename.endswith(("asyncio/runners.py", "asyncio/base_events.py")):
            continue  # idle: the loop waits for I/O (uvloop's loop is C; the innermost Python frame is the runner's)
        leaf = _where(frame.f_code.co_filename, root) + ":" + frame.f_code.co_name
        ours = "-"
        while frame is not None:
            name = frame.f_code.co_filename
            if name.startswith(root) and "site-packages" not in name and "/loadtests/" not in name:
                ours = f"{os.path.relpath(name, root)}:{frame.f_code.co_name}"
                break
            if frame.f_back is None or frame.f_back.f_code.co_filename.endswith(("asyncio/runners.py", "asyncio/events.py")):
                ours = f"- ({_where(name, root)}:{frame.f_code.co_name})"  # the task's outermost frame
                break
            frame = frame.f_back
        sink.write({"t": time.time(), "busy": ours, "leaf": leaf})


def gc_probe(sink: Sink) -> None:
    """Record every garbage collection's generation and duration (gc.callbacks run on the collecting thread)."""
    started: list[float] = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            sink.write({"t": time.time(), "gc": info["generation"], "s": round(time.perf_counter() - started[0], 6)})

    gc.callbacks.append(on_gc)


def _where(filename: str, root: str) -> str:
    """A short place: the package of a library file, the path of a project file, else the file's name."""
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0]
    if filename.startswith(root):
        return os.path.relpath(filename, root)
    return "/".join(filename.rsplit("/", 2)[-2:])


class ProbedServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, sink: Sink, sample_stacks: bool) -> None:
        super().__init__(config)
        self.sink = sink
        self.sample_stacks = sample_stacks
        self.stop_sampler = threading.Event()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        self._lag = asyncio.create_task(lag_probe(self.sink))
        gc_probe(self.sink)
        if self.sample_stacks:
            threading.Thread(target=stack_sampler, args=(self.sink, threading.get_ident(), self.stop_sampler),
                             daemon=True).start()

    async def shutdown(self, sockets: Any = None) -> None:
        self.stop_sampler.set()
        self._lag.cancel()
        self.sink.flush()
        await super().shutdown(sockets)


def main() -> int:
    settings = Settings()
    setup_logging(settings.log_level)
    # PROBE_STACKS=0 leaves the sampler out: it takes the GIL every 2 ms and forces a switch interval of
    # 0.5 ms, costs that fall on the loop thread more when it is busier (under attack more than idle).
    sample_stacks = os.environ.get("PROBE_STACKS", "1") != "0"
    if sample_stacks:
        # The sampler thread takes the GIL when the loop thread releases it (a syscall) or at the switch
        # interval (5 ms by default): samples would pile up at syscalls. At 0.5 ms they follow the time spent.
        sys.setswitchinterval(0.0005)
    sink = Sink(os.environ["PROBE_OUT"])
    app = create_app(settings)
    freeze_startup_heap()  # as `sr3d gateway` does
    config = uvicorn_config(Timing(app, sink), settings, settings.host, settings.port,
                            log_config=None, timeout_graceful_shutdown=10)
    ProbedServer(config, sink, sample_stacks).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
