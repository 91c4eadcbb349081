"""Send benchmark items through the service's HTTP API and keep one result line per finished item.

The client is service/client.py's `SR3DClient` (the same one `sr3d ask`, the load generator and the
tests use): multipart upload, SSE, resume of a dropped stream. Decoding is the benchmark's: greedy
(temperature 0, top_p 1) and the item's `max_tokens` (VSI-Bench 16, SpatialRGPT-Bench 128).

Results file (`results.jsonl`): one JSON object per finished item, appended with a single
`write()` on an O_APPEND descriptor and fsync'd before the next item is reported, so a killed run
leaves whole lines plus at most one torn last line; a resumed run drops the torn line and skips
every id already present. Items that hit a transient failure (connection lost for good, 429/5xx
on submit) are not written, so the next run retries them; items the service rejected (4xx) or
whose job failed are written with `error` set and score 0, as an unanswered question does.

`RunSettings` are what a run sends besides the item: `answer_mode` (the request option; None = the
server's default) and whether an item's RGB-D `scene` file goes with it (`--no-scene` sends the same
item without it, so the point maps come from the depth-model routes). Every row records both, and
the answer mode the service says it used, so a results file never silently mixes settings.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.client import JobRequest, Media, SR3DClient
from service.eval.datasets import EvalItem

log = logging.getLogger(__name__)
RESULTS = "results.jsonl"
TRANSIENT_RETRIES = 4  # per item and run; what still fails is left for the next run


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    """Finished items by id; a torn last line (the run was killed mid-write) is cut off the file."""
    if not path.exists():
        return {}
    done: dict[str, dict[str, Any]] = {}
    good_bytes = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw)
            except ValueError:
                break
            if not raw.endswith(b"\n"):
                break
            done[str(row["id"])] = row
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        os.truncate(path, good_bytes)
    return done


class ResultsWriter:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, row: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(row, ensure_ascii=False) + "\n").encode())
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def run_id(out_dir: Path) -> str:
    """A random id kept in out_dir for the life of the run (resumes reuse it)."""
    path = out_dir / ".run_id"
    if not path.exists():
        path.write_text(uuid.uuid4().hex)
    return path.read_text().strip()


@dataclass(frozen=True)
class RunSettings:
    answer_mode: str | None = None  # "model" | "grounded" | "measured"; None = the server's setting
    send_scene: bool = True  # send an item's RGB-D scene file when it has one

    def row_fields(self, item: EvalItem) -> dict[str, Any]:
        return {"answer_mode_requested": self.answer_mode, "scene_sent": self.send_scene and item.scene is not None}


def _request(item: EvalItem, num_frames: int | None, run: str, settings: RunSettings = RunSettings()) -> JobRequest:
    options: dict[str, Any] = {"max_tokens": item.max_tokens, "temperature": 0.0, "top_p": 1.0}
    if num_frames:
        options["num_frames"] = num_frames
    if settings.answer_mode:
        options["answer_mode"] = settings.answer_mode
    scene = None
    if settings.send_scene and item.scene is not None:
        scene = Media("scene", item.scene.name, item.scene.read_bytes(), "application/octet-stream")
    # Keyed by run and item: a resumed run picks up a job its predecessor queued before dying,
    # and a new run (another checkpoint behind the same Redis) never gets an old run's answer.
    return JobRequest(Media.from_path(item.media), item.question, item.regions, item.masks, options,
                      idempotency_key=f"sr3d-eval-{run}-{item.id}", scene=scene)


def _row(item: EvalItem, prediction: str, **extra: Any) -> dict[str, Any]:
    row = {"id": item.id, "category": item.category, "question": item.question, "ground_truth": item.ground_truth,
           "prediction": prediction}
    if item.qa_type:
        row.update(qa_type=item.qa_type, judge_question=item.judge_question)
    if item.benchmark:
        row["benchmark"] = item.benchmark
    return {**row, **extra}


async def _one(client: SR3DClient, item: EvalItem, num_frames: int | None, run: str,
               settings: RunSettings = RunSettings()) -> dict[str, Any] | None:
    row = await _ask(client, item, num_frames, run, settings)
    return None if row is None else {**row, **settings.row_fields(item)}


async def _ask(client: SR3DClient, item: EvalItem, num_frames: int | None, run: str,
               settings: RunSettings) -> dict[str, Any] | None:
    if not item.media.exists():
        return _row(item, "", error={"code": "media_missing", "message": f"{item.media} not found"})
    if settings.send_scene and item.scene is not None and not item.scene.exists():
        return _row(item, "", error={"code": "scene_missing", "message": f"{item.scene} not found"})
    for attempt in range(TRANSIENT_RETRIES + 1):
        res = await client.run(_request(item, num_frames, run, settings))
        if res.terminal is not None or (res.http_status is not None and 400 <= res.http_status < 500
                                        and res.http_status != 429):
            break
        await asyncio.sleep(min(2.0**attempt, 10.0))  # queue full (429), 5xx, connection refused
    if res.http_status is not None and 400 <= res.http_status < 500 and res.http_status != 429:
        body = res.error_body.get("error", {}) if isinstance(res.error_body, dict) else {"message": str(res.error_body)}
        return _row(item, "", error=body)
    end = res.terminal
    if end is None:  # transient (gave up resuming, 429, 5xx): retried by the next run; say why
        if res.http_status in (200, 201, 202):
            why = "accepted, but the event stream ended without a terminal event"
        else:
            why = f"submit answered HTTP {res.http_status} {res.error_body}" if res.http_status else "no connection"
        log.warning("item %s left for the next run after %d tries: %s", item.id, TRANSIENT_RETRIES + 1, why)
        return None
    if end.type == "error":
        return _row(item, "", error=end.data if isinstance(end.data, dict) else {"message": str(end.data)})
    data = end.data if isinstance(end.data, dict) else {}
    extra: dict[str, Any] = {}
    if data.get("demo_model"):  # the tiny random-weight demo checkpoint answered: the report must say so
        extra["demo_model"] = True
    if data.get("region_mode") is not None:
        extra["region_mode"] = data["region_mode"]
    if data.get("answer_mode") is not None:  # what the service says wrote the text
        extra["answer_mode"] = data["answer_mode"]
    if data.get("measurements") is not None:  # scale (metric / relative) and source, for the report
        m = data["measurements"]
        extra["measure_scale"] = m.get("scale") if isinstance(m, dict) else None
        extra["measure_source"] = m.get("source") if isinstance(m, dict) else None
    return _row(item, str(data.get("answer", res.answer_from_tokens)).strip(),
                finish_reason=data.get("finish_reason"), usage=data.get("usage"), **extra)


async def run_items(items: list[EvalItem], url: str, out_dir: Path, *, concurrency: int = 4,
                    api_key: str | None = None, num_frames: int | None = None,
                    on_done: Callable[[dict[str, Any], int, int], None] | None = None,
                    settings: RunSettings = RunSettings()) -> dict[str, dict[str, Any]]:
    """Run every item not already in out_dir/results.jsonl; return all finished rows by id."""
    path = out_dir / RESULTS
    done = load_results(path)
    todo = [it for it in items if it.id not in done]
    writer = ResultsWriter(path)
    run = run_id(out_dir)
    sem = asyncio.Semaphore(concurrency)
    total = len(items)

    async def worker(client: SR3DClient, item: EvalItem) -> None:
        async with sem:
            row = await _one(client, item, num_frames, run, settings)
        if row is not None:
            writer.append(row)
            done[item.id] = row
            if on_done is not None:
                on_done(row, len(done), total)

    try:
        async with SR3DClient(url, api_key=api_key, timeout=600.0) as client:
            await asyncio.gather(*(worker(client, it) for it in todo))
    finally:
        writer.close()
    return done
