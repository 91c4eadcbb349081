"""The HTTP gateway, in FastAPI's "bigger applications" layout:

  app.py         create_app: wiring only
  deps.py        state (Redis, queue, blobs, limiter), API keys, rate limit, job ownership
  middleware.py  body-size cap while streaming, request metrics
  upload.py      multipart parsing, type sniffing (cheap checks before anything is stored)
  submission.py  check_fields / store_and_submit / wait_for_terminal: for every router that queues jobs
  jobs.py        /v1/spatial-qa routes
  ops.py         /healthz /readyz /metrics
  errors.py      error code -> HTTP status (the one table) and the exception handlers

No PyAV, no tensors here: the worker probes media and reports media errors as `error` events.
"""
