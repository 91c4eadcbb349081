"""OpenAI-compatible routes: GET /v1/models, POST /v1/chat/completions, POST/GET/DELETE /v1/files.

A chat completion is a spatial-QA job like any other: the same auth and rate limit (service/api/deps.py),
the same checks (submission.check_fields) and the same queue (submission.store_and_submit). Its id is
`chatcmpl-<job id>` and the job id is also in the X-SR3D-Job-Id header, so the job can be fetched,
resumed (/v1/spatial-qa/{id}/events) or cancelled through our own routes. A client that drops the
stream does not cancel the job.

The request is exactly one `user` message (SR-3D answers one question per job): multi-turn, system,
assistant and tool messages are refused, not flattened. Its content holds text parts (joined with
newlines into the question) and exactly one `image_url` or `video_url` part. Regions are an extension
field (`extra_body={"regions": [...]}`), referenced as <regionK> in the text. `stop` is applied by
the gateway to the answer text (the job's own answer, on /v1/spatial-qa, is not cut). Every error
leaves in OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import ValidationError
from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.deps import Caller, GatewayState, authenticate, rate_limited, state
from service.api.errors import openai_error_body, status_for
from service.api.json_body import parse_bounded, read_body
from service.api.openai_media import (
    MEDIA_SCHEME,
    check_referenced_bytes,
    delete_file,
    file_meta,
    new_file_id,
    open_media,
    reserve_declared,
    store_file,
)
from service.api.openai_schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionUsage,
    Delta,
    FileDeleted,
    FileObject,
    ImagePart,
    ModelCard,
    ModelList,
    TextPart,
    inline_schema,
)
from service.api.submission import Submission, check_fields, replayed_job, store_and_submit, wait_for_terminal
from service.api.upload import closing_form
from service import metrics
from service.errors import ApiError
from service.quotas import declared_length
from service.schemas import JobStatus, JobView, Usage
from service.sse import SSE_HEADERS, SubscriptionResponse, check_stream_room, subscribe
from service.stream_hub import Subscription

log = logging.getLogger("sr3d.gateway")

JOB_HEADER = "X-SR3D-Job-Id"
PART_TYPES = ("text", "image_url", "video_url")
MAX_STOP = 4  # OpenAI's limit on stop sequences
NO_RETRY = {"x-should-retry": "false"}  # the openai client would otherwise resubmit on 408/409/5xx
FILE_PURPOSES = ("vision", "user_data")  # OpenAI's purposes for media inputs
_STARTED = int(time.time())  # the model card's `created`


class OpenAIError(ApiError):
    """An ApiError that names the request field at fault (OpenAI's `param`)."""

    def __init__(self, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None,
                 status: int | None = None) -> None:
        super().__init__(code, message, headers)
        self.param = param
        self.status = status


# Which request field a shared check's error code is about.
def _param_of(code: str, message: str) -> str | None:
    if code.startswith(("question", "placeholder", "unreferenced_region", "region_out_of_range")):
        return "messages"
    if code.startswith(("region", "too_many_regions", "too_many_annotations")):
        return "regions"
    if code == "options_invalid":
        return message.split(":", 1)[0] if ":" in message else None
    return {"max_tokens_over_cap": "max_tokens", "num_frames_over_cap": "num_frames"}.get(code)


def openai_response(exc: Any) -> JSONResponse:
    """Any coded error (ApiError, OpenAIError, the model's and the decoder's) as OpenAI's error body."""
    status = getattr(exc, "status", None) or status_for(exc.code)
    param = getattr(exc, "param", None) or _param_of(exc.code, exc.message)
    return JSONResponse(openai_error_body(exc.code, exc.message, status, param), status_code=status,
                        headers=getattr(exc, "headers", None) or None)


def _refused(request: Request, exc: Any) -> JSONResponse:
    """The refusal in OpenAI's shape, counted in sr3d_jobs_rejected_total as the job API counts it."""
    response = openai_response(exc)
    metrics.count_refusal(request.method, request.url.path, exc.code, response.status_code)
    return response


class OpenAIRoute(APIRoute):
    """Every refusal of these routes, from dependencies (auth, rate limit) to the handler, in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except RedisError as e:
                log.error("redis error", extra={"error": repr(e)})
                retry = str(request.app.state.gw.settings.retry_after_s)
                return openai_response(OpenAIError("redis_unavailable", "the job store is unavailable; retry later",
                                                   headers={"Retry-After": retry}))
            except StarletteHTTPException as e:  # e.g. a malformed multipart body
                return _refused(request, OpenAIError("bad_request", str(e.detail), status=e.status_code))
            except Exception as e:
                if isinstance(getattr(e, "code", None), str) and isinstance(getattr(e, "message", None), str):
                    return _refused(request, e)
                raise

        return wrapped


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


# --------------------------------------------------------------------------------------------------
# Models and files


@router.get("/models", response_model=ModelList, summary="The served model (OpenAI-compatible)")
async def list_models(_: Caller = Depends(authenticate), gw: GatewayState = Depends(state)) -> ModelList:
    return ModelList(data=[ModelCard(id=gw.settings.served_model_name, created=_STARTED)])


@router.post("/files", response_model=FileObject, summary="Upload an image or video to reference as sr3d-media://<id>",
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["file", "purpose"],
                 "properties": {"file": {"type": "string", "format": "binary", "description": "png/jpeg/mp4/mov/webm/mkv"},
                                "purpose": {"type": "string", "enum": list(FILE_PURPOSES)}}}}}}})
async def upload_file(request: Request, caller: Caller = Depends(rate_limited), gw: GatewayState = Depends(state)) -> FileObject:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise OpenAIError("unsupported_media_type", "send multipart/form-data with `file` and `purpose`")
    file_id, reserved = new_file_id(), False
    async with closing_form(request):  # the upload's temp file, closed once stored or refused
        try:
            with gw.uploads.hold(caller.tenant):  # per-key bodies in flight (SR3D_QUOTA_UPLOADS)
                # The key's quotas against the body's Content-Length before it is read: an upload past them
                # is answered before its bytes arrive (service/quotas.py).
                declared = declared_length(request.headers)
                if declared is not None:
                    reserved = await reserve_declared(gw, caller, file_id, declared)
                form = await request.form(max_files=1, max_fields=1, max_part_size=1024)
            unknown = set(form.keys()) - {"file", "purpose"}
            if unknown:
                raise OpenAIError("unsupported_parameter", f"unsupported fields {sorted(unknown)}",
                                  param=sorted(unknown)[0])
            upload, purpose = form.get("file"), form.get("purpose")
            if upload is None or isinstance(upload, str):
                raise OpenAIError("invalid_parameter", "a `file` part is required", param="file")
            if purpose not in FILE_PURPOSES:
                raise OpenAIError("invalid_parameter", f"purpose must be one of {list(FILE_PURPOSES)}", param="purpose")
        except BaseException:
            if reserved:
                await gw.ledger.release(caller.tenant, f"file:{file_id}")
            raise
        return FileObject.model_validate(await store_file(gw, caller, upload, str(purpose), file_id, reserved))


@router.get("/files/{file_id}", response_model=FileObject, summary="An uploaded file's metadata")
async def get_file(file_id: str, caller: Caller = Depends(authenticate), gw: GatewayState = Depends(state)) -> FileObject:
    return FileObject.model_validate(await file_meta(gw, caller, file_id))


@router.delete("/files/{file_id}", response_model=FileDeleted, summary="Delete an uploaded file")
async def remove_file(file_id: str, caller: Caller = Depends(authenticate), gw: GatewayState = Depends(state)) -> FileDeleted:
    await delete_file(gw, caller, file_id)
    return FileDeleted(id=file_id, deleted=True)


# --------------------------------------------------------------------------------------------------
# Chat completions: parsing


def _where(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'content', 1, 'image_url', 'image_url', 'url') -> messages[0].content[1].image_url.url
    (a content part's union tag, right after its index, is dropped)."""
    out = ""
    for i, p in enumerate(loc):
        if i >= 2 and loc[i - 2] == "content" and isinstance(loc[i - 1], int) and p in PART_TYPES:
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


async def parse_request(request: Request, max_body_bytes: int) -> ChatCompletionRequest:
    """The body as a ChatCompletionRequest. Read with a byte cap (never buffered past it), then
    bounded-parsed and validated in a worker thread: a large body is refused without stalling the
    event loop (service/api/json_body.py says which bounds and why)."""
    raw = await read_body(request, max_body_bytes)
    return await asyncio.to_thread(_validate, raw)


def _validate(raw: bytes) -> ChatCompletionRequest:
    body = parse_bounded(raw)
    if not isinstance(body, dict):
        raise OpenAIError("invalid_json", "the body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}  # null = not given (clients send it for defaults)
    messages = body.get("messages")
    if not isinstance(messages, list) or [m.get("role") if isinstance(m, dict) else None for m in messages] != ["user"]:
        raise OpenAIError("unsupported_messages", "send exactly one message, with role `user`, holding the media, the "
                          "question and nothing else: SR-3D answers one question per job, so system, assistant, tool "
                          "and earlier turns are refused", param="messages")
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = _where(err["loc"])
        if err["type"] == "extra_forbidden":
            raise OpenAIError("unsupported_parameter", f"{where!r} is not supported by this server", param=where) from None
        if err["type"] == "union_tag_invalid":
            raise OpenAIError("unsupported_parameter", f"{where}: content parts are text, image_url or video_url",
                              param=where) from None
        raise OpenAIError("invalid_parameter", f"{where}: {err['msg']}", param=where) from None
    if req.n not in (None, 1):
        raise OpenAIError("unsupported_parameter", "n must be 1 (one completion per job; send several requests)", param="n")
    if req.stream_options is not None and not req.stream:
        raise OpenAIError("invalid_parameter", "stream_options is only allowed with stream: true", param="stream_options")
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise OpenAIError("invalid_parameter", "give max_completion_tokens or max_tokens, not two different values",
                          param="max_completion_tokens")
    return req


def stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP or any(not s or len(s) > 256 for s in stops):
        raise OpenAIError("invalid_parameter", f"stop: up to {MAX_STOP} non-empty strings of <= 256 chars", param="stop")
    return stops


def split_masks(regions: list[Any]) -> tuple[list[Any], dict[str, str]]:
    """Regions with every mask URL replaced by a part name (the multipart API's form, which
    check_fields validates), and the URL of each name. One name per distinct URL: a file referenced
    as the mask of 8 regions x 8 frames is opened and stored once, not 64 times (issue 30 item 2).
    Anything else is left for check_fields."""
    urls: dict[str, str] = {}
    names: dict[str, str] = {}

    def rename(ann: Any) -> Any:
        if isinstance(ann, dict) and isinstance(ann.get("mask"), str):
            url = ann["mask"]
            if not url.startswith(("data:", MEDIA_SCHEME)):
                raise OpenAIError("invalid_media_reference", "a region mask is a data:image/png;base64 URL or an "
                                  f"{MEDIA_SCHEME}<file id> reference", param="regions")
            if url not in names:
                names[url] = f"m{len(urls)}"
                urls[names[url]] = url
            return {**ann, "mask": names[url]}
        return ann

    out = [[rename(a) for a in item] if isinstance(item, list) else rename(item) for item in regions]
    return out, urls


# --------------------------------------------------------------------------------------------------
# Chat completions: the route


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}, "description": "chat.completion, or chat.completion.chunk "
                     "events ending in `data: [DONE]` when stream is true"}},
    summary="OpenAI-compatible chat completion about one image or video (regions: extension field)",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": inline_schema(ChatCompletionRequest)}}}},
)
async def chat_completions(request: Request, caller: Caller = Depends(rate_limited),
                           gw: GatewayState = Depends(state)) -> Response:
    settings = gw.settings
    with gw.uploads.hold(caller.tenant):  # per-key bodies in flight (SR3D_QUOTA_UPLOADS)
        req = await parse_request(request, settings.chat_body_max_bytes)
    if req.model != settings.served_model_name:
        raise OpenAIError("model_not_found", f"model {req.model!r} does not exist; this server serves "
                          f"{settings.served_model_name!r}", param="model")
    stops = stop_list(req.stop)
    parts = req.messages[0].content
    media = [p for p in parts if not isinstance(p, TextPart)]
    if len(media) != 1:
        raise OpenAIError("media_missing" if not media else "too_many_media",
                          f"send exactly one image_url or video_url part (got {len(media)})", param="messages[0].content")
    kind = "image" if isinstance(media[0], ImagePart) else "video"
    url = media[0].image_url.url if isinstance(media[0], ImagePart) else media[0].video_url.url
    question_text = "\n".join(p.text for p in parts if isinstance(p, TextPart))
    options = {k: v for k, v in {"max_tokens": req.max_completion_tokens or req.max_tokens, "temperature": req.temperature,
                                 "top_p": req.top_p, "seed": req.seed, "num_frames": req.num_frames,
                                 "answer_mode": req.answer_mode, "scale_hint": req.scale_hint}.items() if v is not None}
    named_regions, mask_urls = split_masks(req.regions or [])
    question, regions, opts = check_fields(kind, question_text, named_regions, options, settings)

    idem = request.headers.get("idempotency-key")
    if idem is not None and not (1 <= len(idem) <= 255):
        raise OpenAIError("bad_idempotency_key", "Idempotency-Key must be 1..255 characters")
    check_stream_room(gw.hub, caller.tenant)  # the answer is streamed or waited for: refuse before queueing
    # The key is bound to the request as parsed (canonical JSON, media URLs included): a repeat with
    # another body is 422 idempotency_key_reused, not a replay of a job that answers something else.
    req_hash = hashlib.sha256(req.model_dump_json().encode()).hexdigest() if idem else None
    job_id = await replayed_job(gw, idem, caller, req_hash)
    if job_id is None:
        # Sized before anything is decoded or copied to a temp file (sr3d-media:// files by their metadata).
        await check_referenced_bytes(gw, caller, [url, *mask_urls.values()], settings.max_upload_bytes + 1024 * 1024)
        async with contextlib.AsyncExitStack() as stack:
            media_file, filename = await open_media(gw, caller, url, kind, stack)
            masks = {name: (await open_media(gw, caller, u, "mask", stack))[0] for name, u in mask_urls.items()}
            # Files referenced by id are each under the cap; together they get the multipart body's bound.
            total = sum(f.seek(0, 2) for f in (media_file, *masks.values()))
            if total > settings.max_upload_bytes + 1024 * 1024:
                raise OpenAIError("upload_too_large", f"media and masks are {total} bytes together, over the cap")
            sub = Submission(media=media_file, media_kind=kind, media_filename=filename, question=question,
                             regions=regions, masks=masks, scene=None, options=opts)
            # Per-key quotas (service/quotas.py): jobs in flight and bytes held, reserved before storing.
            async with gw.ledger.job_slot(caller.tenant, total) as slot:
                job_id, created_job = await store_and_submit(gw, sub, caller, idem, req_hash)
                await slot.bind(job_id, created_job)

    headers = {JOB_HEADER: job_id, "Location": f"/v1/spatial-qa/{job_id}"}
    cid, created, model = f"chatcmpl-{job_id}", int(time.time()), settings.served_model_name
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        sub = subscribe(gw.hub, job_id, owner=caller.tenant)
        events = stream_chunks(sub, cid, created, model, stops, include_usage)
        return SubscriptionResponse(sub, events, ping=settings.sse_ping_s, headers={**SSE_HEADERS, **headers})

    view = await wait_for_terminal(gw, job_id, settings.wait_timeout_s, caller.tenant)
    if view is None:
        raise OpenAIError("job_timeout", f"no answer within {settings.wait_timeout_s:g}s; the job runs on: GET "
                          f"/v1/spatial-qa/{job_id}, or use stream: true", headers={**headers, **NO_RETRY}, status=504)
    if view.status != JobStatus.done:
        raise _job_error(view, headers)
    text, cut = apply_stop(view.answer or "", stops)
    body = ChatCompletion(id=cid, created=created, model=model, usage=_usage(view.usage),
                          choices=[Choice(message=AssistantMessage(content=text),
                                          finish_reason="stop" if cut else (view.finish_reason or "stop"))],
                          measurements=view.measurements, answer_mode=view.answer_mode)
    return JSONResponse(body.model_dump(mode="json"), headers=headers)


def _usage(usage: Usage | dict[str, Any] | None) -> CompletionUsage:
    u = Usage.model_validate(usage or {})
    return CompletionUsage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                           total_tokens=u.prompt_tokens + u.completion_tokens)


def _job_error(view: JobView, headers: dict[str, str]) -> OpenAIError:
    code = view.error.code if view.error else view.status.value
    message = view.error.message if view.error else f"the job {view.status.value}"
    status = status_for(code)
    return OpenAIError(code, message, headers={**headers, **NO_RETRY}, status=status if status >= 400 else 500)


def apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the first stop sequence, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


# --------------------------------------------------------------------------------------------------
# Chat completions: streaming


class TextGate:
    """What of the answer so far may be sent. Sent text is never taken back: text is held back while
    it could still be the start of a stop sequence, and after a worker died and the job restarted
    ("restream"), regenerated text is sent only beyond what the client already has."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = ""
        self.stopped = False

    def advance(self, produced: str, final: bool) -> str:
        """The new delta, given all the text the current attempt has produced."""
        visible, self.stopped = apply_stop(produced, self.stops)
        if not (final or self.stopped) and self.hold:
            visible = visible[: max(0, len(visible) - self.hold)]
        if visible.startswith(self.sent):
            delta, self.sent = visible[len(self.sent):], visible
            return delta
        if self.sent.startswith(visible):
            return ""  # a restarted job catching up
        raise ApiError("restream_diverged", "the job restarted and its new answer differs from what was sent; "
                       "GET /v1/spatial-qa/{id} has the final answer")


async def stream_chunks(sub: Subscription, cid: str, created: int, model: str, stops: list[str],
                        include_usage: bool) -> AsyncIterator[ServerSentEvent]:
    """The job's events as chat.completion.chunk events, then `data: [DONE]`. An error after the
    stream started is an OpenAI error object in the stream (the openai client raises it)."""

    def chunk(delta: Delta | None = None, finish: str | None = None, usage: CompletionUsage | None = None,
              done: dict[str, Any] | None = None) -> ServerSentEvent:
        choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish)]
        c = ChatCompletionChunk(id=cid, created=created, model=model, choices=choices, usage=usage,
                                measurements=(done or {}).get("measurements"), answer_mode=(done or {}).get("answer_mode"))
        return ServerSentEvent(data=c.model_dump_json(exclude_none=True))

    gate, produced = TextGate(stops), ""
    yield chunk(Delta(role="assistant", content=""))
    try:
        async for ev in sub.events():
            if ev.type == "progress" and ev.data.get("discard"):
                produced = ""
            elif ev.type == "error":
                raise ApiError(str(ev.data.get("code")), str(ev.data.get("message")))
            elif ev.type == "token" and not gate.stopped:
                produced += str(ev.data.get("text", ""))
                if delta := gate.advance(produced, final=False):
                    yield chunk(Delta(content=delta))
                if gate.stopped:
                    yield chunk(Delta(), finish="stop")
                    if not include_usage:
                        break  # the job runs on; its usage is not needed
            elif ev.type == "done":
                if not gate.stopped:
                    if delta := gate.advance(str(ev.data.get("answer", "")), final=True):
                        yield chunk(Delta(content=delta))
                    yield chunk(Delta(), finish="stop" if gate.stopped else str(ev.data.get("finish_reason") or "stop"),
                                done=ev.data)
                if include_usage:  # after a stop sequence: the tokens the job generated
                    yield chunk(usage=_usage(ev.data.get("usage")))
    except ApiError as e:
        status = status_for(e.code)
        yield ServerSentEvent(data=json.dumps(openai_error_body(e.code, e.message, status if status >= 400 else 500)))
    yield ServerSentEvent(data="[DONE]")
