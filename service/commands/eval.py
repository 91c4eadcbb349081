"""`sr3d eval DATASET --format vsibench|spatialrgpt [--url URL | --in-process] [--out DIR] [--limit N]`:
score the served model on a benchmark's public release with the benchmark's own prompts, decoding
and metrics. Every item goes through the HTTP API; `--in-process` starts `sr3d serve` (embedded
Redis, in-process worker, SR3D_MODEL or the tiny demo model) on a free loopback port for the run,
so there is one serving path, not a second one for evaluation. Needs no torch in this process.

The project's own region-measurement set (`sr3d measure-set OUT`, synthetic scenes with exact depth)
is a `spatialrgpt` dataset with RGB-D scene files: `--answer-mode measured` asks for answers written
from the measurements, and `--no-scene` leaves the scene files out so the same questions go through
the depth-model routes (relative scale: lengths cannot be in metres there). The report records the
answer mode (asked for, and as the service reported it) and whether scenes were sent; a results
directory made with other settings is refused rather than mixed.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.settings import ClientSettings

if TYPE_CHECKING:  # imported lazily at run time: `sr3d eval --help` stays light
    from service.eval.datasets import EvalItem
    from service.eval.runner import RunSettings


_DEMO_NOTE = ("answered by the tiny random-weight demo model (SR3D_MODEL unset): these scores say nothing "
              "about SR-3D or any real checkpoint; they only show that the harness runs")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:  # a concurrency of 0 would wait forever
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score the served model on VSI-Bench / SpatialRGPT-Bench (resumable)")
    p.add_argument("dataset", type=Path, help="the benchmark's annotation file, or the directory holding it")
    p.add_argument("--format", required=True, choices=("vsibench", "spatialrgpt"), dest="fmt")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="a running service (default SR3D_URL, http://127.0.0.1:8000)")
    where.add_argument("--in-process", action="store_true", help="start `sr3d serve` on a free loopback port for this run")
    p.add_argument("--out", type=Path, default=Path("eval-out"), help="results.jsonl, report.json, report.png")
    p.add_argument("--limit", type=_positive, default=None, help="only the first N items (in file order)")
    p.add_argument("--media-root", type=Path, default=None,
                   help="where videos/images live (default: the annotation file's directory)")
    p.add_argument("--concurrency", type=_positive, default=4, help="requests in flight (the engine batches them)")
    p.add_argument("--num-frames", type=_positive, default=None, help="frames sampled per video (default: the server's)")
    p.add_argument("--max-tokens", type=_positive, default=None,
                   help="override the benchmark's max new tokens (16 / 128); the report records it")
    p.add_argument("--answer-mode", choices=("model", "grounded", "measured"), default=None,
                   help="the request's answer_mode option (default: the server's SR3D_ANSWER_MODE)")
    p.add_argument("--no-scene", action="store_true",
                   help="do not send the items' RGB-D scene files (measurement set): point maps come from the "
                        "depth-model routes instead of exact depth")
    p.add_argument("--api-key", default=ClientSettings().api_key, help="default SR3D_API_KEY")
    p.set_defaults(func=main)


def _settings_clash(rows: dict[str, dict[str, Any]], items: list[EvalItem], settings: RunSettings) -> str | None:
    """A results file made with another answer mode or scene setting: name the difference."""
    by_id = {it.id: it for it in items}
    for key, row in rows.items():
        if key not in by_id:
            continue
        asked = row.get("answer_mode_requested")
        if asked != settings.answer_mode:
            return f"answer mode {asked!r}, this run asks {settings.answer_mode!r}"
        if bool(row.get("scene_sent")) != settings.row_fields(by_id[key])["scene_sent"]:
            return "RGB-D scenes " + ("sent, this run has --no-scene" if row.get("scene_sent") else "not sent, this run sends them")
    return None


def main(args: argparse.Namespace) -> int:
    from service.eval import datasets, report, runner

    try:
        items = datasets.load(args.fmt, args.dataset, args.media_root)
    except (ValueError, KeyError, OSError) as e:  # DatasetError is a ValueError
        print(f"sr3d eval: {e}", file=sys.stderr)
        return 2
    if args.limit is not None:
        items = items[: args.limit]
    if args.max_tokens is not None:  # a deviation from the benchmark's decoding, kept visible in the report
        for it in items:
            it.max_tokens = args.max_tokens
    if not items:
        print("sr3d eval: no items", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    settings = runner.RunSettings(answer_mode=args.answer_mode, send_scene=not args.no_scene)
    previous = runner.load_results(args.out / runner.RESULTS)
    clash = _settings_clash(previous, items, settings)
    if clash:
        print(f"sr3d eval: {args.out / runner.RESULTS} was made with {clash}; use another --out", file=sys.stderr)
        return 2
    done_before = len(previous.keys() & {it.id for it in items})
    print(f"sr3d eval: {len(items)} items, {done_before} already in {args.out / runner.RESULTS}", flush=True)

    def progress(row: dict, n: int, total: int) -> None:
        status = f"error {row['error'].get('code', '')}" if row.get("error") else repr(row["prediction"][:40])
        print(f"[{n}/{total}] {row['id']} {row['category']}: {status}", flush=True)

    async def go(url: str) -> dict:
        return await runner.run_items(items, url, args.out, concurrency=args.concurrency, api_key=args.api_key,
                                      num_frames=args.num_frames, on_done=progress, settings=settings)

    if done_before == len(items):  # nothing left to ask: only re-score (no service needed)
        rows = runner.load_results(args.out / runner.RESULTS)
    elif args.in_process:
        from service.local_stack import serve_stack

        # The data dir (tiny checkpoint, embedded Redis) as `sr3d serve` would use it from here.
        from service.commands.config import settings_or_exit
        from service.settings import Settings

        served = settings_or_exit(Settings, "eval")  # what the `sr3d serve` child will read, refused here first
        data_dir = served.data_dir.resolve()
        with tempfile.TemporaryDirectory(prefix="sr3d-eval-serve-") as logs:
            # An eval needs no 3D-viewer scenes, and each job's (~1 MB) stays scene_ttl_s in the embedded
            # Redis: at the 900 s default a few hundred fast jobs push the store to its high-water mark
            # and uploads get 503 upload_store_full. The shortest TTL allowed, unless the caller set one.
            scene_ttl_s = served.scene_ttl_s if "scene_ttl_s" in served.model_fields_set else 60
            env = {"SR3D_DATA_DIR": str(data_dir), "SR3D_SCENE_TTL_S": str(scene_ttl_s)}
            with serve_stack(Path(logs), env) as (_, url):
                rows = asyncio.run(go(url))
    else:
        rows = asyncio.run(go(args.url or ClientSettings().url))

    wanted = {it.id for it in items}
    rows = {k: v for k, v in rows.items() if k in wanted}
    missing = len(wanted) - len(rows)
    rep = report.score(args.fmt, rows)
    rep.update(dataset=str(args.dataset), items=len(items), unfinished=missing,
               max_new_tokens=items[0].max_tokens, num_frames=args.num_frames,
               **_run_facts(items, rows, settings))
    paths = report.write(rep, args.out, f"sr3d eval {args.fmt}: {args.dataset.name} ({len(rows)} items)")
    print(report.text_table(rep))
    if rep.get("demo_model"):
        print(f"sr3d eval: {_DEMO_NOTE}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths))
    if missing:
        print(f"sr3d eval: {missing} items unfinished (transient errors); run the same command again to resume",
              file=sys.stderr)
        return 1
    return 0


def _run_facts(items: list[EvalItem], rows: dict[str, dict[str, Any]], settings: RunSettings) -> dict[str, Any]:
    """What the run asked for and what the service said it did: answer mode (requested; per the
    `done` events), scenes (items that have one; rows that sent one), measurement scale per row."""
    from collections import Counter

    with_scene = sum(1 for it in items if it.scene is not None)
    answered = [r for r in rows.values() if not r.get("error")]
    demo_rows = sum(1 for r in answered if r.get("demo_model"))
    return {
        # Which model answered, as the service's `done` events said: the tiny random-weight demo
        # checkpoint (SR3D_MODEL unset) makes every score meaningless, so the report says so.
        "demo_model": demo_rows > 0,
        "demo_model_rows": demo_rows,
        "region_mode": dict(Counter(str(r.get("region_mode")) for r in answered)),
        **({"demo_model_note": _DEMO_NOTE} if demo_rows else {}),
        "answer_mode_requested": settings.answer_mode,
        "answer_mode": dict(Counter(str(r.get("answer_mode")) for r in rows.values())),
        "scenes_sent": sum(1 for r in rows.values() if r.get("scene_sent")),
        "items_with_scene": with_scene,
        "no_scene": not settings.send_scene,
        "measure_scale": dict(Counter(str(r.get("measure_scale")) for r in rows.values())),
        **({"relative_scale_note": _RELATIVE_NOTE} if any(r.get("measure_scale") == "relative" for r in rows.values())
           else {}),
    }


_RELATIVE_NOTE = ("some answers came from relative-scale point maps (no metric depth): their lengths are in "
                  "relative units, which the judge reads as metres, so length successes and errors on those "
                  "rows say nothing about metric accuracy; comparisons and directions are still meaningful")
