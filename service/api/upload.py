"""Multipart parsing for POST /v1/spatial-qa: every cheap check (fields, caps, question, regions,
file types by extension AND content) before anything is stored (storing: service/api/submission.py).
"""
from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from service.api.submission import Submission, check_fields
from service.errors import ApiError
from service.media.sniff import FAMILY_EXT, HEAD_BYTES, sniff
from service.schemas import MaskRegion, parse_json_field
from service.settings import Settings

TEXT_FIELDS = {"question", "regions", "options"}
# Containers the worker's decoder takes (service/media/probe.py); PyAV probes codecs, sizes and durations there.
VIDEO_EXT = FAMILY_EXT["mp4"] | FAMILY_EXT["matroska"]
IMAGE_EXT = FAMILY_EXT["png"] | FAMILY_EXT["jpeg"]
MASK_EXT = FAMILY_EXT["png"]
SCENE_EXT = FAMILY_EXT["npz"]

# For the OpenAPI document: FastAPI cannot describe a multipart body read through request.form().
SUBMIT_BODY: dict[str, Any] = {
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


def _ext(filename: str | None) -> str:
    return os.path.splitext(filename or "")[1].lower()


async def _check_type(upload: UploadFile, part: str, allowed_ext: frozenset[str]) -> None:
    """Extension and content must agree, and both be a type the worker decodes."""
    await upload.seek(0)
    family = sniff(await upload.read(HEAD_BYTES))
    await upload.seek(0)
    ext = _ext(upload.filename)
    if ext not in allowed_ext or family is None or ext not in FAMILY_EXT[family]:
        raise ApiError("unsupported_media_type",
                       f"part {part!r}: {upload.filename!r} is not one of {sorted(allowed_ext)} "
                       f"(extension and content must agree; content looks like {family or 'unknown'})")


@asynccontextmanager
async def closing_form(request: Request) -> AsyncIterator[None]:
    """Closes the form `request.form()` parsed (its uploads' spooled temp files) when the block ends.
    FastAPI closes only forms it parsed for declared parameters; left to the request object, a streamed
    submit's media file stayed open on temp disk for as long as the job's event stream lasted."""
    try:
        yield
    finally:
        await request.close()


async def parse_submit(request: Request, settings: Settings) -> Submission:
    """The multipart request as a checked Submission (its files are the uploads' spooled files: read
    them inside the caller's `closing_form(request)`)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError("unsupported_media_type", "send multipart/form-data (video or image, question, regions, ...)")
    max_files = settings.max_regions * settings.max_masks_per_region + 2
    form = await request.form(max_files=max_files, max_fields=len(TEXT_FIELDS) + 2, max_part_size=256 * 1024)
    text: dict[str, str] = {}
    files: dict[str, UploadFile] = {}
    for name, value in form.multi_items():
        if name in text or name in files:
            raise ApiError("duplicate_part", f"part {name!r} given twice")
        if isinstance(value, UploadFile):
            files[name] = value
        elif name in TEXT_FIELDS:
            text[name] = value
        else:
            raise ApiError("unknown_field", f"unknown form field {name!r} (expected {sorted(TEXT_FIELDS)} + files)")

    video, image = files.pop("video", None), files.pop("image", None)
    if video is None and image is None:
        raise ApiError("media_missing", "send a `video` or an `image` file part")
    if video is not None and image is not None:
        raise ApiError("media_ambiguous", "send either `video` or `image`, not both")
    media, kind = (video, "video") if video is not None else (image, "image")
    assert media is not None
    if "question" not in text:
        raise ApiError("question_missing", "the `question` field is required")

    question, regions, options = check_fields(
        kind, text["question"], parse_json_field(text.get("regions"), "regions", []),
        parse_json_field(text.get("options"), "options", {}), settings,
    )

    scene = files.pop("scene", None)
    referenced = {ann.mask for region in regions for ann in region if isinstance(ann, MaskRegion)}
    missing = referenced - files.keys()
    if missing:
        raise ApiError("mask_part_missing", f"regions name mask parts that were not sent: {sorted(missing)}")
    extra = files.keys() - referenced
    if extra:
        raise ApiError("unreferenced_part", f"file parts no region refers to: {sorted(extra)}")

    await _check_type(media, kind, VIDEO_EXT if kind == "video" else IMAGE_EXT)
    for name, upload in files.items():
        await _check_type(upload, name, MASK_EXT)
    if scene is not None:
        await _check_type(scene, "scene", SCENE_EXT)
    return Submission(
        media=media.file, media_kind=kind, media_filename=media.filename or "upload", question=question,
        regions=regions, masks={name: upload.file for name, upload in files.items()},
        scene=scene.file if scene is not None else None, options=options,
    )

