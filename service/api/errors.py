"""The one place that turns error codes into HTTP statuses, and every error into
`{"error": {"code", "message"}}`.

Errors below the API layer carry only `.code` and `.message` (ApiError, service.media.limits.MediaError, the
model core's coded errors): `status_for` looks the code up here. A code that is not listed is an
input error the model or decoder added later: 422 (the request was understood but cannot be
computed), never a 500.
"""
from __future__ import annotations

import logging
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics
from service.errors import ApiError
from service.schemas import ErrorBody
from service.settings import GatewaySettings

log = logging.getLogger("sr3d.gateway")

DEFAULT_INPUT_STATUS = 422

# code -> status. 422 codes are listed only where the name alone would suggest another status.
STATUS: dict[str, int] = {
    # 400: the request is malformed
    "bad_request": 400, "regions_not_json": 400, "options_not_json": 400, "bad_idempotency_key": 400,
    "bad_last_event_id": 400, "invalid_argument": 400, "invalid_box": 400, "bad_scale_hint": 400, "invalid_scene_file": 400,
    # 401/403/404/405/409
    "unauthorized": 401, "forbidden": 403, "not_found": 404, "job_not_found": 404, "job_expired": 404,
    "scene_not_ready": 404, "method_not_allowed": 405,
    "job_finished": 409,
    # 422, listed because the name alone might suggest 409: an Idempotency-Key sent with another request
    "idempotency_key_reused": 422,
    # 413: over a size cap
    "upload_too_large": 413, "file_too_large": 413, "resolution_too_large": 413, "too_long": 413,
    # 415: a type the service does not decode
    "unsupported_media_type": 415, "unsupported_container": 415, "unsupported_codec": 415,
    "unsupported_image_format": 415, "no_video_stream": 415,
    # 429/503: come back later (with Retry-After)
    "rate_limited": 429, "queue_full": 429, "redis_unavailable": 503, "worker_not_ready": 503,
    "too_many_streams": 503, "upload_store_full": 503,
    # 429: one API key over its own quota (service/quotas.py, service/stream_hub.py); other keys are unaffected
    "streams_quota_exceeded": 429, "files_quota_exceeded": 429, "storage_quota_exceeded": 429,
    "jobs_quota_exceeded": 429, "uploads_quota_exceeded": 429,
    # 408: the client did not send its request in time (service/http_timeouts.py answers it itself)
    "request_timeout": 408,
    # 413 for scene arrays whose decoded size is over the cap (checked on the .npy headers)
    "scene_too_large": 413,
    # the OpenAI-compatible routes (service/api/openai.py, service/media_fetch.py); unlisted ones are 422
    "invalid_json": 400, "invalid_parameter": 400, "unsupported_parameter": 400, "unsupported_messages": 400,
    "invalid_data_url": 400, "invalid_media_reference": 400, "model_not_found": 404, "file_not_found": 404,
    "remote_media_disabled": 403, "remote_domain_not_allowed": 403, "remote_address_forbidden": 403,
}

# Starlette's own HTTPExceptions (unknown route, wrong method) get a code from their status.
_CODE_OF_STATUS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                   405: "method_not_allowed", 413: "upload_too_large", 415: "unsupported_media_type",
                   429: "rate_limited"}

# For the OpenAPI document: every status a route can answer with the error body.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 415, 422, 429, 503)
}


class CodedError(Protocol):
    """What every error the API reports has (model.errors' base, MediaError, ApiError)."""

    code: str
    message: str


def status_for(code: str) -> int:
    return STATUS.get(code, DEFAULT_INPUT_STATUS)


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


# OpenAI's error `type` by status (their clients branch on the status; the type is informative).
_OPENAI_TYPE = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def openai_error_body(code: str, message: str, status: int, param: str | None = None) -> dict[str, dict[str, str | None]]:
    """OpenAI's error shape, a superset of ours: {"error": {"message", "type", "param", "code"}}."""
    type_ = "server_error" if status >= 500 else _OPENAI_TYPE.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(code: str, message: str, headers: dict[str, str] | None = None,
                   status: int | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status or status_for(code), headers=headers)


def coded_response(exc: CodedError) -> JSONResponse:
    return error_response(exc.code, exc.message, getattr(exc, "headers", None))


def _coded_types() -> tuple[type[Exception], ...]:
    """Exception types whose instances carry `.code`/`.message`: the API's own, the model core's
    base (model.errors is light: no torch), and ValueError, which the media decoder's and the
    geometry's errors subclass (importing those modules would pull PyAV and torch into the gateway)."""
    from model.errors import CodedError as ModelCodedError

    return (ApiError, ModelCodedError, ValueError)


def install(app: FastAPI, settings: GatewaySettings) -> None:
    """Exception handlers: every error leaves as `{"error": {"code", "message"}}`."""

    async def coded(request: Request, exc: Exception) -> JSONResponse:
        if not (isinstance(getattr(exc, "code", None), str) and isinstance(getattr(exc, "message", None), str)):
            raise exc  # an uncoded ValueError is a bug: the server-error path logs it as a 500
        response = coded_response(exc)  # type: ignore[arg-type]
        metrics.count_refusal(request.method, request.url.path, exc.code, response.status_code)  # type: ignore[attr-defined]
        return response

    for exc_type in _coded_types():
        app.add_exception_handler(exc_type, coded)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODE_OF_STATUS.get(exc.status_code, f"http_{exc.status_code}")
        metrics.count_refusal(request.method, request.url.path, code, exc.status_code)  # e.g. a malformed multipart body
        return error_response(code, str(exc.detail), dict(exc.headers or {}), status=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        response = error_response("invalid_request", f"{where}: {first.get('msg')}")
        metrics.count_refusal(request.method, request.url.path, "invalid_request", response.status_code)
        return response

    @app.exception_handler(RedisError)
    async def redis_down(_: Request, exc: RedisError) -> JSONResponse:
        log.error("redis error", extra={"error": repr(exc)})
        return error_response("redis_unavailable", "the job store is unavailable; retry later",
                              {"Retry-After": str(settings.retry_after_s)})
