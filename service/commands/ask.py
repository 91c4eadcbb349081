"""`sr3d ask FILE --region FRAME:x0,y0,x1,y1 [--mask FRAME:mask.png] "question"`: submit one job and
print the answer as it streams (SSE). A dropped connection is resumed from the last event id.
Needs only httpx (no torch).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

IMAGE_EXT = {".png", ".jpg", ".jpeg"}


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="ask a spatial question about regions of a video/image; streams the answer")
    p.add_argument("file", type=Path, help="video (mp4/webm/...) or image (png/jpg)")
    p.add_argument("question", help='e.g. "How far is <region0> from <region1>?"')
    p.add_argument("--region", action="append", default=[], metavar="FRAME:x0,y0,x1,y1",
                   help="a box region (repeat for <region1>, ...)")
    p.add_argument("--mask", action="append", default=[], metavar="FRAME:file.png", help="a mask region (PNG)")
    p.add_argument("--url", default=os.environ.get("SR3D_URL", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", default=os.environ.get("SR3D_API_KEY"))
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--retries", type=int, default=5, help="reconnects after a dropped stream")
    p.set_defaults(func=main)


def parse_box(spec: str) -> dict[str, Any]:
    try:
        frame, coords = spec.split(":", 1)
        box = [float(v) for v in coords.split(",")]
        if len(box) != 4:
            raise ValueError
        return {"frame": int(frame), "box": box}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--region {spec!r}: expected FRAME:x0,y0,x1,y1") from None


def parse_mask(spec: str, index: int) -> tuple[dict[str, Any], str, Path]:
    frame, _, path = spec.partition(":")
    if not path or not frame.isdigit():
        raise argparse.ArgumentTypeError(f"--mask {spec!r}: expected FRAME:file.png")
    part = f"mask{index}"
    return {"frame": int(frame), "mask": part}, part, Path(path)


def main(args: argparse.Namespace) -> int:
    import httpx

    from service.sse_client import iter_events

    headers = {"Accept": "text/event-stream", "Idempotency-Key": uuid.uuid4().hex}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    try:
        regions: list[dict[str, Any]] = [parse_box(r) for r in args.region]
        masks = [parse_mask(m, i) for i, m in enumerate(args.mask)]
    except argparse.ArgumentTypeError as e:
        print(f"sr3d ask: {e}", file=sys.stderr)
        return 2
    regions += [m[0] for m in masks]
    kind = "image" if args.file.suffix.lower() in IMAGE_EXT else "video"
    options = {"max_tokens": args.max_tokens} if args.max_tokens else {}
    data = {"question": args.question, "regions": json.dumps(regions), "options": json.dumps(options)}
    base = args.url.rstrip("/")
    last_id: str | None = None
    job_id: str | None = None
    with httpx.Client(timeout=httpx.Timeout(30, read=120)) as client:
        for attempt in range(args.retries + 1):
            try:
                if job_id is None:
                    files = {kind: (args.file.name, args.file.read_bytes())}
                    files.update({part: (path.name, path.read_bytes()) for _, part, path in masks})
                    # Same Idempotency-Key on a retry: a POST that got through is not queued twice.
                    ctx = client.stream("POST", f"{base}/v1/spatial-qa", headers=headers, data=data, files=files)
                else:
                    resume = {**headers, **({"Last-Event-ID": last_id} if last_id else {})}
                    ctx = client.stream("GET", f"{base}/v1/spatial-qa/{job_id}/events", headers=resume)
                with ctx as r:
                    if r.status_code >= 400:
                        r.read()
                        err = r.json().get("error", {}) if "json" in r.headers.get("content-type", "") else {}
                        print(f"sr3d ask: HTTP {r.status_code} {err.get('code', '')}: {err.get('message', r.text)}",
                              file=sys.stderr)
                        if r.status_code in (429, 503) and attempt < args.retries:
                            time.sleep(float(r.headers.get("retry-after", "1")))
                            continue
                        return 1
                    if job_id is None and "location" in r.headers:
                        job_id = r.headers["location"].rsplit("/", 1)[1]
                    for ev in iter_events(r):
                        last_id = ev.id or last_id
                        payload = json.loads(ev.data)
                        kind_ = ev.event
                        if kind_ == "token":
                            print(payload.get("text", ""), end="", flush=True)
                        elif kind_ == "done":
                            print(flush=True)
                            return 0
                        elif kind_ == "error":
                            print(f"\nsr3d ask: job failed: {payload.get('code')}: {payload.get('message')}", file=sys.stderr)
                            return 1
            except (httpx.TransportError, httpx.RemoteProtocolError) as e:
                print(f"\nsr3d ask: connection lost ({type(e).__name__}); resuming", file=sys.stderr)
                time.sleep(min(2**attempt * 0.2, 5))
        print("sr3d ask: gave up after retries", file=sys.stderr)
        return 1
