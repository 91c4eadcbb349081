"""Structured JSON logs: one object per line with time, level, logger, message, the current job id
(from a context variable, so every line logged while serving a job carries it) and any `extra=`.
"""
from __future__ import annotations

import contextvars
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("sr3d_job_id", default=None)

# Attributes every LogRecord has; anything else came from `extra=` and is emitted as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Tag every log line inside the block with this job id (the worker wraps each job's task in it;
    tasks and `asyncio.to_thread` started inside inherit it)."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)


def in_context(fn: Callable[..., T], *args: Any) -> Callable[[], T]:
    """`fn(*args)` to run in the caller's context, for `loop.run_in_executor`: unlike `asyncio.to_thread`
    it runs the call in the pool thread's own context, which would drop the job id."""
    return functools.partial(contextvars.copy_context().run, fn, *args)


def bind_job(job_id: str) -> None:
    """Tag every later log line of the current task with this job id: for a gateway request once it
    knows its job (each request runs in its own task, so the tag ends with the request)."""
    job_id_var.set(job_id)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_id = job_id_var.get()
        if job_id is not None:
            out["job_id"] = job_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str | int = "INFO") -> None:
    """JSON lines on stderr for the root logger and uvicorn's loggers (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
