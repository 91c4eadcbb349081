"""A JSON request body read with bounds (the chat-completions route; issue 30 items 3, 5, 7 and 8).

`read_body` streams the body in and stops at a byte cap, so a client cannot make the gateway hold
more than the cap per request (Content-Length is checked first, bytes are counted as they arrive);
it counts the structural characters below as the chunks arrive and keeps nothing of a body over
their bound.

`parse_bounded` turns the bytes into Python data, refusing before anything recursive or expensive
runs:
  - more than MAX_JSON_VALUES structural characters (`{`, `[`, `,`): bytes.count is one C pass, so
    1.5 M regions or empty text parts are refused in milliseconds instead of being parsed into
    millions of objects and validated (16 s on the event loop, issue 30 item 3). A legal chat
    request has a handful of parts, <= max_regions x max_masks_per_region annotations and a
    question of <= max_question_chars, far below the bound;
  - nesting deeper than MAX_JSON_DEPTH (json.loads raises RecursionError at ~1,000 levels, which
    was a plain-text 500);
  - integers over 20 digits, Infinity/NaN (the multipart fields' rules, service/schemas.py);
  - strings that are not valid Unicode text: a lone surrogate (`"\\ud800"`) is legal JSON but
    cannot be encoded as UTF-8, and failed later while the job was being stored (a 500 that had
    already written the Idempotency-Key). Refused here, before anything is stored.
Callers run it in a worker thread (asyncio.to_thread): the count is C, the walk is Python that
yields the GIL, so the event loop keeps answering while a large body is checked.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from service.errors import ApiError
from service.schemas import MAX_JSON_DEPTH, _parse_float, _parse_int, _reject_constant

# Structural characters in a legal chat request: parts (<= 64), regions x annotations (<= 8 x 8 by
# default, each a 4-number box: ~6 each), stop (<= 4) and the question's own commas (<= 2,000 chars).
MAX_JSON_VALUES = 8192


def body_error(message: str) -> ApiError:
    return ApiError("invalid_json", message)


async def read_body(request: Request, max_bytes: int, max_values: int = MAX_JSON_VALUES) -> bytes:
    """The whole body, or ApiError upload_too_large (413) as soon as it is over `max_bytes`, or
    json_too_complex once it holds more than `max_values` JSON structural characters.

    The structural characters are counted chunk by chunk as the body arrives (one C pass over each
    ~64 KiB chunk): a body of a million regions is known to be refused after its first kilobytes, so
    it is never kept, never joined into one 12 MB bytes object on the event loop, and never counted
    in one piece (a 14 MB `bytes.count` holds the GIL, and with it the event loop, for ~16 ms). Such a
    body is still read to its end, only counted for the byte cap, so the client gets its 4xx after
    sending as for every other refusal (answering mid-upload makes clients see a reset instead)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ApiError("upload_too_large", f"the request body is {int(declared)} bytes, over the {max_bytes} byte "
                       "cap of this route (upload large media with POST /v1/files and reference it)")
    chunks: list[bytes] = []
    seen = values = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > max_bytes:
            raise ApiError("upload_too_large", f"the request body is over the {max_bytes} byte cap of this route "
                           "(upload large media with POST /v1/files and reference it)")
        if values <= max_values:
            values += _structural(chunk)
            if values > max_values:
                chunks.clear()  # refused: the rest is only drained
            else:
                chunks.append(chunk)
    if values > max_values:
        raise too_complex(f"over {max_values}", max_values)
    return b"".join(chunks)


def _structural(raw: bytes) -> int:
    return raw.count(b"{") + raw.count(b"[") + raw.count(b",")


def too_complex(values: int | str, max_values: int) -> ApiError:
    return ApiError("json_too_complex", f"the body has {values} JSON objects, arrays and separators; a chat "
                    f"request has at most {max_values}")


def parse_bounded(raw: bytes, max_values: int = MAX_JSON_VALUES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`raw` as JSON data within the bounds above, or ApiError invalid_json (400)."""
    values = _structural(raw)
    if values > max_values:
        raise too_complex(values, max_values)
    try:
        data = json.loads(raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_reject_constant)
    except RecursionError:
        raise body_error(f"the body is nested too deep (max {max_depth})") from None
    except json.JSONDecodeError as e:
        raise body_error(f"the body is not valid JSON: {e.msg} at char {e.pos}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise body_error(f"the body is not valid JSON: {e}") from None
    check_tree(data, max_depth)
    return data


def check_tree(data: Any, max_depth: int) -> None:
    """Depth and text of parsed JSON, without recursion."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node)
        elif isinstance(node, dict | list):
            if depth > max_depth:
                raise body_error(f"the body is nested over {max_depth} deep")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, value in items:
                if isinstance(key, str):
                    _check_text(key)
                stack.append((value, depth + 1))


def _check_text(s: str) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise body_error(f"a string holds {s[e.start:e.end].encode('unicode_escape').decode()!r}, a lone UTF-16 "
                         "surrogate, which is not text (send the character itself or its surrogate pair)") from None
