"""Every Redis key name the service uses, in one place (deploy/ and KEDA read `sr3d:jobs` and the group).

  sr3d:jobs                 stream of {job_id}; consumer group sr3d-workers
  sr3d:job:{id}             hash: the job's spec and state (service/jobs/view.py)
  sr3d:job:{id}:events      stream of {type, data(JSON)}: the client's single source of truth (service/jobs/events.py)
  sr3d:job:{id}:scene       bytes: the job's compact 3D scene for the page (service/jobs/scenes.py)
  sr3d:dlq                  stream of dead-lettered jobs {job_id, entry_id, deliveries, reason, at, spec}
  sr3d:idem:{hash}          {"job_id", "request"}: an Idempotency-Key's job and the hash of the request it
                            was first sent with, scoped by API key (it expires with the job)
  sr3d:rl:{key id}          token bucket of one API key (service.ratelimit)
  sr3d:blob:{blob key}      an upload, as a list of chunks (service.blobs)
  sr3d:file:{file id}       hash: owner and type of media uploaded through POST /v1/files
  sr3d:tenant:{bucket}:held / :bytes   what one API key holds against its quotas (service.quotas)
  sr3d:worker:{consumer}    hash: a live worker's metrics address, GPU and state (service.worker_registry)

Blob keys (`{job_id}/media`, `{job_id}/mask/{part}`, `{job_id}/scene`) are built here too, so the
gateway that stores them and the tools that inspect them agree.
"""
from __future__ import annotations

import hashlib

JOBS = "sr3d:jobs"
GROUP = "sr3d-workers"
DLQ = "sr3d:dlq"
# Sorted sets of job hash keys scored by the job's max-age deadline, kept by the job scripts (records.py,
# terminal.py): jobs queued or running (the queue cap), and those not started yet (a new job's position).
OUTSTANDING = "sr3d:jobs:outstanding"
WAITING = "sr3d:jobs:waiting"
BLOB_PREFIX = "sr3d:blob:"


def job_key(job_id: str) -> str:
    return f"sr3d:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"sr3d:job:{job_id}:events"


def job_of_events_key(key: str) -> str:
    """The job id in an events_key (as an XREAD reply names the stream)."""
    prefix, suffix = job_key(""), events_key("")[len(job_key("")):]
    if not (key.startswith(prefix) and key.endswith(suffix)):
        raise ValueError(f"{key!r} is not a job's events key")
    return key[len(prefix):-len(suffix)]


def scene_key(job_id: str) -> str:
    """The job's compact 3D scene for the page (bytes; expires with the job)."""
    return f"sr3d:job:{job_id}:scene"


def idem_key(idempotency_key: str, api_key_id: str | None) -> str:
    # Hashed: bounded key length, and one tenant's key can never name another tenant's job.
    digest = hashlib.sha256(f"{api_key_id or ''}\n{idempotency_key}".encode()).hexdigest()[:40]
    return f"sr3d:idem:{digest}"


def rate_key(bucket: str) -> str:
    return f"sr3d:rl:{bucket}"


def media_blob(job_id: str) -> str:
    return f"{job_id}/media"


def mask_blob(job_id: str, part: str) -> str:
    return f"{job_id}/mask/{part}"


def scene_blob(job_id: str) -> str:
    return f"{job_id}/scene"


def file_key(file_id: str) -> str:
    return f"sr3d:file:{file_id}"


def file_blob(file_id: str) -> str:
    return f"files/{file_id}"


def tenant_held_key(bucket: str) -> str:
    """Sorted set: what one API key (rate bucket) holds against its quotas (service.quotas)."""
    return f"sr3d:tenant:{bucket}:held"


def tenant_bytes_key(bucket: str) -> str:
    """Hash: bytes of each entry of tenant_held_key."""
    return f"sr3d:tenant:{bucket}:bytes"


def worker_key(consumer: str) -> str:
    return f"sr3d:worker:{consumer}"
