"""Turning a checked request into a queued job, for any router (the multipart route in jobs.py, and
others that take the same job in another wire format):

  check_fields(...)         question, regions and options validated against the deployment caps
  request_hash(...)         what an Idempotency-Key is bound to: the request's fields and file contents
  replayed_job(...)         the job an Idempotency-Key already names (422 when sent with another request)
  store_and_submit(...)     uploads -> blob store (media hashed while stored: one read) -> JobSpec -> queue
  wait_for_terminal(...)    the finished JobView, or None after a timeout

Routers add their own parsing in front and their own response shape behind; the rules live here.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

from pydantic import ValidationError

from service import keys
from service.api.deps import Caller, GatewayState
from service.blobs import BlobStore, BlobTooLarge
from service.errors import ApiError
from service.jobs import IdempotencyKeyReused, QueueFull
from service.logging import bind_job
from service.schemas import (
    BoxRegion,
    GenerationOptions,
    JobSpec,
    JobView,
    MaskRef,
    RegionSpec,
    RegionsInput,
    check_question,
)
from service.settings import Settings
from service.stream_hub import HubFull

log = logging.getLogger("sr3d.gateway")

MediaKind = Literal["video", "image"]


@dataclass
class Submission:
    """One job as the client asked for it, checked, before anything is stored. File objects are
    read from their start; `masks` maps the part name a MaskRegion names to its PNG."""

    media: BinaryIO
    media_kind: MediaKind
    media_filename: str
    question: str
    regions: list[RegionSpec]
    masks: dict[str, BinaryIO]
    scene: BinaryIO | None
    options: GenerationOptions


class HashingReader:
    """A read-only file view that hashes what is read through it, so storing an upload also yields
    its sha256 (one pass over the bytes). Seeking back to 0 restarts the hash, like a fresh read."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._hash = hashlib.sha256()

    def seek(self, offset: int, whence: int = 0) -> int:
        # Rewind (restarts the hash) or jump to the end (the blob store sizes the upload first).
        if (offset, whence) == (0, os.SEEK_END):
            return self._file.seek(0, os.SEEK_END)
        if (offset, whence) != (0, os.SEEK_SET):
            raise ValueError("HashingReader only rewinds to the start or jumps to the end")
        self._hash = hashlib.sha256()
        return self._file.seek(0)

    def tell(self) -> int:
        return self._file.tell()

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._hash.update(data)
        return data

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = err["loc"]
    # Drop the discriminator tags pydantic puts in the path ("box"/"mask"), keep the field name.
    where = ".".join(str(p) for i, p in enumerate(loc) if not (p in ("box", "mask") and i < len(loc) - 1))
    return f"{where}: {err['msg']}" if where else err["msg"]


def check_fields(kind: MediaKind, question: str, regions: Any, options: Any,
                 settings: Settings) -> tuple[str, list[RegionSpec], GenerationOptions]:
    """Everything about a job that can be checked without its media: region shapes and caps,
    generation options and caps, the question (reserved tokens, region references)."""
    try:
        parsed = RegionsInput.model_validate({"regions": regions}).regions
    except ValidationError as e:
        raise ApiError("regions_invalid", first_error(e)) from None
    if len(parsed) > settings.max_regions:
        raise ApiError("too_many_regions", f"{len(parsed)} regions > cap {settings.max_regions}")
    for k, region in enumerate(parsed):
        if len(region) > settings.max_masks_per_region:
            raise ApiError("too_many_annotations",
                           f"region {k} has {len(region)} annotations > cap {settings.max_masks_per_region}")
        for ann in region:
            if kind == "image" and ann.frame != 0:
                raise ApiError("region_frame_out_of_range", f"region {k}: an image has only frame 0, not {ann.frame}")
    try:
        opts = GenerationOptions.model_validate(options)
    except ValidationError as e:
        # A scale hint is a fact about the scene, not a knob: a wrong one is a plain bad request.
        code = "bad_scale_hint" if e.errors()[0]["loc"][:1] == ("scale_hint",) else "options_invalid"
        raise ApiError(code, first_error(e)) from None
    except TypeError:
        raise ApiError("options_invalid", "options must be a JSON object") from None
    opts = opts.check_caps(settings)
    if opts.scale_hint is not None and opts.scale_hint.region >= len(parsed):
        raise ApiError("bad_scale_hint", f"scale_hint names region {opts.scale_hint.region}; "
                       f"the request has {len(parsed)} region(s)")
    return check_question(question, len(parsed), settings), parsed, opts


def _file_digest(f: BinaryIO) -> str:
    """sha256 of a whole upload, read in 1 MiB slices; the file is left rewound for the blob store."""
    h = hashlib.sha256()
    f.seek(0)
    while chunk := f.read(1 << 20):
        h.update(chunk)
    f.seek(0)
    return h.hexdigest()


def request_hash(sub: Submission) -> str:
    """The request an Idempotency-Key is bound to: every field and the content of every file, in a
    canonical form (a client's retry re-encodes the multipart body with a new boundary, so the raw
    bytes would differ for the same request). A repeat with another hash is refused."""
    parts = {
        "media_kind": sub.media_kind, "media": _file_digest(sub.media), "question": sub.question,
        "regions": [[ann.model_dump(mode="json") for ann in region] for region in sub.regions],
        "masks": {name: _file_digest(f) for name, f in sorted(sub.masks.items())},
        "scene": _file_digest(sub.scene) if sub.scene is not None else None,
        "options": sub.options.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _reused(e: IdempotencyKeyReused) -> ApiError:
    # Counted in sr3d_jobs_rejected_total by the error handler, like every 422 of a submit route.
    return ApiError("idempotency_key_reused", str(e))


async def replayed_job(gw: GatewayState, idempotency_key: str | None, caller: Caller,
                       req_hash: str | None) -> str | None:
    """The job this Idempotency-Key already names, if any (so a repeat stores nothing). ApiError
    idempotency_key_reused (422) when the key was first sent with a different request."""
    if idempotency_key is None:
        return None
    try:
        job_id = await gw.jobs.lookup_idempotent(idempotency_key, caller.key_id, req_hash)
    except IdempotencyKeyReused as e:
        raise _reused(e) from None
    if job_id is not None:
        bind_job(job_id)  # the rest of this request logs with the job's id
    return job_id


async def store_and_submit(gw: GatewayState, sub: Submission, caller: Caller,
                           idempotency_key: str | None = None, req_hash: str | None = None) -> tuple[str, bool]:
    """Store the uploads and queue the job. Returns (job_id, created); created is False when the
    Idempotency-Key already named a job (that job's id is returned, nothing of this one is kept).
    The key is bound to `req_hash` (`request_hash(sub)` when None and a key is given).
    Raises ApiError queue_full (429), upload_too_large (413) or idempotency_key_reused (422);
    stored blobs never outlive a failure."""
    if idempotency_key is not None and req_hash is None:
        req_hash = await asyncio.to_thread(request_hash, sub)  # re-reads the uploads: off the event loop
    job_id = uuid.uuid4().hex
    ttl = gw.settings.job_max_age_s
    stored: list[str] = []

    async def put(key: str, data: Any) -> str:
        await gw.blobs.put(key, data, ttl)
        stored.append(key)
        return key

    try:
        media = HashingReader(sub.media)
        media_key = await put(keys.media_blob(job_id), media)
        mask_keys = {name: await put(keys.mask_blob(job_id, name), f) for name, f in sub.masks.items()}
        scene_key = await put(keys.scene_blob(job_id), sub.scene) if sub.scene is not None else None
        regions = [
            [ann if isinstance(ann, BoxRegion) else MaskRef(frame=ann.frame, mask_blob=mask_keys[ann.mask]) for ann in region]
            for region in sub.regions
        ]
        spec = JobSpec(
            job_id=job_id, media_kind=sub.media_kind, media_blob=media_key, media_hash=media.hexdigest(),
            media_filename=os.path.basename(sub.media_filename)[:200], question=sub.question,
            regions=regions, scene_blob=scene_key, options=sub.options, created_at=time.time(),
            api_key_id=caller.key_id,
        )
        got_id, created = await gw.jobs.submit(spec, idempotency_key, req_hash)
    except IdempotencyKeyReused as e:
        await _delete(gw.blobs, stored)
        raise _reused(e) from None
    except QueueFull as e:
        await _delete(gw.blobs, stored)
        raise ApiError("queue_full", str(e), {"Retry-After": str(e.retry_after_s)}) from None
    except BlobTooLarge as e:
        await _delete(gw.blobs, stored)
        raise ApiError("upload_too_large", str(e)) from None
    except BaseException:
        await _delete(gw.blobs, stored)
        raise
    if not created:  # lost an idempotency race: the other request's job stands
        await _delete(gw.blobs, stored)
    bind_job(got_id)  # the rest of this request logs with the job's id
    log.info("job submitted", extra={"job_id": got_id, "media_kind": sub.media_kind, "new_job": created,
                                     "regions": len(sub.regions), "api_key_id": caller.key_id})
    return got_id, created


async def _delete(blobs: BlobStore, blob_keys: list[str]) -> None:
    for key in blob_keys:
        with contextlib.suppress(Exception):
            await blobs.delete(key)


async def wait_for_terminal(gw: GatewayState, job_id: str, timeout_s: float, owner: str | None = None) -> JobView | None:
    """The finished job, or None if it is not finished within timeout_s. Waits through the stream
    hub (no Redis connection of its own); ApiError too_many_streams (503) when the hub is full, and
    the hub's own `error` (job expired, Redis unreachable) as an ApiError."""
    try:
        ev = await gw.hub.wait_terminal(job_id, timeout_s, owner)
    except HubFull as e:
        raise e.api_error() from None
    if ev is None:
        return None
    if not ev.id:  # made by the hub, not the job: the stream could not be followed to its end
        raise ApiError(str(ev.data["code"]), str(ev.data["message"]))
    return await gw.jobs.view_at(job_id, ev)
