"""`sr3d ask FILE --region FRAME:x0,y0,x1,y1 [--mask FRAME:mask.png] "question"`: submit one job and
print the answer as it streams (SSE). A dropped connection is resumed from the last event id.
The client is service/client.py (the load generator's too); needs only httpx (no torch).

Every failure ends in one line on stderr and a non-zero exit, never a traceback: a file that cannot
be read (2), a service that cannot be reached (1, the line names the URL), a refused request or a
failed job (1).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

from service.settings import ClientSettings

DEFAULT_URL = ClientSettings.model_fields["url"].default
# A refused connection is retried this many times, CONNECT_BACKOFF_S apart (a service that is just
# starting), then reported in one line naming the URL: about 1 s, not a dozen.
CONNECT_RETRIES = 2
CONNECT_BACKOFF_S = 0.5


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="ask a spatial question about regions of a video/image; streams the answer")
    p.add_argument("file", type=Path, help="video (mp4/webm/...) or image (png/jpg)")
    p.add_argument("question", help='e.g. "How far is <region0> from <region1>?"')
    p.add_argument("--region", action="append", default=[], metavar="FRAME:x0,y0,x1,y1",
                   help="a box region (repeat for <region1>, ...)")
    p.add_argument("--mask", action="append", default=[], metavar="FRAME:file.png", help="a mask region (PNG)")
    client = ClientSettings()  # SR3D_URL, SR3D_API_KEY
    p.add_argument("--url", default=client.url, metavar="URL",
                   help=f"base URL of the service (default: $SR3D_URL, else {DEFAULT_URL}, where `sr3d serve` listens)")
    p.add_argument("--api-key", default=client.api_key,
                   help="API key when the service sets SR3D_API_KEYS (default: $SR3D_API_KEY)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--scene", type=Path, default=None, metavar="SCENE.npz",
                   help="RGB-D depth (+ intrinsics, poses) for exact metric measurements; `sr3d rgbd-npz` makes one")
    p.add_argument("--answer-mode", choices=("model", "grounded", "measured"), default=None,
                   help="model: the language model alone; grounded: measured facts in its prompt; measured: the text "
                        "written from the measurements (default: the server's SR3D_ANSWER_MODE)")
    p.add_argument("--scale-hint", default=None, metavar="REGION:DIMENSION:METRES",
                   help="one known length that puts a relative scene into metres, e.g. 0:height:0.30")
    p.add_argument("--retries", type=int, default=5, help="submit attempts after a refused (429/503) or failed POST")
    p.add_argument("--resume-timeout", type=float, default=60.0,
                   help="seconds to keep resuming a dropped stream without receiving an event")
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


def parse_scale_hint(spec: str) -> dict[str, Any]:
    try:
        region, dimension, metres = spec.split(":")
        return {"region": int(region), "dimension": dimension, "metres": float(metres)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scale-hint {spec!r}: expected REGION:DIMENSION:METRES, "
                                         "e.g. 0:height:0.30") from None


def options_of(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.max_tokens:
        options["max_tokens"] = args.max_tokens
    if args.answer_mode:
        options["answer_mode"] = args.answer_mode
    if args.scale_hint:
        options["scale_hint"] = parse_scale_hint(args.scale_hint)
    return options


def main(args: argparse.Namespace) -> int:
    try:
        regions: list[dict[str, Any]] = [parse_box(r) for r in args.region]
        masks = [parse_mask(m, i) for i, m in enumerate(args.mask)]
        options = options_of(args)
    except argparse.ArgumentTypeError as e:
        print(f"sr3d ask: {e}", file=sys.stderr)
        return 2
    args.options = options
    for path in [args.file, *(m[2] for m in masks), *([args.scene] if args.scene else [])]:
        if not path.is_file():
            print(f"sr3d ask: {path}: no such file", file=sys.stderr)
            return 2
    try:
        return asyncio.run(ask(args, regions, masks))
    except OSError as e:  # unreadable file (permissions, a directory)
        print(f"sr3d ask: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsr3d ask: interrupted", file=sys.stderr)
        return 130


async def ask(args: argparse.Namespace, regions: list[dict[str, Any]], masks: list[tuple[dict[str, Any], str, Path]]) -> int:
    from service.client import RESUMABLE, JobRequest, Media, SR3DClient, StreamLost

    req = JobRequest(
        media=Media.from_path(args.file),
        question=args.question,
        regions=[[r] for r in regions + [m[0] for m in masks]],
        masks={part: path.read_bytes() for _, part, path in masks},
        options=args.options,
        scene=Media.from_path(args.scene, kind="scene") if args.scene else None,
        # Same key on every retry: a POST that got through is not queued twice.
        idempotency_key=uuid.uuid4().hex,
    )
    import httpx

    url = args.url
    connect_failures = 0
    async with SR3DClient(url, api_key=args.api_key, timeout=120) as client:
        for attempt in range(args.retries + 1):
            stream = client.events(req, resume_timeout_s=args.resume_timeout)
            try:
                async for ev in stream:
                    if ev.type == "token":
                        print(ev.data.get("text", ""), end="", flush=True)
                    elif ev.type == "done":
                        print(flush=True)
                        if ev.data.get("measurements"):
                            print(measurement_lines(ev.data["measurements"]), flush=True)
                        if ev.data.get("demo_model"):
                            print("sr3d ask: answered by the tiny random-weight demo model (SR3D_MODEL unset): "
                                  "not a meaningful answer", file=sys.stderr)
                        return 0
                    elif ev.type == "error":
                        print(f"\nsr3d ask: job failed: {ev.data.get('code')}: {ev.data.get('message')}", file=sys.stderr)
                        return 1
            except httpx.ConnectError as e:  # nothing listening there (or no route): say where we looked
                connect_failures += 1
                if connect_failures <= CONNECT_RETRIES:
                    await asyncio.sleep(CONNECT_BACKOFF_S)
                    continue
                print(f"sr3d ask: cannot connect to {url} ({_reason(e)}); is `sr3d serve` running there? "
                      "(set --url or SR3D_URL)", file=sys.stderr)
                return 1
            except RESUMABLE as e:  # the POST got no answer: send it again (same Idempotency-Key)
                print(f"sr3d ask: {url}: connection failed ({type(e).__name__}); retrying", file=sys.stderr)
                await asyncio.sleep(min(2**attempt * 0.2, 5))
                continue
            except StreamLost as e:
                print(f"\nsr3d ask: {url}: {e}", file=sys.stderr)
                return 1
            except (httpx.HTTPError, httpx.InvalidURL) as e:  # a malformed URL, a timeout, ...
                print(f"sr3d ask: {url}: {type(e).__name__}: {_reason(e)}", file=sys.stderr)
                return 1
            err = stream.submit_error.get("error", {}) if isinstance(stream.submit_error, dict) else {}
            print(f"sr3d ask: HTTP {stream.submit_status} {err.get('code', '')}: {err.get('message', stream.submit_error)}",
                  file=sys.stderr)
            if stream.submit_status in (429, 503) and attempt < args.retries:
                await asyncio.sleep(float(stream.submit_headers.get("retry-after", "1")))
                continue
            return 1
        print(f"sr3d ask: {url}: gave up after {args.retries + 1} attempts", file=sys.stderr)
        return 1


def _reason(e: Exception) -> str:
    """The innermost cause's message, on one line (httpx wraps the OS error)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return " ".join(str(e).split()) or type(e).__name__


def _length(v: dict[str, Any] | None) -> str:
    if v is None:
        return "-"
    return f"{v['value']:.3f} {v['unit']}" if v.get("unit") else f"{v['value']:.3f} (relative)"


def measurement_lines(m: dict[str, Any]) -> str:
    """The `done` event's measurements as a few lines under the answer (units and source stated)."""
    unit = "metres" if m.get("unit") == "m" else "relative units: no metric scale, compare ratios only"
    lines = [f"measured ({m['scale']}, {unit}; from {m['source']}):"]
    for r in m.get("regions", []):
        if not r["available"]:
            lines.append(f"  region {r['region']}: not measurable: {r['reason']}")
            continue
        lines.append(f"  region {r['region']}: width {_length(r['width'])}, height {_length(r['height'])}, "
                     f"depth {_length(r['depth'])} ({r['points_used']} points, frames {r['frames']})")
    for p in m.get("pairs", []):
        if not p["available"]:
            lines.append(f"  region {p['a']} to region {p['b']}: not measurable: {p['reason']}")
            continue
        d = p.get("direction") or {}
        lines.append(f"  region {p['a']} to region {p['b']}: centre {_length(p['center_distance'])}, closest "
                     f"{_length(p['closest_distance'])}; region {p['b']} is {d.get('left_right')}, "
                     f"{d.get('above_below')}, {d.get('front_behind')}, at {d.get('clock')} o'clock")
    return "\n".join(lines)
