"""The HTTP gateway: validate cheaply, store uploads, queue the job, stream its events back.

No PyAV, no tensors here: the worker probes media and reports media errors as `error` events.
Every cap is checked before anything expensive; bad input gets a 4xx JSON `{"error": {code, message}}`.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.blobs import BlobStore, BlobTooLarge, DirBlobStore, make_blob_store
from service.errors import ApiError
from service.queue import ENTRY_ID, JobQueue, QueueFull
from service.ratelimit import RateLimiter
from service.redis_conn import EmbeddedRedis, redis_client, resolve_redis_url
from service.schemas import (
    BoxRegion,
    ErrorBody,
    GenerationOptions,
    JobSpec,
    JobStatus,
    JobView,
    MaskRef,
    RegionsInput,
    SubmitResponse,
    check_question,
)
from service.settings import Settings
from service.sse import sse_response

log = logging.getLogger("sr3d.gateway")

SUBMIT_PATH = "/v1/spatial-qa"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
TEXT_FIELDS = {"question", "regions", "options"}
FILE_FIELDS = {"video", "image", "scene"}

# Container allowlist: extension and magic bytes must agree, and both must be formats the worker's
# decoder accepts (service/media.py), so an upload is never queued only to fail there.
# (PyAV probing of codecs, sizes and durations happens in the worker.)
VIDEO_EXT = {".mp4", ".m4v", ".mov", ".webm", ".mkv"}
IMAGE_EXT = {".png", ".jpg", ".jpeg"}


def sniff(head: bytes) -> str | None:
    """Container family from the first bytes: mp4 | matroska | png | jpeg | npz."""
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:4] == b"PK\x03\x04":
        return "npz"
    return None


_FAMILY_EXT = {
    "mp4": {".mp4", ".m4v", ".mov"},
    "matroska": {".webm", ".mkv"},
    "png": {".png"},
    "jpeg": {".jpg", ".jpeg"},
    "npz": {".npz"},
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 415, 422, 429, 503)
}


# --------------------------------------------------------------------------------------------------
# ASGI middleware


class BodySizeLimit:
    """Rejects an upload over the cap with 413 while it streams in: Content-Length is checked up
    front, and bytes are counted as they arrive (chunked uploads), before python-multipart
    buffers anything. Raising ApiError from `receive` reaches the app's ApiError handler."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = ApiError(413, "upload_too_large", f"request body is over the {self.max_bytes} byte cap")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    metrics.JOBS_REJECTED.labels(reason="upload_too_large").inc()
                    return await _send_json(send, 413, too_large.body())
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    metrics.JOBS_REJECTED.labels(reason="upload_too_large").inc()
                    raise too_large
            return message

        await self.app(scope, counting_receive, send)


class RequestMetrics:
    """sr3d_http_requests_total and sr3d_http_request_duration_seconds (until headers), by route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = scope.get("route")
                metrics.REQUEST_LATENCY.labels(route=getattr(route, "path", "unmatched")).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.REQUESTS.labels(route=route, method=scope["method"], status=str(status)).inc()


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


# --------------------------------------------------------------------------------------------------
# State and dependencies


@dataclass
class GatewayState:
    settings: Settings
    redis: aioredis.Redis
    queue: JobQueue
    blobs: BlobStore
    limiter: RateLimiter


def state(request: Request) -> GatewayState:
    return request.app.state.gw


@dataclass
class Caller:
    key_id: str | None  # short hash of the API key (never the key itself); None when keys are off
    bucket: str  # rate-limit bucket: the key id, or the client address when keys are off


def key_id_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def authenticate(request: Request) -> Caller:
    """Optional API keys: `Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant
    time against every configured key (no early exit that would leak which one matched)."""
    keys = request.app.state.gw.settings.api_keys
    if not keys:
        host = request.client.host if request.client else "unknown"
        return Caller(None, f"ip:{host}")
    given = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization") or ""
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not given:
        raise ApiError(401, "unauthorized", "an API key is required (Authorization: Bearer KEY or X-API-Key)",
                       {"WWW-Authenticate": "Bearer"})
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.encode(), key.encode())
    if not matched:
        raise ApiError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "Bearer"})
    kid = key_id_of(given)
    return Caller(kid, kid)


async def rate_limited(request: Request, caller: Caller = Depends(authenticate)) -> Caller:
    decision = await request.app.state.gw.limiter.hit(caller.bucket)
    if not decision.allowed:
        metrics.JOBS_REJECTED.labels(reason="rate_limited").inc()
        raise ApiError(429, "rate_limited", "too many requests for this API key",
                       {"Retry-After": str(decision.retry_after_s)})
    return caller


async def _owned_job(gw: GatewayState, job_id: str, caller: Caller) -> JobView:
    """The job, or 404 when unknown, expired, or submitted under another API key."""
    if not JOB_ID.match(job_id):
        raise ApiError(404, "job_not_found", f"no job {job_id!r}")
    view = await gw.queue.get(job_id)
    if view is not None and caller.key_id is not None:
        spec = await gw.queue.get_spec(job_id)
        if spec is not None and spec.api_key_id != caller.key_id:
            view = None
    if view is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r} (unknown or expired)")
    return view


# --------------------------------------------------------------------------------------------------
# Request parsing (cheap checks only)


@dataclass
class ParsedSubmit:
    media: UploadFile
    media_kind: str
    question: str
    regions: RegionsInput
    masks: dict[str, UploadFile]
    scene: UploadFile | None
    options: GenerationOptions


async def _head(upload: UploadFile, n: int = 16) -> bytes:
    await upload.seek(0)
    head = await upload.read(n)
    await upload.seek(0)
    return head


def _ext(filename: str | None) -> str:
    return os.path.splitext(filename or "")[1].lower()


async def _check_type(upload: UploadFile, part: str, allowed_ext: set[str]) -> None:
    ext = _ext(upload.filename)
    family = sniff(await _head(upload))
    if ext not in allowed_ext or family is None or ext not in _FAMILY_EXT[family]:
        metrics.JOBS_REJECTED.labels(reason="unsupported_media_type").inc()
        raise ApiError(415, "unsupported_media_type",
                       f"part {part!r}: {upload.filename!r} is not one of {sorted(allowed_ext)} "
                       f"(extension and content must agree; content looks like {family or 'unknown'})")


def _json_field(raw: str | None, field: str, default: Any) -> Any:
    if raw is None or raw.strip() == "":
        return default
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"{field}_not_json", f"{field} is not valid JSON: {e.msg} at char {e.pos}") from None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = err["loc"]
    # Drop the discriminator tags pydantic puts in the path ("box"/"mask"), keep the field name.
    where = ".".join(str(p) for i, p in enumerate(loc) if not (p in ("box", "mask") and i < len(loc) - 1))
    return f"{where}: {err['msg']}" if where else err["msg"]


async def parse_submit(request: Request, settings: Settings) -> ParsedSubmit:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data (video or image, question, regions, ...)")
    max_files = settings.max_regions * settings.max_masks_per_region + 2
    form = await request.form(max_files=max_files, max_fields=len(TEXT_FIELDS) + 2, max_part_size=256 * 1024)
    text: dict[str, str] = {}
    files: dict[str, UploadFile] = {}
    for name, value in form.multi_items():
        if name in text or name in files:
            raise ApiError(422, "duplicate_part", f"part {name!r} given twice")
        if isinstance(value, UploadFile):
            files[name] = value
        elif name in TEXT_FIELDS:
            text[name] = value
        else:
            raise ApiError(422, "unknown_field", f"unknown form field {name!r} (expected {sorted(TEXT_FIELDS)} + files)")

    video, image = files.pop("video", None), files.pop("image", None)
    if video is None and image is None:
        raise ApiError(422, "media_missing", "send a `video` or an `image` file part")
    if video is not None and image is not None:
        raise ApiError(422, "media_ambiguous", "send either `video` or `image`, not both")
    media, kind = (video, "video") if video is not None else (image, "image")
    assert media is not None

    if "question" not in text:
        raise ApiError(422, "question_missing", "the `question` field is required")

    try:
        regions = RegionsInput.model_validate({"regions": _json_field(text.get("regions"), "regions", [])})
    except ValidationError as e:
        raise ApiError(422, "regions_invalid", _first_error(e)) from None
    if len(regions.regions) > settings.max_regions:
        raise ApiError(422, "too_many_regions", f"{len(regions.regions)} regions > cap {settings.max_regions}")
    for k, region in enumerate(regions.regions):
        if len(region) > settings.max_masks_per_region:
            raise ApiError(422, "too_many_annotations",
                           f"region {k} has {len(region)} annotations > cap {settings.max_masks_per_region}")
        for ann in region:
            if kind == "image" and ann.frame != 0:
                raise ApiError(422, "region_frame_out_of_range", f"region {k}: an image has only frame 0, not {ann.frame}")

    try:
        options = GenerationOptions.model_validate(_json_field(text.get("options"), "options", {}))
    except ValidationError as e:
        raise ApiError(422, "options_invalid", _first_error(e)) from None
    except TypeError:
        raise ApiError(422, "options_invalid", "options must be a JSON object") from None
    options = options.check_caps(settings)

    question = check_question(text["question"], len(regions.regions), settings)

    scene = files.pop("scene", None)
    referenced = {ann.mask for region in regions.regions for ann in region if not isinstance(ann, BoxRegion)}
    missing = referenced - files.keys()
    if missing:
        raise ApiError(422, "mask_part_missing", f"regions name mask parts that were not sent: {sorted(missing)}")
    extra = files.keys() - referenced
    if extra:
        raise ApiError(422, "unreferenced_part", f"file parts no region refers to: {sorted(extra)}")

    await _check_type(media, kind, VIDEO_EXT if kind == "video" else IMAGE_EXT)
    for name, upload in files.items():
        await _check_type(upload, name, {".png"})
    if scene is not None:
        await _check_type(scene, "scene", {".npz"})
    return ParsedSubmit(media, kind, question, regions, files, scene, options)


async def _sha256(upload: UploadFile) -> str:
    def digest() -> str:
        upload.file.seek(0)
        h = hashlib.sha256()
        for chunk in iter(lambda: upload.file.read(1 << 20), b""):
            h.update(chunk)
        upload.file.seek(0)
        return h.hexdigest()

    return await asyncio.to_thread(digest)


# --------------------------------------------------------------------------------------------------
# Routes

router = APIRouter(prefix="/v1", tags=["spatial-qa"])

_SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["question"],
                    "properties": {
                        "video": {"type": "string", "format": "binary", "description": "mp4/mov/webm/mkv"},
                        "image": {"type": "string", "format": "binary", "description": "png/jpeg"},
                        "question": {"type": "string", "description": "refer to regions as <region0>, <region1>, ..."},
                        "regions": {"type": "string", "description": 'JSON list; item = {"frame":0,"box":[x0,y0,x1,y1]} '
                                    'or {"frame":0,"mask":"PART"} or a list of those (one region on several frames)'},
                        "options": {"type": "string", "description": "JSON GenerationOptions"},
                        "scene": {"type": "string", "format": "binary", "description": "optional RGB-D scene .npz"},
                    },
                    "additionalProperties": {"type": "string", "format": "binary", "description": "mask PNG parts"},
                }
            }
        },
    }
}


def _submit_response(gw: GatewayState, request: Request, job_id: str) -> SubmitResponse:
    base = str(request.base_url).rstrip("/")
    return SubmitResponse(job_id=job_id, status_url=f"{base}/v1/spatial-qa/{job_id}",
                          events_url=f"{base}/v1/spatial-qa/{job_id}/events")


@router.post(
    "/spatial-qa",
    status_code=202,
    response_model=SubmitResponse,
    responses={**ERROR_RESPONSES, 200: {"description": "SSE stream (Accept: text/event-stream or ?stream=true) or "
                                        "the finished job (?wait=true)", "content": {"text/event-stream": {}}}},
    openapi_extra=_SUBMIT_BODY,
    summary="Ask a spatial question about regions of a video or an image",
)
async def submit(
    request: Request,
    stream: bool = Query(False, description="stream events as SSE (same as Accept: text/event-stream)"),
    wait: bool = Query(False, description="wait for the answer (202 if not done within the wait timeout)"),
    caller: Caller = Depends(rate_limited),
    gw: GatewayState = Depends(state),
) -> Response:
    settings = gw.settings
    idem = request.headers.get("idempotency-key")
    if idem is not None and not (1 <= len(idem) <= 255):
        raise ApiError(400, "bad_idempotency_key", "Idempotency-Key must be 1..255 characters")
    parsed = await parse_submit(request, settings)
    wants_stream = stream or "text/event-stream" in request.headers.get("accept", "")

    job_id = await gw.queue.lookup_idempotent(idem, caller.key_id) if idem else None
    created = False
    if job_id is None:
        job_id, created = await _store_and_submit(gw, parsed, caller, idem)
    headers = {"Location": f"/v1/spatial-qa/{job_id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    if wants_stream:
        return sse_response(gw.queue, job_id, ping_s=settings.sse_ping_s,
                            cancel_on_disconnect=parsed.options.cancel_on_disconnect, headers=headers)
    if wait:
        view = await _wait_for(gw.queue, job_id, settings.wait_timeout_s)
        if view is not None:
            return JSONResponse(view.model_dump(mode="json"), status_code=200, headers=headers)
    body = _submit_response(gw, request, job_id)
    return JSONResponse(body.model_dump(mode="json"), status_code=202, headers=headers)


async def _store_and_submit(gw: GatewayState, parsed: ParsedSubmit, caller: Caller, idem: str | None) -> tuple[str, bool]:
    job_id = uuid.uuid4().hex
    ttl = gw.settings.job_max_age_s
    stored: list[str] = []
    try:
        media_key = f"{job_id}/media"
        media_hash = await _sha256(parsed.media)
        await gw.blobs.put(media_key, parsed.media.file, ttl)
        stored.append(media_key)
        mask_keys: dict[str, str] = {}
        for name, upload in parsed.masks.items():
            mask_keys[name] = f"{job_id}/mask/{name}"
            await gw.blobs.put(mask_keys[name], upload.file, ttl)
            stored.append(mask_keys[name])
        scene_key = None
        if parsed.scene is not None:
            scene_key = f"{job_id}/scene"
            await gw.blobs.put(scene_key, parsed.scene.file, ttl)
            stored.append(scene_key)
        regions = [
            [ann if isinstance(ann, BoxRegion) else MaskRef(frame=ann.frame, mask_blob=mask_keys[ann.mask]) for ann in region]
            for region in parsed.regions.regions
        ]
        spec = JobSpec(
            job_id=job_id, media_kind=parsed.media_kind, media_blob=media_key, media_hash=media_hash,  # type: ignore[arg-type]
            media_filename=os.path.basename(parsed.media.filename or "upload")[:200], question=parsed.question,
            regions=regions, scene_blob=scene_key, options=parsed.options, created_at=time.time(),
            api_key_id=caller.key_id,
        )
        got_id, created = await gw.queue.submit(spec, idem)
    except QueueFull as e:
        await _delete(gw.blobs, stored)
        metrics.JOBS_REJECTED.labels(reason="queue_full").inc()
        raise ApiError(429, "queue_full", str(e), {"Retry-After": str(e.retry_after_s)}) from None
    except BlobTooLarge as e:
        await _delete(gw.blobs, stored)
        raise ApiError(413, "upload_too_large", str(e)) from None
    except BaseException:
        await _delete(gw.blobs, stored)
        raise
    if not created:  # lost an idempotency race: the other request's job stands
        await _delete(gw.blobs, stored)
    log.info("job submitted", extra={"job_id": got_id, "media_kind": parsed.media_kind, "new_job": created,
                                     "regions": len(parsed.regions.regions), "api_key_id": caller.key_id})
    return got_id, created


async def _delete(blobs: BlobStore, keys: list[str]) -> None:
    for key in keys:
        with contextlib.suppress(Exception):
            await blobs.delete(key)


async def _wait_for(queue: JobQueue, job_id: str, timeout_s: float) -> JobView | None:
    """The finished job, or None if it is not finished within timeout_s."""
    deadline = time.monotonic() + timeout_s
    after = "0-0"
    while (left := deadline - time.monotonic()) > 0:
        for ev in await queue.read_events(job_id, after=after, block_ms=max(1, int(min(left, 5.0) * 1000))):
            after = ev.id
            if ev.terminal:
                view = await queue.get(job_id)
                if view is not None and not view.status.terminal:
                    # The terminal event is written just before finish(): report what it says.
                    view = _view_from_event(view, ev.type, ev.data)
                return view
    return None


def _view_from_event(view: JobView, type_: str, data: dict[str, Any]) -> JobView:
    update: dict[str, Any] = {"timings": data.get("timings") or view.timings}
    if data.get("usage"):
        update["usage"] = data["usage"]
    if type_ == "done":
        update.update(status=JobStatus.done, answer=data.get("answer"), finish_reason=data.get("finish_reason"))
    else:
        update.update(status=JobStatus.cancelled if data.get("code") == "cancelled" else JobStatus.failed,
                      error={"code": str(data.get("code")), "message": str(data.get("message"))})
    return JobView.model_validate({**view.model_dump(), **update})


@router.get("/spatial-qa/{job_id}", response_model=JobView, responses=ERROR_RESPONSES, summary="Job status and answer")
async def get_job(job_id: str, caller: Caller = Depends(authenticate), gw: GatewayState = Depends(state)) -> JobView:
    return await _owned_job(gw, job_id, caller)


@router.get(
    "/spatial-qa/{job_id}/events",
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}, "description": "SSE: queued, progress, "
                                        "token, done | error; resumes after Last-Event-ID"}},
    summary="Stream (or resume) a job's events",
)
async def job_events(
    request: Request,
    job_id: str,
    last_event_id: str | None = Query(None, description="resume after this event id (or the Last-Event-ID header)"),
    caller: Caller = Depends(authenticate),
    gw: GatewayState = Depends(state),
) -> Response:
    after = request.headers.get("last-event-id") or last_event_id or "0-0"
    if not ENTRY_ID.match(after):
        raise ApiError(400, "bad_last_event_id", f"Last-Event-ID {after!r} is not an event id like 1718000000000-0")
    await _owned_job(gw, job_id, caller)
    spec = await gw.queue.get_spec(job_id)
    cancel = bool(spec and spec.options.cancel_on_disconnect)
    return sse_response(gw.queue, job_id, after=after, ping_s=gw.settings.sse_ping_s, cancel_on_disconnect=cancel)


@router.delete(
    "/spatial-qa/{job_id}", status_code=202, response_model=JobView, responses=ERROR_RESPONSES, summary="Cancel a job"
)
async def cancel_job(job_id: str, caller: Caller = Depends(authenticate), gw: GatewayState = Depends(state)) -> JSONResponse:
    view = await _owned_job(gw, job_id, caller)
    if view.status.terminal or not await gw.queue.request_cancel(job_id):
        current = await gw.queue.get(job_id) or view
        raise ApiError(409, "job_finished", f"job {job_id} is already {current.status.value}")
    after = await gw.queue.get(job_id) or view
    return JSONResponse(after.model_dump(mode="json"), status_code=202)


ops = APIRouter(tags=["ops"])


@ops.get("/healthz", summary="Liveness: the process serves HTTP")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops.get("/readyz", summary="Readiness: Redis reachable", responses={503: {"model": ErrorBody}})
async def readyz(gw: GatewayState = Depends(state)) -> dict[str, str]:
    try:
        await asyncio.wait_for(gw.redis.ping(), timeout=2)
    except (RedisError, OSError, asyncio.TimeoutError):
        raise ApiError(503, "redis_unavailable", "Redis is not reachable",
                       {"Retry-After": str(gw.settings.retry_after_s)}) from None
    return {"status": "ready"}


@ops.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics_endpoint(gw: GatewayState = Depends(state)) -> Response:
    with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
        await asyncio.wait_for(gw.queue.stats(), timeout=2)  # fresh queue gauges on every scrape
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


# --------------------------------------------------------------------------------------------------
# Error handlers: always {"error": {"code", "message"}}

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 413: "upload_too_large", 415: "unsupported_media_type", 429: "rate_limited"}


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}"), str(exc.detail),
                      dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, "invalid_request", f"{where}: {first.get('msg')}")

    @app.exception_handler(RedisError)
    async def redis_down(_: Request, exc: RedisError) -> JSONResponse:
        log.error("redis error", extra={"error": repr(exc)})
        return _error(503, "redis_unavailable", "the job store is unavailable; retry later",
                      {"Retry-After": str(settings.retry_after_s)})


# --------------------------------------------------------------------------------------------------
# App factory


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway ASGI app. Redis: REDIS_URL, else the embedded server under SR3D_DATA_DIR."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url, embedded = await asyncio.to_thread(resolve_redis_url, settings)
        redis = redis_client(url)
        blobs = make_blob_store(settings, redis)
        queue = JobQueue(redis, settings, blobs=blobs)
        app.state.gw = GatewayState(settings, redis, queue, blobs, RateLimiter(redis, settings.rate_limit_per_min,
                                                                                 settings.rate_limit_burst))
        with contextlib.suppress(RedisError, OSError):
            await queue.ensure_group()
        sweeper = asyncio.create_task(_sweep_blobs(blobs)) if isinstance(blobs, DirBlobStore) else None
        try:
            yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
            await queue.aclose()
            await blobs.aclose()
            await redis.aclose()
            if isinstance(embedded, EmbeddedRedis):
                embedded.stop()

    app = FastAPI(
        title="SR-3D spatial QA",
        version="0.1.0",
        description="Ask spatial questions about regions of a video or an image; answers stream back as SSE.",
        lifespan=lifespan,
        openapi_tags=[{"name": "spatial-qa", "description": "jobs: submit, status, events, cancel"},
                      {"name": "ops", "description": "health, readiness, metrics"}],
    )
    _install_error_handlers(app, settings)
    app.include_router(router)
    app.include_router(ops)
    from service.api import page, scene  # here, not at the top: both import this module's dependencies

    app.include_router(scene.router)
    app.include_router(page.router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=False,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "Idempotency-Key", "Last-Event-ID", "Accept"],
            expose_headers=["Location", "Retry-After", "Idempotent-Replayed"],
        )
    # Body cap: multipart overhead on top of the media cap (masks, fields, boundaries).
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + 1024 * 1024)
    app.add_middleware(RequestMetrics)
    return app


async def _sweep_blobs(blobs: DirBlobStore, every_s: float = 300.0) -> None:
    while True:
        with contextlib.suppress(OSError):
            removed = await asyncio.to_thread(blobs.sweep)
            if removed:
                log.info("expired blobs removed", extra={"removed": removed})
        await asyncio.sleep(every_s)
