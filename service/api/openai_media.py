"""Media of the OpenAI-compatible routes: turning a content part's URL into a file, and the small
file store behind POST /v1/files.

A media URL is one of
  data:<mime>;base64,<data>   decoded in slices into a spooled temp file, refused once over the cap;
  sr3d-media://<file id>      a file uploaded earlier through POST /v1/files (same API key, not expired);
  http(s)://...               only when the deployment allowlists the host (service/media_fetch.py).
Whatever the source, the bytes must sniff as a type the worker decodes (service/media/sniff.py) and agree
with the part they came in (image_url, video_url, a region mask).
"""
from __future__ import annotations

import asyncio
import binascii
import contextlib
import re
import tempfile
import time
import uuid
from typing import BinaryIO, Literal

from starlette.datastructures import UploadFile

from service import keys
from service.api.deps import Caller, GatewayState
from service.blobs import BlobNotFound, BlobTooLarge
from service.errors import ApiError
from service.media.sniff import HEAD_BYTES, VIDEO_FAMILIES, sniff
from service.media_fetch import SPOOL_BYTES, FetchPolicy, fetch
from service.quotas import files_size

Use = Literal["image", "video", "mask"]
FAMILIES: dict[Use, frozenset[str]] = {
    "image": frozenset({"png", "jpeg"}),
    "video": VIDEO_FAMILIES,
    "mask": frozenset({"png"}),
}
# data: URL media types -> the family their bytes must sniff as.
MIME_FAMILY = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "video/mp4": "mp4",
               "video/quicktime": "mp4", "video/webm": "matroska", "video/x-matroska": "matroska"}
# The worker picks a decoder by content, but keeps the suffix for the temp file it hands PyAV.
FILENAME = {"png": "media.png", "jpeg": "media.jpg", "mp4": "media.mp4", "matroska": "media.mkv"}
MEDIA_SCHEME = "sr3d-media://"
FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
_DATA_URL = re.compile(r"^data:([a-z0-9.+/-]+)((?:;[a-z0-9=.+-]+)*?);base64,", re.IGNORECASE)
_SLICE = 4 * 256 * 1024  # base64 characters decoded at a time (a multiple of 4)


def decode_data_url(url: str, use: Use, max_bytes: int) -> BinaryIO:
    """The bytes of a base64 `data:` URL as a file at position 0. Decoded slice by slice into a
    spooled file, so at most the URL string plus one slice is in memory."""
    m = _DATA_URL.match(url[:256])
    if m is None:
        raise ApiError("invalid_data_url", "a data: URL must look like data:<type>;base64,<data>")
    mime = m.group(1).lower()
    if mime not in MIME_FAMILY or MIME_FAMILY[mime] not in FAMILIES[use]:
        wanted = sorted(t for t, f in MIME_FAMILY.items() if f in FAMILIES[use])
        raise ApiError("unsupported_media_type", f"data: URL type {mime!r} is not one of {wanted} (for {use})")
    start = m.end()
    if (len(url) - start) // 4 * 3 > max_bytes:  # before decoding anything
        raise ApiError("upload_too_large", f"data: URL media is over the {max_bytes} byte cap")
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    try:
        for i in range(start, len(url), _SLICE):
            try:
                out.write(binascii.a2b_base64(url[i : i + _SLICE], strict_mode=True))
            except (binascii.Error, ValueError):
                raise ApiError("invalid_data_url", "the data: URL is not valid base64") from None
        if out.tell() == 0:
            raise ApiError("invalid_data_url", "the data: URL is empty")
        _check_content(out, use, want=MIME_FAMILY[mime])
        return out  # type: ignore[return-value]
    except BaseException:
        out.close()
        raise


def _check_content(f: BinaryIO, use: Use, want: str | None = None) -> str:
    """The file's family (sniffed from its first bytes); it must fit `use` (and `want`, if given)."""
    f.seek(0)
    family = sniff(f.read(HEAD_BYTES))
    f.seek(0)
    if family not in FAMILIES[use] or (want is not None and family != want):
        raise ApiError("unsupported_media_type", f"the {use} content is {family or 'unknown'}, "
                       f"not {want or ' or '.join(sorted(FAMILIES[use]))}")
    return family


async def open_media(gw: GatewayState, caller: Caller, url: str, use: Use,
                     stack: contextlib.AsyncExitStack) -> tuple[BinaryIO, str]:
    """(file at position 0, a filename with the right suffix) for a content part's URL. The file
    stays open until `stack` closes (after the job is stored)."""
    settings = gw.settings
    if url.startswith("data:"):
        f = await asyncio.to_thread(decode_data_url, url, use, settings.max_upload_bytes)
        stack.callback(f.close)
    elif url.startswith(MEDIA_SCHEME):
        file_id = url[len(MEDIA_SCHEME):]
        meta = await file_meta(gw, caller, file_id)
        if meta["family"] not in FAMILIES[use]:
            raise ApiError("unsupported_media_type", f"file {file_id} is {meta['family']}, not usable as {use}")
        try:
            path = await stack.enter_async_context(gw.blobs.open_path(keys.file_blob(file_id)))
        except BlobNotFound:
            raise ApiError("file_not_found", f"no file {file_id!r} (unknown or expired)") from None
        f = stack.enter_context(open(path, "rb"))
    else:
        policy = FetchPolicy(frozenset(d.lower() for d in settings.remote_media_domains), settings.max_upload_bytes,
                             settings.remote_media_timeout_s, settings.allow_private_fetch)
        f = await fetch(url, policy, FAMILIES[use], "video/" if use == "video" else "image/")
        stack.callback(f.close)
    family = _check_content(f, use)
    return f, FILENAME[family]


async def check_referenced_bytes(gw: GatewayState, caller: Caller, urls: list[str], max_bytes: int) -> None:
    """413 when the distinct media a request references are over `max_bytes` together, known before
    any of them is decoded or copied: data: URLs by their length, sr3d-media:// files by their stored
    size (remote URLs are capped while they download). Repeats of one URL count once: the route
    opens each distinct URL once."""
    total = 0
    for url in dict.fromkeys(urls):
        if url.startswith(MEDIA_SCHEME):
            total += int((await file_meta(gw, caller, url[len(MEDIA_SCHEME):])).get("bytes", 0))
        elif url.startswith("data:"):
            total += (len(url) - url.find(",") - 1) // 4 * 3
        if total > max_bytes:
            raise ApiError("upload_too_large", f"the media this request references are over {max_bytes} bytes "
                           "together (each distinct file counts once)")


# --------------------------------------------------------------------------------------------------
# POST /v1/files: media stored once, referenced by later requests (a 100 MB video is not base64 in JSON)


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


async def reserve_declared(gw: GatewayState, caller: Caller, file_id: str, declared: int) -> bool:
    """The key's file quotas against the upload's Content-Length, before the body is read (see
    Ledger.reserve_file): True when `declared` bytes are reserved for `file_id`."""
    return await gw.ledger.reserve_file(caller.tenant, file_id, declared, time.time() + gw.settings.files_ttl_s,
                                        declared=True)


async def store_file(gw: GatewayState, caller: Caller, upload: UploadFile, purpose: str, file_id: str | None = None,
                     reserved: bool = False) -> dict[str, str | int]:
    """Store an uploaded image or video for this API key; returns its metadata (FileObject fields).
    `reserved`: `file_id`'s quota entry was reserved at the body's Content-Length (the exact size is
    written with the metadata); otherwise it is reserved here at the file's size."""
    file_id = file_id or new_file_id()
    member = f"file:{file_id}"
    try:
        head = await upload.read(HEAD_BYTES)
        await upload.seek(0)
        family = sniff(head)
        if family not in FILENAME:
            raise ApiError("unsupported_media_type",
                           f"file content is {family or 'unknown'}, not png, jpeg, mp4/mov or webm/mkv")
        ttl = gw.settings.files_ttl_s
        now = int(time.time())
        # The key's quotas (files, bytes held: service/quotas.py) before the bytes reach the shared store:
        # one key's uploads filled the store's high-water mark and refused every other key (issue 30 item 1).
        if not reserved:
            await gw.ledger.reserve_file(caller.tenant, file_id, files_size(upload.file), now + ttl)
        reserved = True
        try:
            size = await gw.blobs.put(keys.file_blob(file_id), upload.file, ttl)
        except BlobTooLarge as e:
            raise ApiError("upload_too_large", str(e)) from None
        meta: dict[str, str | int] = {"id": file_id, "owner": caller.key_id or "", "family": family, "bytes": size,
                                      "created_at": now, "expires_at": now + ttl, "purpose": purpose,
                                      "filename": (upload.filename or FILENAME[family]).rsplit("/", 1)[-1][:200]}
        try:
            async with gw.redis.pipeline(transaction=True) as pipe:
                pipe.hset(keys.file_key(file_id), mapping=meta)
                pipe.expire(keys.file_key(file_id), ttl)
                gw.ledger.settle(pipe, caller.tenant, member, size)
                await pipe.execute()
        except BaseException:
            await gw.blobs.delete(keys.file_blob(file_id))
            raise
    except BaseException:
        if reserved:
            await gw.ledger.release(caller.tenant, member)
        raise
    return meta


async def file_meta(gw: GatewayState, caller: Caller, file_id: str) -> dict[str, str]:
    """A file's metadata, or 404 when unknown, expired or uploaded under another API key."""
    meta = await gw.redis.hgetall(keys.file_key(file_id)) if FILE_ID.match(file_id) else {}
    if not meta or meta.get("owner", "") != (caller.key_id or ""):
        raise ApiError("file_not_found", f"no file {file_id!r} (unknown, expired or not yours)")
    return meta


async def delete_file(gw: GatewayState, caller: Caller, file_id: str) -> None:
    await file_meta(gw, caller, file_id)
    # Three independent deletes, sent together: one wait for Redis instead of three in a row.
    await asyncio.gather(gw.redis.delete(keys.file_key(file_id)), gw.blobs.delete(keys.file_blob(file_id)),
                         gw.ledger.release(caller.tenant, f"file:{file_id}"))
