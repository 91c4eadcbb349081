"""The job record (`keys.job_key(job_id)`, a hash) and what GET /v1/spatial-qa/{id} shows of it, and
the one mapping from a terminal event to the record's final state.

Hash fields: spec (JobSpec JSON), status, created_at, started_at, finished_at, consumer, attempts,
cancel ("1" once requested), idem (the Idempotency-Key's Redis key), progress, and once terminal
answer, finish_reason, region_mode, answer_mode, measurements, error, usage, timings (JSON where
structured).

`final_state(event)` is the only place that turns a terminal event into job state: the terminal
writer stores what it says next to the event (same script), and a record left unfinished beside its
event (written by an older version, which wrote the two apart) is repaired with it. Every reader
(GET, `?wait=true`, cancel's answer, the OpenAI routes) reads the record.
"""
from __future__ import annotations

import json
from typing import Any

from service.jobs.events import Event
from service.schemas import ErrorInfo, JobSpec, JobStatus, JobView, Usage

# Terminal-event fields copied into the record as they are (JSON-encoded when structured).
_COPIED = ("answer", "finish_reason", "region_mode", "answer_mode", "usage", "timings", "measurements")
_JSON = {"usage", "timings", "measurements", "error"}


def final_state(event: Event) -> dict[str, Any]:
    """The record fields a terminal event sets: `done` -> status done; `error` -> status cancelled
    (code "cancelled") or failed, with {code, message}; both carry over whichever of answer (a
    cancelled job's partial answer), finish_reason, region_mode, answer_mode, usage, timings and
    measurements they have."""
    if not event.terminal:
        raise ValueError(f"{event.type!r} is not a terminal event")
    data = event.data
    state: dict[str, Any] = {k: data[k] for k in _COPIED if data.get(k) is not None}
    if event.type == "done":
        state["status"] = JobStatus.done.value
    else:
        state["status"] = (JobStatus.cancelled if data.get("code") == "cancelled" else JobStatus.failed).value
        state["error"] = {"code": str(data.get("code")), "message": str(data.get("message"))}
    return state


def encode(fields: dict[str, Any]) -> dict[str, str]:
    """Record fields as hash values."""
    return {k: json.dumps(v) if k in _JSON else str(v) for k, v in fields.items()}


def _loads(value: str | None) -> Any:
    return json.loads(value) if value else None


def spec_or_none(raw: str | None) -> JobSpec | None:
    """The stored spec; None when absent or unreadable (an older gateway's, a hand-edited hash)."""
    if not raw:
        return None
    try:
        return JobSpec.model_validate_json(raw)
    except ValueError:  # pydantic's ValidationError is a ValueError
        return None


def view_of(job_id: str, h: dict[str, str]) -> JobView | None:
    """The record as GET shows it; None for a missing (expired) or half-written hash."""
    return view_and_spec(job_id, h)[0]


def view_and_spec(job_id: str, h: dict[str, str]) -> tuple[JobView | None, JobSpec | None]:
    """`view_of` and the job's spec (None when unreadable), the spec parsed once for both; (None, None)
    for a missing or half-written hash."""
    if not h or "status" not in h:
        return None, None
    spec = spec_or_none(h.get("spec"))
    return JobView(
        job_id=job_id,
        id=job_id,
        status=JobStatus(h["status"]),
        question=spec.question if spec else None,
        media_kind=spec.media_kind if spec else None,
        answer=h.get("answer"),
        finish_reason=h.get("finish_reason"),
        region_mode=h.get("region_mode"),
        answer_mode=h.get("answer_mode"),
        measurements=_loads(h.get("measurements")),
        error=ErrorInfo(**_loads(h["error"])) if h.get("error") else None,
        usage=Usage(**_loads(h["usage"])) if h.get("usage") else None,
        timings=_loads(h.get("timings")) or {},
        progress=_loads(h.get("progress")) or {},
        created_at=float(h.get("created_at", 0)),
        started_at=float(h["started_at"]) if h.get("started_at") else None,
        finished_at=float(h["finished_at"]) if h.get("finished_at") else None,
        attempts=int(h.get("attempts", 0)),
        cancel_requested=h.get("cancel") == "1",
    ), spec
