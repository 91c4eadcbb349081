"""The web page at `/`, its static files (service/web/, shipped inside the package), and the API
reference at `/docs`.

The page talks only to the public REST/SSE API, like any other client. Files are served from a
fixed allowlist read at import (no path from the request ever reaches the filesystem). `/docs` is
Swagger UI (version 5: it reads OpenAPI 3.1, which FastAPI writes) from the files that the
`fastapi-offline` package ships, served here rather than from a CDN so it works offline, under the
same kind of CSP as the page (only the files are used, not that package's app factory, whose page
has an inline script).
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

# Swagger UI sets some styles through inline style attributes and shows data: SVG icons; its own
# init script is /web/docs.js, so scripts stay 'self' only.
_DOCS_HEADERS = {
    **_HEADERS,
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; script-src 'self'; "
                               "style-src 'self' 'unsafe-inline'; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
}
# The Swagger UI files /docs loads (the package's static folder), read at import.
_SWAGGER = resources.files("fastapi_offline") / "static"
DOCS_ASSETS: dict[str, bytes] = {
    name: (_SWAGGER / name).read_bytes() for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")
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


@router.get("/docs")
async def docs() -> Response:
    return Response(FILES["docs.html"], media_type=_TYPES[".html"], headers=_DOCS_HEADERS)


@router.get("/docs/assets/{name}")
async def docs_asset(name: str) -> Response:
    data = DOCS_ASSETS.get(name)
    if data is None:
        raise ApiError("not_found", f"no file {name!r}")
    # The files change only with the installed package's version: let browsers keep them a day.
    return Response(data, media_type=_TYPES["." + name.rsplit(".", 1)[-1]],
                    headers={**_DOCS_HEADERS, "Cache-Control": "public, max-age=86400"})
