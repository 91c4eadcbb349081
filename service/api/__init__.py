"""The HTTP gateway, in FastAPI's "bigger applications" layout:

  app.py         create_app: wiring only
  deps.py        state (Redis, jobs, blobs, limiter), API keys, rate limit, job ownership
  middleware.py  body-size cap while streaming, request metrics
  upload.py      multipart parsing, type sniffing (cheap checks before anything is stored)
  submission.py  check_fields / store_and_submit / wait_for_terminal: for every router that queues jobs
  jobs.py        /v1/spatial-qa routes
  ops.py         /healthz /readyz /metrics
  errors.py      error code -> HTTP status (the one table) and the exception handlers
  openai.py      /v1/models, /v1/chat/completions, /v1/files (OpenAI-compatible; errors in OpenAI's shape)
  openai_schemas.py, openai_media.py   its wire shapes; its media URLs (data:, sr3d-media://, remote) and file store

Adding a router (e.g. an OpenAI-compatible one): an APIRouter in its own module whose routes depend
on `deps.rate_limited` (or `authenticate`) and `deps.state`, build a `submission.Submission` from their
wire format (file objects may be io.BytesIO), call `check_fields` and `store_and_submit`, then
`wait_for_terminal` or `service.sse.sse_response(jobs, service.sse.subscribe(gw.hub, job_id))` (every
stream reads through the process's one StreamHub); raise ApiError(code, message) and list any new code's
status in errors.py; one `include_router` line in app.py.

No PyAV, no tensors here: the worker probes media and reports media errors as `error` events.
"""
