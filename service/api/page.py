"""The web page at `/` and its static files (service/web/, shipped inside the package).

The page talks only to the public REST/SSE API, like any other client. Files are served from a
fixed allowlist read at import (no path from the request ever reaches the filesystem).
"""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from service.errors import ApiError

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
_WEB = resources.files("service") / "web"
FILES: dict[str, bytes] = {
    f.name: f.read_bytes() for f in _WEB.iterdir() if f.is_file() and "." + f.name.rsplit(".", 1)[-1] in _TYPES
}
# The page loads only its own files and talks only to this origin; media are decoded from blob: URLs.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
                               "script-src 'self'; style-src 'self'; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> Response:
    data = FILES.get(name)
    if data is None:
        raise ApiError("not_found", f"no file {name!r}")
    return Response(data, media_type=_TYPES["." + name.rsplit(".", 1)[-1]], headers=_HEADERS)


@router.get("/")
async def index() -> Response:
    return _file("index.html")


@router.get("/web/{name}")
async def static(name: str) -> Response:
    return _file(name)
