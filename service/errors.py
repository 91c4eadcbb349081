"""The exception the API layer raises for a request it refuses: a stable `code` and a human `message`.

It carries no HTTP status: `service/api/errors.py` maps every error code (this one's, the media
decoder's, the model core's) to a status in one table. `headers` are response headers that belong to
the refusal (Retry-After, WWW-Authenticate).
"""
from __future__ import annotations


class ApiError(Exception):
    """A client-facing error: `code` is stable and machine-readable, `message` is for humans."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.headers = headers or {}
