"""The exception the API layer raises for a request it refuses: a stable `code` and a human `message`.

It carries no HTTP status: `service/api/errors.py` maps every error code (this one's, the media
decoder's, the model core's) to a status in one table. `headers` are response headers that belong to
the refusal (Retry-After, WWW-Authenticate).
"""
from __future__ import annotations

from model.errors import CodedError


class ApiError(Exception):
    """A client-facing error: `code` is stable and machine-readable, `message` is for humans."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.headers = headers or {}


def is_input_error(exc: BaseException) -> bool:
    """The one rule that splits failures: True when `exc` is about the request's content, so the
    same input fails the same way on every attempt (fail at once with its code, never retry).

    An input error carries a non-empty string `.code` and is a ValueError (MediaError, SceneError,
    ModelInputError) or a model CodedError. Everything else (engine, device, Redis, bugs, a bare
    ValueError from deep inside a library) is infrastructure: retried, then dead-lettered."""
    code = getattr(exc, "code", None)
    return isinstance(code, str) and bool(code) and isinstance(exc, (ValueError, CodedError))
