"""The one exception type the API turns into `{"error": {"code", "message"}}` with a 4xx/5xx status."""
from __future__ import annotations


class ApiError(Exception):
    """A client-facing error: `code` is stable and machine-readable, `message` is for humans."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}
