"""VLLMEngine: SR-3D on vLLM 0.24's AsyncLLM (continuous batching, paged KV, prefix + encoder caches).

Per request: the model core validates the query and lays out the prompt (`build_prompt`: visual prefix first,
so prefix caching shares the KV of the `<image>` block across questions on the same media); the SR-3D item
is prepared (tiling, point-map pooling, mask coverage: `processing.prepare_item`) in this engine's own thread
pool, so concurrent requests prepare in parallel, and vLLM's single renderer thread only wraps the compact
arrays; an item vLLM's processor cache already holds is sent as a header (no pixel work); AsyncLLM streams
`RequestOutputKind.DELTA` outputs, which become TokenDeltas. `abort()` aborts the vLLM request; its stream
ends with finish_reason "abort".

`multi_modal_uuids` = media_key + a digest of the regions and their slot order: a second question on the
same video with the same regions skips hashing and reuses the processor cache, the encoder cache and the
prefix cache; different regions on the same media get a different uuid (their embeddings differ).

Knobs: SR3D_MODEL (flat dir, or an NVILA-layout dir converted once to DATA_DIR/vllm-flat/<digest>; unset =
the tiny demo checkpoint) and SR3D_VLLM_* (`VLLMSettings` in service/settings.py). Selected with SR3D_ENGINE=vllm.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from model.checkpoint import check_servable
from model.config import SR3DConfig, config_from_dict
from model.dtype import resolve_model_dtype
from model.errors import ModelInputError
from model.inputs import GenerationParams, SpatialQuery, TokenDelta
from model.marks import resolve_region_mode
from model.prompt import stop_token_ids
from service import metrics
from service.build_once import build_once
from service.engines.protocol import EngineError, EngineRequest, warm_up
from service.logging import in_context
from service.settings import EngineSettings

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ checkpoint
def resolve_flat_checkpoint(model: str | None, data_dir: str | os.PathLike[str]) -> Path:
    """A directory vLLM loads directly. NVILA-layout (or unset -> tiny demo) checkpoints are converted once,
    under an flock, into DATA_DIR/vllm-flat/<digest of the source path and config>."""
    from model.checkpoint import convert_to_flat

    if model is None:
        from service.engines.torch_engine import ensure_tiny_checkpoint

        src = ensure_tiny_checkpoint(data_dir)
    else:
        src = Path(model)
    cfg = json.loads((src / "config.json").read_text())
    if "SR3DForConditionalGeneration" in (cfg.get("architectures") or []) and not (src / "llm").is_dir():
        return src  # already flat
    digest = hashlib.sha256(f"{src.resolve()}\n{(src / 'config.json').stat().st_mtime_ns}".encode()).hexdigest()[:16]
    dst = Path(data_dir) / "vllm-flat" / digest

    def convert(tmp: Path) -> None:
        convert_to_flat(src, tmp)
        log.info("converted checkpoint to the flat vLLM layout", extra={"src": str(src), "dst": str(dst)})

    build_once(dst, convert)
    return dst


def region_digest(query: SpatialQuery, region_order: list[int]) -> str:
    """What besides the media determines the item's embeddings: masks, their frames, slot order, 3D or 2D."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps([region_order, query.is_video, query.pointmaps is not None]).encode())
    for k, masks in enumerate(query.regions):
        for m in masks:
            h.update(f"{k}:{m.frame}:{m.mask.shape}".encode())
            h.update(m.mask.astype(bool).tobytes())
    return h.hexdigest()


def first_token_parts(t0: float, prepared: float, rendered: float, stats: Any, now: float) -> dict[str, float]:
    """Where a request's time to first token went (all CLOCK_MONOTONIC, which the engine-core process shares):
    prepare (our item preparation, pool wait included), render (vLLM's processor), submit (to the engine core's
    queue: serialisation and IPC of the item), wait (queued until first scheduled), prefill (vision encoder +
    prefill, interleaved with other requests' steps), deliver (output back to this process). vLLM's engine-core
    timestamps need stats logging (on, `disable_log_stats=False`); without them only prepare and render."""
    parts = {"prepare": prepared - t0, "render": rendered - prepared}
    queued, scheduled, first = (float(getattr(stats, k, 0.0) or 0.0) for k in ("queued_ts", "scheduled_ts", "first_token_ts"))
    if 0.0 < queued <= scheduled <= first:
        parts.update(submit=queued - rendered, wait=scheduled - queued, prefill=first - scheduled, deliver=now - first)
    return {k: round(max(0.0, v), 4) for k, v in parts.items()}


# ------------------------------------------------------------------------------ engine
class VLLMEngine:
    name = "vllm"

    def __init__(self, settings: EngineSettings, *, engine_args: dict[str, Any] | None = None, warmup: bool = True) -> None:
        self.settings = settings
        self.vllm_settings = settings.vllm
        self.region_mode_setting = settings.region_mode
        self.region_mode = ""  # resolved from the checkpoint at start
        self.extra_args = dict(engine_args or {})
        self.warmup = warmup
        self.llm: Any = None
        self.config: SR3DConfig | None = None
        self.tokenizer: Any = None
        self.model_dir: Path | None = None
        self.ready = False
        self._stop_ids: list[int] = []
        self._live: set[str] = set()
        self._aborted: set[str] = set()
        workers = self.vllm_settings.prepare_workers or os.cpu_count() or 4
        self._prepare_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sr3d-prepare")

    def engine_args(self, model_dir: Path) -> dict[str, Any]:
        v = self.vllm_settings
        args: dict[str, Any] = dict(
            model=str(model_dir),
            tokenizer=str(model_dir),
            max_model_len=v.max_model_len,
            gpu_memory_utilization=v.gpu_memory_utilization,
            enforce_eager=v.enforce_eager,
            # SR3D_VLLM_DTYPE=auto defers to SR3D_MODEL_DTYPE (auto = float16, NVIDIA's NVILA inference dtype;
            # vLLM's own "auto" would take the stored bfloat16). Anything else is passed to vLLM as given.
            dtype=v.dtype if v.dtype != "auto" else str(resolve_model_dtype(self.settings.model_dtype, "cuda")).removeprefix("torch."),
            load_format=v.load_format,
            max_num_seqs=v.max_num_seqs,
            limit_mm_per_prompt={"image": 1},
            mm_processor_cache_gb=v.mm_processor_cache_gb,
            enable_prefix_caching=v.enable_prefix_caching,
            seed=v.seed,
            disable_log_stats=False,
        )
        if v.max_num_batched_tokens:
            args["max_num_batched_tokens"] = v.max_num_batched_tokens
        if v.quantization:
            args["quantization"] = v.quantization
        args.update(self.extra_args)
        return args

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        loop = asyncio.get_running_loop()
        model_dir = await loop.run_in_executor(None, resolve_flat_checkpoint, self.settings.model, self.settings.data_dir)
        self.model_dir = model_dir
        self.config = config_from_dict(json.loads((model_dir / "config.json").read_text()))
        check_servable(self.config, model_dir)  # a flat dir given directly skipped the conversion's check
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self._stop_ids = stop_token_ids(self.tokenizer)
        self.region_mode = resolve_region_mode(self.region_mode_setting, bool(self.config.region_cfg.get("trained")))
        log.info("region mode", extra={"region_mode": self.region_mode})
        args = AsyncEngineArgs(**self.engine_args(model_dir))
        t0 = time.perf_counter()
        # Engine start spawns the engine-core process and compiles; keep the event loop (health checks) alive.
        self.llm = await loop.run_in_executor(None, lambda: AsyncLLM.from_engine_args(args))
        log.info("vLLM engine started", extra={"path": str(model_dir), "seconds": round(time.perf_counter() - t0, 1)})
        if self.warmup:
            await warm_up(self)
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        for rid in list(self._live):
            await self.abort(rid)
        if self.llm is not None:
            llm, self.llm = self.llm, None
            await asyncio.get_running_loop().run_in_executor(None, llm.shutdown)
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    # ---- requests
    def build_inputs(
        self, query: SpatialQuery, max_tokens: int = 0, is_cached: Callable[[str], bool] | None = None
    ) -> tuple[dict[str, Any], int]:
        """-> (vLLM token prompt with multi_modal_data/uuids, expanded prompt length). Checks every cap
        (context included) first, then prepares the item (the CPU-heavy part; run it in `_prepare_pool`),
        unless `is_cached(uuid)` says vLLM's processor cache holds it: then only its header is sent."""
        from model.prompt import layout_query
        from model.vllm_plugin.processing import header_item, prepare_item

        cfg = self.config
        assert cfg is not None
        # The uuid names what determines the item's embeddings: the media, the regions and how they are fed.
        original = query
        query, layout = layout_query(query, self.tokenizer, cfg, self.vllm_settings.max_model_len,
                                     reserve=max_tokens, region_mode=self.region_mode)
        digest = region_digest(original, layout.region_order if self.region_mode == "embedding" else [-1])
        uuid = f"{query.media_key}/{digest}" if query.media_key else None
        cached = uuid is not None and is_cached is not None and is_cached(uuid)
        item = (header_item if cached else prepare_item)(query, layout.region_order, cfg)
        prompt: dict[str, Any] = {"prompt_token_ids": layout.input_ids, "multi_modal_data": {"image": item}}
        if uuid is not None:
            prompt["multi_modal_uuids"] = {"image": [uuid]}
        return prompt, layout.num_tokens

    def _is_cached(self, uuid: str) -> bool:
        # A read of vLLM's processor-cache index (no eviction-order update); a stale answer is caught below.
        cache = self.llm.renderer.mm_processor_cache if self.llm is not None else None
        return bool(cache is not None and cache.is_cached([uuid])[0])

    def sampling_params(self, params: GenerationParams) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        return SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            ignore_eos=params.ignore_eos,
            stop_token_ids=[] if params.ignore_eos else self._stop_ids,
            skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        if self.llm is None:
            raise EngineError("engine not started")
        rid = request.request_id
        if rid in self._live:
            raise ValueError(f"request id {rid!r} is already running")
        self._live.add(rid)
        try:
            from model.vllm_plugin.processing import ItemNotPrepared

            loop = asyncio.get_running_loop()
            is_cached: Callable[[str], bool] | None = self._is_cached
            t0 = time.monotonic()
            while True:
                prompt, num_tokens = await loop.run_in_executor(
                    self._prepare_pool, in_context(self.build_inputs, request.query, request.params.max_tokens, is_cached)
                )
                t_prepared = time.monotonic()
                if rid in self._aborted:
                    break
                try:
                    (engine_input,) = await self.llm.renderer.render_cmpl_async([prompt])
                    t_rendered = time.monotonic()
                    break
                except ItemNotPrepared:
                    if is_cached is None:
                        raise
                    is_cached = None  # evicted between the check and the render: prepare it this time
                except ModelInputError:
                    raise
                except ValueError as e:  # the processor's own checks (e.g. prompt/item mismatch)
                    raise ModelInputError("bad_request", str(e)) from e
            if rid in self._aborted:
                yield TokenDelta("", [], finished=True, finish_reason="abort")
                return
            completion = 0
            prompt_tokens = num_tokens
            async for out in self.llm.generate(engine_input, self.sampling_params(request.params), rid):
                c = out.outputs[0]
                parts = None
                if completion == 0 and c.token_ids:  # the first token
                    parts = first_token_parts(t0, t_prepared, t_rendered, out.metrics, time.monotonic())
                completion += len(c.token_ids)
                prompt_tokens = len(out.prompt_token_ids or []) or prompt_tokens
                if out.finished:
                    reason = c.finish_reason if c.finish_reason in ("stop", "length", "abort") else "stop"
                    if rid in self._aborted and reason != "length":
                        reason = "abort"
                    metrics.PROMPT_TOKENS.inc(prompt_tokens)
                    metrics.GENERATION_TOKENS.inc(completion)
                    yield TokenDelta(
                        c.text, list(c.token_ids), finished=True, finish_reason=reason,
                        prompt_tokens=prompt_tokens, completion_tokens=completion, parts=parts,
                    )
                    return
                if c.text or c.token_ids:
                    yield TokenDelta(c.text, list(c.token_ids), parts=parts)
        except (ModelInputError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            raise EngineError(f"{type(e).__name__}: {e}") from e
        finally:
            self._live.discard(rid)
            self._aborted.discard(rid)

    async def abort(self, request_id: str) -> None:
        if request_id not in self._live:
            return
        self._aborted.add(request_id)
        if self.llm is not None:
            with contextlib.suppress(Exception):
                await self.llm.abort(request_id)
