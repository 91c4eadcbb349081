"""Prometheus metrics of the gateway and the worker.

Names are the contract with `deploy/grafana` and `deploy/prometheus`; the deploy checks scrape a
running instance and fail if a dashboard or alert uses a name that is not exported here.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

# Gateway
REQUESTS = Counter("sr3d_http_requests_total", "HTTP requests by route and status", ["route", "method", "status"])
REQUEST_LATENCY = Histogram("sr3d_http_request_duration_seconds", "HTTP request latency (until headers)", ["route"], buckets=_LATENCY)
JOBS_SUBMITTED = Counter("sr3d_jobs_submitted_total", "Jobs accepted into the queue")
JOBS_REJECTED = Counter("sr3d_jobs_rejected_total", "Submissions rejected before queueing", ["reason"])

# sr3d_jobs_rejected_total is counted in one place, so that each refusal is counted once: the API's
# error handlers (service/api/errors.py, and the OpenAI-compatible routes' wrapper) count every error
# response of a route that submits a job, whatever raised it (400/422 validation, 401, 413, 415, 429
# rate limit, queue or quota, 503). The one exception answers before the app runs: the body-size
# middleware's refusal of a declared Content-Length over the cap, which it counts itself.
SUBMIT_ROUTES = frozenset({("POST", "/v1/spatial-qa"), ("POST", "/v1/chat/completions")})


def count_refusal(method: str, path: str, code: str, status: int) -> None:
    """Count a refused submission (reason = its error code)."""
    if (method, path) in SUBMIT_ROUTES and status >= 400:
        JOBS_REJECTED.labels(reason=code).inc()
SSE_CLIENTS = Gauge("sr3d_sse_clients", "Open event streams on this gateway (SSE, and ?wait=true while it waits)")

# Queue (set by whoever samples it: gateway and worker both)
QUEUE_LENGTH = Gauge("sr3d_queue_length", "Entries in the jobs stream not yet delivered to a worker (consumer-group lag)")
QUEUE_PENDING = Gauge("sr3d_queue_pending", "Jobs delivered to a worker and not yet acknowledged")
QUEUE_WAIT = Histogram("sr3d_queue_wait_seconds", "Time from submit to a worker picking the job up", buckets=_LATENCY)
DLQ_LENGTH = Gauge("sr3d_dlq_length", "Entries in the dead-letter stream")
REDELIVERIES = Counter("sr3d_job_redeliveries_total", "Jobs reclaimed from a dead or stalled worker")
DEAD_LETTERED = Counter("sr3d_jobs_dead_lettered_total", "Jobs moved to the dead-letter stream")

# Worker
JOBS_FINISHED = Counter("sr3d_jobs_finished_total", "Jobs that reached a terminal state", ["status"])
STAGE_SECONDS = Histogram("sr3d_stage_duration_seconds", "Time per job stage", ["stage"], buckets=_LATENCY)
JOB_SECONDS = Histogram("sr3d_job_duration_seconds", "Submit to done, end to end", buckets=_LATENCY)
TTFT = Histogram("sr3d_time_to_first_token_seconds", "Submit to first answer token", buckets=_LATENCY)
ITL = Histogram("sr3d_inter_token_latency_seconds", "Time between streamed token deltas", buckets=_ITL)
PROMPT_TOKENS = Counter("sr3d_prompt_tokens_total", "Prompt tokens (text + visual + region)")
GENERATION_TOKENS = Counter("sr3d_generation_tokens_total", "Generated tokens")
BATCH_SIZE = Histogram("sr3d_engine_batch_size", "Requests per engine step or batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
ENGINE_ERRORS = Counter("sr3d_engine_errors_total", "Engine failures while generating")
INFLIGHT = Gauge("sr3d_worker_inflight_jobs", "Jobs this worker is running now")
WORKER_READY = Gauge("sr3d_worker_ready", "1 once the model is loaded and a warm-up generation passed")
POINTMAP_CACHE = Counter("sr3d_pointmap_cache_total", "Point-map cache lookups", ["result"])
