"""A job's public event log: `keys.events_key(job_id)`, a Redis stream of {type, data (JSON)} that is
the client's single source of truth (SSE replays it with each entry id as the event id).

Event types and their data (the SSE `event:` field and its JSON):
  queued   {job_id, position}               the gateway, at submit (position: jobs waiting ahead)
  progress {stage, seconds, ...}            the worker, per stage: "started", "decode", "pointmaps",
                                            "measure", "encode" (also kept in the job's `progress` for GET);
                                            {stage: "restream", discard: true} = drop the tokens so far
  token    {text}                           the worker: one delta of the answer
  done     {job_id, answer, usage, timings, finish_reason, region_mode, answer_mode, measurements}
  error    {job_id, code, message, ...}     also cancellation (code "cancelled", with the partial answer)
`done` and `error` are terminal: exactly one per job, always the last event, written only by
`service.jobs.terminal` together with the job record's final state.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis

from service.keys import events_key
from service.schemas import TERMINAL_EVENTS

EventType = Literal["queued", "progress", "token", "done", "error"]

ENTRY_ID = re.compile(r"^\d+-\d+$")


@dataclass
class Event:
    id: str  # Redis entry id in the job's events stream (the SSE `id:`); "" for an event the gateway made up
    type: str  # an EventType
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


def event_from_entry(entry_id: str, fields: dict[str, str]) -> Event:
    """One stream entry (as XRANGE / XREAD return it) as an Event."""
    data = fields.get("data")
    return Event(id=entry_id, type=fields.get("type", ""), data=json.loads(data) if data else {})


def entry_fields(type_: str, data: dict[str, Any]) -> dict[str, str]:
    """An event as the fields of its stream entry."""
    return {"type": type_, "data": json.dumps(data)}


class EventLog:
    """Reads every job's events and appends the non-terminal ones (terminal events: `TerminalWriter`)."""

    def __init__(self, redis: aioredis.Redis, blocking: aioredis.Redis) -> None:
        """`blocking`: a client without a socket timeout, for XREAD BLOCK."""
        self.redis = redis
        self._blocking = blocking

    async def append(self, job_id: str, type_: EventType, data: dict[str, Any]) -> str:
        """XADD one `queued`/`progress`/`token` event; returns its entry id."""
        if type_ in TERMINAL_EVENTS:
            raise ValueError(f"a terminal {type_!r} event is written by the terminal writer, with the job's final state")
        return await self.redis.xadd(events_key(job_id), entry_fields(type_, data))

    async def read(self, job_id: str, after: str = "0-0", block_ms: int = 15000, count: int = 100) -> list[Event]:
        """Events after entry id `after` (exclusive), waiting up to block_ms for the first one
        (block_ms <= 0: do not wait). Empty list on timeout."""
        if not ENTRY_ID.match(after):
            raise ValueError(f"invalid event id {after!r}")
        res = await self._blocking.xread({events_key(job_id): after}, count=count,
                                         block=block_ms if block_ms > 0 else None)
        return [event_from_entry(eid, fields) for _, entries in (res or []) for eid, fields in entries if fields]

    async def range(self, job_id: str) -> list[Event]:
        """All events of a job so far (tests, debugging)."""
        return [event_from_entry(eid, f) for eid, f in await self.redis.xrange(events_key(job_id))]

    async def terminal(self, job_id: str) -> Event | None:
        """The job's terminal `done`/`error` event if one was written (it is always the last)."""
        last = await self.redis.xrevrange(events_key(job_id), count=1)
        if not last:
            return None
        event = event_from_entry(*last[0])
        return event if event.terminal else None

    async def text_streamed(self, job_id: str, page: int = 1000) -> str:
        """Token text already in the job's log (an earlier attempt's), minus what a `restream` discarded."""
        parts: list[str] = []
        after = "0-0"
        while True:
            events = await self.read(job_id, after=after, block_ms=0, count=page)
            for e in events:
                if e.type == "token":
                    parts.append(e.data.get("text", ""))
                elif e.type == "progress" and e.data.get("stage") == "restream":
                    parts.clear()
            if len(events) < page:
                return "".join(parts)
            after = events[-1].id
