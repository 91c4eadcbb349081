"""The spatial-QA routes: submit (202, SSE stream or wait), status, events (resumable SSE), cancel."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from service.api.deps import Caller, GatewayState, authenticate, owned_job, owned_job_and_spec, rate_limited, state
from service.api.errors import ERROR_RESPONSES
from service.api.submission import replayed_job, request_hash, store_and_submit, wait_for_terminal
from service.api.upload import SUBMIT_BODY, closing_form, parse_submit
from service.errors import ApiError
from service.quotas import declared_length, files_size
from service.schemas import JobStatus, JobView, SubmitResponse
from service.sse import check_stream_room, sse_response, subscribe
from service.stream_hub import parse_event_id

router = APIRouter(prefix="/v1", tags=["spatial-qa"])


@router.post(
    "/spatial-qa",
    status_code=202,
    response_model=SubmitResponse,
    responses={**ERROR_RESPONSES, 200: {"description": "SSE stream (Accept: text/event-stream or ?stream=true) or "
                                        "the finished job (?wait=true)", "content": {"text/event-stream": {}}}},
    openapi_extra=SUBMIT_BODY,
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
        raise ApiError("bad_idempotency_key", "Idempotency-Key must be 1..255 characters")
    wants_stream = stream or "text/event-stream" in request.headers.get("accept", "")
    # Per-key quotas (service/quotas.py): jobs in flight and bytes held, reserved before storing; against
    # the body's Content-Length before it is read (not for an Idempotency-Key: a replay needs no room).
    declared = None if idem is not None else declared_length(request.headers)
    # The uploads' temp files are closed once stored (or refused), not when the stream below ends.
    async with gw.ledger.job_slot(caller.tenant) as slot, closing_form(request):
        with gw.uploads.hold(caller.tenant):  # per-key bodies in flight (SR3D_QUOTA_UPLOADS)
            if declared is not None:
                await slot.reserve(declared, declared=True)
            sub = await parse_submit(request, settings)
        if wants_stream or wait:
            check_stream_room(gw.hub, caller.tenant)

        # A repeat of a known key (with the same request) skips storing the uploads again.
        # Hashing re-reads the uploads (up to SR3D_MAX_UPLOAD_MB): off the event loop.
        req_hash = await asyncio.to_thread(request_hash, sub) if idem else None
        job_id = await replayed_job(gw, idem, caller, req_hash)
        created = False
        if job_id is None:
            nbytes = files_size(sub.media, sub.scene, *sub.masks.values())
            if not slot.reserved:
                await slot.reserve(nbytes)
            job_id, created = await store_and_submit(gw, sub, caller, idem, req_hash)
            await slot.bind(job_id, created, nbytes)
    headers = {"Location": f"/v1/spatial-qa/{job_id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    if wants_stream:
        return sse_response(gw.jobs, subscribe(gw.hub, job_id, owner=caller.tenant), ping_s=settings.sse_ping_s,
                            cancel_on_disconnect=sub.options.cancel_on_disconnect, headers=headers)
    if wait:
        view = await wait_for_terminal(gw, job_id, settings.wait_timeout_s, caller.tenant)
        if view is not None:
            return JSONResponse(view.model_dump(mode="json"), status_code=200, headers=headers)
    base = str(request.base_url).rstrip("/")
    # A replay answers with the job's status now (it may be done), not the `queued` of a new job.
    current = None if created else await gw.jobs.get(job_id)
    body = SubmitResponse(job_id=job_id, status=current.status if current else JobStatus.queued,
                          status_url=f"{base}/v1/spatial-qa/{job_id}", events_url=f"{base}/v1/spatial-qa/{job_id}/events")
    return JSONResponse(body.model_dump(mode="json"), status_code=202, headers=headers)


@router.get("/spatial-qa/{job_id}", response_model=JobView, responses=ERROR_RESPONSES, summary="Job status and answer")
async def get_job(job_id: str, caller: Caller = Depends(authenticate), gw: GatewayState = Depends(state)) -> JobView:
    return await owned_job(gw, job_id, caller)


@router.get(
    "/spatial-qa/{job_id}/events",
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}, "description": "SSE: queued, progress, "
                                        "token, done | error; resumes after Last-Event-ID"},
               204: {"description": "Last-Event-ID is at or after the job's terminal event: nothing more will come "
                                    "(also tells a browser EventSource to stop reconnecting)"}},
    summary="Stream (or resume) a job's events",
)
async def job_events(
    request: Request,
    job_id: str,
    last_event_id: str | None = Query(None, description="resume after this event id (or the Last-Event-ID header)"),
    caller: Caller = Depends(authenticate),
    gw: GatewayState = Depends(state),
) -> Response:
    after = parse_event_id(request.headers.get("last-event-id") or last_event_id or "0-0")
    # Room first: a key at its stream quota (or a full gateway) is refused before any Redis read, so
    # a tenant repeating refused streams costs the gateway one check, not four round trips each.
    check_stream_room(gw.hub, caller.tenant)
    _, spec = await owned_job_and_spec(gw, job_id, caller)
    if await gw.hub.check_resume(job_id, after) == "ended":
        return Response(status_code=204)
    cancel = bool(spec and spec.options.cancel_on_disconnect)
    return sse_response(gw.jobs, subscribe(gw.hub, job_id, after, caller.tenant), ping_s=gw.settings.sse_ping_s,
                        cancel_on_disconnect=cancel)


@router.delete(
    "/spatial-qa/{job_id}", status_code=202, response_model=JobView, responses=ERROR_RESPONSES, summary="Cancel a job"
)
async def cancel_job(job_id: str, caller: Caller = Depends(authenticate), gw: GatewayState = Depends(state)) -> JSONResponse:
    view = await owned_job(gw, job_id, caller)
    if view.status.terminal or not await gw.jobs.request_cancel(job_id):
        current = await gw.jobs.get(job_id) or view
        raise ApiError("job_finished", f"job {job_id} is already {current.status.value}")
    after = await gw.jobs.get(job_id) or view
    return JSONResponse(after.model_dump(mode="json"), status_code=202)
