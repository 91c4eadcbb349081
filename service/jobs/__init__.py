"""A job's life in Redis, one protocol for the gateway and the workers.

  keys (service/keys.py)   sr3d:jobs + group sr3d-workers (the work queue), sr3d:job:{id} (the record),
                           sr3d:job:{id}:events (the event log), sr3d:job:{id}:scene, sr3d:dlq, sr3d:idem:{hash}
  store.py       Jobs: the entry point (submit, get, cancel, claim)
  records.py     the record: created with its `queued` event, queue entry and Idempotency-Key; start; progress
  view.py        record <-> JobView, and `final_state`: the one mapping from a terminal event to job state
  events.py      the event log: typed events, append, read, range, terminal lookup
  terminal.py    the one writer of a job's end: terminal event + final state + TTLs + ack, atomically
  work_queue.py  claim, reclaim, heartbeat, ack, dead letter
  scenes.py      the job's 3D scene for the page
  handle.py      JobHandle: one delivery as its worker drives it

The path of a job: `Jobs.submit` (record + `queued` + queue entry + key, one script) -> a worker's
`Jobs.claim` -> `JobHandle.start` (compare-and-set; a job whose log already ends is not run again)
-> `progress` / `tokens` -> `done` | `fail` | `cancelled` (one script: event, state, TTLs, ack).
Delivery is at-least-once; the terminal event and the ack are written together, so a redelivered
job finds its outcome and is not rerun, and a client never sees two terminal events.
"""
from service.jobs.events import Event, EventLog, event_from_entry
from service.jobs.handle import JobHandle
from service.jobs.records import IdempotencyKeyReused
from service.jobs.store import Jobs
from service.jobs.terminal import CANCELLED, Finished
from service.jobs.work_queue import Delivery, QueueFull

__all__ = ["CANCELLED", "Delivery", "Event", "EventLog", "Finished", "IdempotencyKeyReused", "JobHandle", "Jobs",
           "QueueFull", "event_from_entry"]
