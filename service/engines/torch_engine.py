"""TorchEngine: the embedded engine over the transformers reference model (CPU or one GPU).

Scheduling is static micro-batching, which is the simplest thing that keeps one device busy
without vLLM's paged KV cache:

* every `generate()` call starts `model.prepare(query)` at once in a small thread pool (tiling,
  prompt building — CPU work that must not run on the event loop nor wait for a running batch);
* a single batcher task takes prepared requests, waits `batch_window_s` for more (up to
  `max_batch`) and runs ONE `model.generate(batch, ...)` in a dedicated decode thread; requests
  arriving meanwhile form the next batch;
* the model's `on_delta` callback runs on the decode thread; it hands each delta to the owning
  request's asyncio.Queue through `loop.call_soon_threadsafe` and returns False once that request
  is aborted, which stops that row only.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.inputs import TokenDelta
from service import metrics
from service.build_once import build_once
from service.engines.protocol import EngineError, EngineRequest, warm_up
from service.errors import is_input_error
from service.logging import in_context

log = logging.getLogger(__name__)

_END = object()  # sentinel closing a request's queue


def _row_error(e: Exception) -> Exception:
    # The caller's input error (a coded ValueError) reaches the worker unchanged: it fails the job at
    # once with its code. Anything else is this engine's failure and is retried.
    return e if is_input_error(e) else EngineError(f"{type(e).__name__}: {e}")


def ensure_tiny_checkpoint(data_dir: str | os.PathLike[str]) -> Path:
    """The tiny random demo checkpoint, built once under DATA_DIR/tiny-model."""
    from model.checkpoint import build_tiny_checkpoint

    return build_once(Path(data_dir) / "tiny-model", build_tiny_checkpoint)


@dataclass
class _Request:
    request: EngineRequest
    queue: asyncio.Queue[Any]
    prepared: Any = None
    aborted: bool = False
    emitted: list[str] = field(default_factory=list)  # text already pushed (decode thread only)
    enqueued_at: float = field(default_factory=time.monotonic)


class TorchEngine:
    name = "torch"

    def __init__(
        self,
        model_path: str | None,
        *,
        data_dir: str = "./var",
        device: str = "auto",
        dtype: str = "auto",
        region_mode: str = "auto",
        max_batch: int = 8,
        batch_window_s: float = 0.01,
        prepare_workers: int = 2,
        warmup: bool = True,
    ) -> None:
        self.model_path = model_path
        self.data_dir = data_dir
        self.device = device
        self.dtype = dtype  # SR3D_MODEL_DTYPE: auto = float16 on a GPU (NVIDIA's), float32 on a CPU
        self.region_mode_setting = region_mode
        self.region_mode = ""  # resolved when the checkpoint is loaded
        self.max_batch = max(1, max_batch)
        self.batch_window_s = batch_window_s
        self.warmup = warmup
        self.model: Any = None
        self.ready = False
        self._prepare_pool = ThreadPoolExecutor(max_workers=max(1, prepare_workers), thread_name_prefix="sr3d-prepare")
        # One decode thread: the model is not re-entrant and a device runs one batch at a time.
        self._decode_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sr3d-decode")
        self._ready_q: asyncio.Queue[_Request] | None = None
        self._batcher: asyncio.Task[None] | None = None
        self._live: dict[str, _Request] = {}
        self._lock = threading.Lock()  # guards _Request.aborted between loop and decode thread

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        from model.checkpoint import load_model
        from model.device import resolve_device
        from model.dtype import resolve_model_dtype

        loop = asyncio.get_running_loop()
        path = self.model_path or str(await loop.run_in_executor(None, ensure_tiny_checkpoint, self.data_dir))
        device = str(resolve_device(self.device))
        dtype = resolve_model_dtype(self.dtype, device)
        t0 = time.perf_counter()
        self.model = await loop.run_in_executor(self._decode_pool, lambda: load_model(path, device=device, dtype=dtype,
                                                                                 region_mode=self.region_mode_setting))
        self.region_mode = self.model.region_mode
        log.info("engine loaded checkpoint", extra={"path": path, "device": device, "dtype": str(dtype),
                                                    "region_mode": self.region_mode, "seconds": time.perf_counter() - t0})
        self._ready_q = asyncio.Queue()
        self._batcher = asyncio.create_task(self._batch_loop(), name="sr3d-torch-batcher")
        if self.warmup:
            await warm_up(self)
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        if self._batcher is not None:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
            self._batcher = None
        for r in list(self._live.values()):
            r.aborted = True
            r.queue.put_nowait(EngineError("engine closed"))
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        self._decode_pool.shutdown(wait=True, cancel_futures=True)

    # ---- requests ----------------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        if self.model is None or self._ready_q is None:
            raise EngineError("engine not started")
        if request.request_id in self._live:
            raise ValueError(f"request id {request.request_id!r} is already running")
        r = _Request(request, asyncio.Queue())
        self._live[request.request_id] = r
        loop = asyncio.get_running_loop()
        try:
            # ModelInputError from prepare propagates unchanged: it is the caller's input.
            t0 = time.monotonic()
            r.prepared = await loop.run_in_executor(self._prepare_pool, in_context(self.model.prepare, request.query))
            t_prepared = time.monotonic()
            if r.aborted:
                yield TokenDelta("", [], finished=True, finish_reason="abort")
                return
            self._ready_q.put_nowait(r)
            first = True
            while True:
                item = await r.queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if first and item.token_ids:  # where the time to the first token went (the worker reports it)
                    first = False
                    prefill = time.monotonic() - t_prepared  # batch wait + vision + prefill
                    item = dataclasses.replace(item, parts={"prepare": round(t_prepared - t0, 4), "prefill": round(prefill, 4)})
                yield item
        finally:
            # Consumer stopped early (cancelled task, closed generator): stop the row too.
            r.aborted = True
            self._live.pop(request.request_id, None)

    async def abort(self, request_id: str) -> None:
        r = self._live.get(request_id)
        if r is not None:
            r.aborted = True

    # ---- batching ------------------------------------------------------------------------------
    async def _batch_loop(self) -> None:
        assert self._ready_q is not None
        loop = asyncio.get_running_loop()
        while True:
            first = await self._ready_q.get()
            batch = [first]
            deadline = loop.time() + self.batch_window_s
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    batch.append(self._ready_q.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._ready_q.get(), timeout))
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
            batch = [r for r in batch if not self._finish_if_aborted(r)]
            if not batch:
                continue
            await self._run_isolated(loop, batch)

    async def _run_isolated(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        """Run a batch; if it raises, run each of its rows alone, so one row's failure (e.g. its
        sampling params making torch.multinomial raise) fails that row only and its neighbours,
        possibly other tenants' jobs, still get their answers now instead of a retry later.
        A row that already streamed text cannot be rerun without repeating it: it fails with a
        retryable EngineError (the worker's redelivery skips what the client already has)."""
        metrics.BATCH_SIZE.observe(len(batch))
        try:
            results = await loop.run_in_executor(self._decode_pool, self._run_batch, loop, batch)
        except Exception as e:
            if len(batch) == 1:
                rid = batch[0].request.request_id  # the batch loop serves every job: name this row's
                log.warning("engine row %s failed: %s: %s", rid, type(e).__name__, e, extra={"job_id": rid})
                batch[0].queue.put_nowait(_row_error(e))
                return
            log.warning("engine batch of %d failed (%s: %s); rerunning its rows one by one", len(batch), type(e).__name__, e)
            for r in batch:
                if r.emitted:
                    r.queue.put_nowait(EngineError(f"batch failed after this row streamed: {type(e).__name__}: {e}"))
                elif not self._finish_if_aborted(r):
                    await self._run_isolated(loop, [r])
            return
        for r, res in zip(batch, results):
            self._finish(r, res)

    def _finish_if_aborted(self, r: _Request) -> bool:
        if r.aborted:
            r.queue.put_nowait(TokenDelta("", [], finished=True, finish_reason="abort"))
            r.queue.put_nowait(_END)
        return r.aborted

    def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> list[Any]:
        """Decode thread: one model.generate for the whole batch, deltas pushed as they come."""

        def on_delta(i: int, delta: TokenDelta) -> bool:
            r = batch[i]
            if delta.text or delta.token_ids:
                r.emitted.append(delta.text)
                # The final (finished) delta is rebuilt from the result in _finish, with usage.
                loop.call_soon_threadsafe(r.queue.put_nowait, TokenDelta(delta.text, list(delta.token_ids)))
            return not r.aborted

        return self.model.generate([r.prepared for r in batch], [r.request.params for r in batch], on_delta)

    def _finish(self, r: _Request, res: Any) -> None:
        streamed = "".join(r.emitted)
        # The result text is authoritative; if streaming held back a tail (e.g. a partial UTF-8
        # sequence at the end), it goes out with the final delta so the deltas always add up.
        tail = res.text[len(streamed):] if res.text.startswith(streamed) else ""
        metrics.PROMPT_TOKENS.inc(res.prompt_tokens)
        metrics.GENERATION_TOKENS.inc(res.completion_tokens)
        reason = "abort" if r.aborted and res.finish_reason not in ("stop", "length") else res.finish_reason
        r.queue.put_nowait(
            TokenDelta(tail, [], finished=True, finish_reason=reason, prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens)
        )
        r.queue.put_nowait(_END)
