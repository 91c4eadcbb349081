"""Every knob of the service, read from the environment (SR3D_* and REDIS_URL).

One `Settings` object is built at process start and passed down; nothing else reads os.environ.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_csv(value: object) -> object:
    # Env lists are written "a,b,c" by operators; JSON lists would be surprising in a shell.
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]


class VLLMSettings(BaseSettings):
    """SR3D_VLLM_* knobs of the vLLM engine (nested in Settings as `settings.vllm`)."""

    model_config = SettingsConfigDict(env_prefix="SR3D_VLLM_", extra="ignore", frozen=True)

    max_model_len: int = Field(8192, ge=256)
    # The worker's depth model shares the GPU: DA-V2-L on 128-frame batches needs ~16 GB, and 0.8 ran out
    # of memory on an H100 (loadtests/results/engine-h100, run 4).
    gpu_memory_utilization: float = Field(0.7, gt=0, le=1)
    enforce_eager: bool = False
    dtype: str = "auto"
    load_format: str = "auto"  # "dummy" = random weights (benchmarks)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int | None = None
    mm_processor_cache_gb: float = Field(4, ge=0)
    # Threads preparing SR-3D items (tiling 32 frames + point maps: ~0.4 s of one core per request) before
    # vLLM; 0 = one per CPU core. PIL resizes and torch ops release the GIL, so requests prepare in parallel.
    prepare_workers: int = Field(0, ge=0)
    enable_prefix_caching: bool = True
    seed: int = 0
    # Lossy lever (issue 15): "fp8" = vLLM's W8A8 fp8 with weights quantized at load (dynamic activation scales);
    # None = the checkpoint's dtype, the exact path. Its greedy-token agreement and logit error against bf16:
    # `python -m loadtests.quant_error` (loadtests/RESULTS.md, "Throughput (issue 15)").
    quantization: Literal["fp8"] | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SR3D_", extra="ignore", frozen=True)

    # --- model / worker -------------------------------------------------------------------------
    model: str | None = Field(None, description="checkpoint dir; unset = tiny demo checkpoint under data_dir")
    engine: Literal["torch", "vllm"] = "torch"
    depth_model: str | None = Field(None, description="Depth Anything V2 dir; unset = tiny random demo depth model")
    # Point-map backend per input (model/geometry/routes.py): auto = rgbd for a scene with poses,
    # pose_recovery for a scene with depth only, multiview for videos, single for images.
    pointmap_backend: Literal["auto", "multiview", "single", "rgbd", "pose_recovery"] = "auto"
    multiview_model: str | None = Field(None, description="Depth Anything 3 dir (config.json + model.safetensors); unset = tiny random demo DA3")
    # Metric route for plain videos and images (model/geometry/metric.py): the multiview / single point maps
    # scaled to metres by DA3's metric model. Unset = no metric route: those inputs stay relative (no demo
    # model stands in: a random model's metres are not metres).
    metric_model: str | None = Field(None, description="DA3 metric dir (DA3METRIC-LARGE layout); unset = relative scale for videos/images")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The VLM's compute dtype, both engines (model/dtype.py): auto = float16 on a GPU, what NVIDIA's NVILA
    # inference uses (VILA's builder and remote code), float32 on a CPU; bfloat16 = the weights' stored type.
    model_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    # How region questions reach the model (model/marks.py): `embedding` = SR-3D's trained region modules,
    # `marks` = regions drawn into the frames and named in words; `auto` picks by what the checkpoint has.
    region_mode: Literal["auto", "embedding", "marks"] = "auto"
    # How answers are written when the request does not say (README "Measured answers" says why grounded).
    answer_mode: Literal["model", "grounded", "measured"] = "grounded"
    worker_concurrency: int = Field(4, ge=1, le=256)
    # Unset = 9100 + the first GPU index in CUDA_VISIBLE_DEVICES (9100 without one), so one worker per GPU on
    # one host needs no hand-picked ports; 0 = any free port (logged, and in the worker's Redis registration).
    # The rule and why: service/worker_startup.py.
    worker_metrics_port: int | None = Field(None, ge=0, le=65535)
    # Read only to derive the worker's default metrics port (CUDA itself reads the variable, not us).
    cuda_visible_devices: str | None = Field(None, validation_alias=AliasChoices("CUDA_VISIBLE_DEVICES"))
    # Loopback by default: /metrics is not for the world. Container images set 0.0.0.0 (Dockerfile),
    # where the network namespace is the boundary and Prometheus/kubelet must reach it.
    worker_metrics_host: str = "127.0.0.1"
    worker_name: str | None = Field(None, description="stable consumer name (one live worker per name); unset = host-pid, see service.consumer_name")
    # Depth networks' speed levers (issue 15; errors vs the exact path: `python -m loadtests.depth_error`).
    # DA-V2 processor size: None = the checkpoint's (518); 392 is ~1.7x cheaper on the GPU, lossy.
    depth_input_size: int | None = Field(None, ge=14, le=2048)
    # DA3 long side in pixels (504 = the official default); lower is cheaper and lossy.
    multiview_process_res: int = Field(504, ge=14, le=2048)
    # Attention of DA-V2's DINOv2 backbone: sdpa (fused kernels, same maths) or eager (the reference).
    # The DA3 port always uses torch's scaled_dot_product_attention.
    depth_attention: Literal["sdpa", "eager"] = "sdpa"
    # torch.compile the depth networks (first batch of each new shape compiles: seconds to a minute).
    depth_compile: bool = False
    # PointMapBatcher caps: whole jobs per depth batch and frames per batch (a larger single job runs alone).
    depth_batch_jobs: int = Field(8, ge=1, le=256)
    depth_batch_frames: int = Field(128, ge=1)
    # Depth batches in flight at once on a GPU, each in its own thread and CUDA stream (exact: the same maths;
    # one batch's host copies overlap another's network). 1 = one batch at a time. H200: 4 gave 1.18x over 1.
    depth_streams: int = Field(4, ge=1, le=16)
    # Point maps of recent uploads, so a second question on a video skips decode and depth
    # (one 16-frame 640x360 clip is ~44 MB).
    pointmap_cache_mb: int = Field(256, ge=0)
    # The torch engine waits this long for concurrent requests to join one batch.
    torch_batch_window_ms: float = Field(10, ge=0, le=1000)
    drain_timeout_s: float = Field(60, ge=0, description="on SIGTERM, in-flight jobs get this long to finish")
    # Read from its own SR3D_VLLM_* variables when Settings is built.
    vllm: VLLMSettings = Field(default_factory=VLLMSettings)

    # --- storage ----------------------------------------------------------------------------------
    redis_url: str | None = Field(None, validation_alias=AliasChoices("REDIS_URL", "SR3D_REDIS_URL"))
    data_dir: Path = Path("./var")
    blob_store: Literal["redis", "dir"] = "redis"
    blob_dir: Path | None = Field(None, description="shared directory for SR3D_BLOB_STORE=dir; default data_dir/blobs")
    # Redis values of many MB stall the server; blobs are stored as chunks of this size.
    blob_chunk_bytes: int = Field(1 << 20, ge=4096)
    # Redis runs `maxmemory-policy noeviction` (an evicted job hash or stream would lose a job
    # silently; volatile-* cannot help, job keys carry TTLs too). So uploads stop at this fraction of
    # maxmemory with 503 upload_store_full, and queue/event writes keep the rest. Blobs are deleted
    # when their job is terminal. Production with large uploads: SR3D_BLOB_STORE=dir.
    blob_redis_high_water: float = Field(0.7, gt=0, le=1)
    redis_maxmemory_mb: int = Field(1024, ge=0, description="maxmemory of the embedded redis-server; 0 = unlimited")

    # --- caps (checked by the gateway before anything expensive) --------------------------------
    max_upload_mb: float = Field(64, gt=0)
    max_frames: int = Field(64, ge=1)
    num_frames: int = Field(32, ge=1, description="frames sampled per video by default (SR-3D's paper: 32)")
    max_regions: int = Field(8, ge=1)
    max_masks_per_region: int = Field(8, ge=1)
    max_tokens: int = Field(512, ge=1)
    default_max_tokens: int = Field(128, ge=1)
    max_question_chars: int = Field(2000, ge=1)
    queue_max: int = Field(256, ge=1)
    rate_limit_per_min: float = Field(0, ge=0, description="per API key (or client IP); 0 = off")
    rate_limit_burst: int = Field(0, ge=0, description="bucket size; 0 = same as the per-minute rate")

    # --- HTTP -------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: CsvList = Field(default_factory=list)
    cors_origins: CsvList = Field(default_factory=list)
    sse_ping_s: float = Field(15, gt=0)
    # Event streams (SSE + ?wait=true) per gateway process, all served by one blocking Redis
    # connection (service.stream_hub); beyond this a new stream gets 503 + Retry-After.
    sse_max_clients: int = Field(4096, ge=1)
    wait_timeout_s: float = Field(60, gt=0, description="?wait=true gives up with 202 after this long")
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 429 at the queue cap and 503")
    # Read timeouts (service.http_timeouts): a client trickling its request must not hold a
    # connection (and a spooled upload file) forever.
    http_header_timeout_s: float = Field(10, gt=0, description="a request head must be complete this long after the connection opened or the previous response ended")
    http_body_idle_s: float = Field(30, gt=0, description="longest wait for the next chunk of a request body (408 after)")
    http_body_timeout_s: float = Field(600, gt=0, description="a whole request body must arrive within this (64 MB at ~110 KB/s)")
    http_keepalive_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after this")
    trusted_proxies: CsvList = Field(default_factory=list, description="proxy addresses whose X-Forwarded-For is believed; empty = none")

    # --- queue behaviour --------------------------------------------------------------------------
    job_ttl_s: int = Field(3600, ge=1, description="job hash and events live this long after a terminal state (blobs are deleted at once)")
    job_max_age_s: int = Field(86400, ge=60, description="safety TTL on a job that never finishes")
    claim_idle_ms: int = Field(60000, ge=100, description="a pending job idle this long is reclaimed by another worker")
    heartbeat_s: float = Field(10, gt=0, description="workers refresh in-flight jobs this often (< claim_idle_ms)")
    max_deliveries: int = Field(3, ge=1, description="deliveries beyond this dead-letter the job")
    jobs_maxlen: int = Field(100000, ge=100, description="approximate MAXLEN of the jobs stream")

    # --- OpenAI-compatible API (service/api/openai.py) ----------------------------------------------
    served_model_name: str = Field("sr3d", min_length=1, description="the `model` id of /v1/models and /v1/chat/completions")
    files_ttl_s: int = Field(3600, ge=60, description="media uploaded through POST /v1/files lives this long")
    # Remote http(s) media URLs: off while empty. Exact host names (no wildcards); see service/media_fetch.py.
    remote_media_domains: CsvList = Field(default_factory=list)
    remote_media_timeout_s: float = Field(10, gt=0, le=120, description="DNS + connect + whole download")
    # UNSAFE: lets remote fetches reach private/loopback/link-local addresses (SSRF). Tests only.
    allow_private_fetch: bool = False

    # --- per-key quotas and request bounds (issue 30; README "Quotas") ----------------------------
    # "Per key" = per API key, or per client address when keys are off. 429 + Retry-After beyond.
    chat_body_max_mb: float = Field(16, gt=0, description="POST /v1/chat/completions body cap (413 beyond); larger media: POST /v1/files")
    max_head_kb: int = Field(64, ge=1, description="request line + headers, in KiB; the connection gets 431 and is closed beyond")
    quota_files: int = Field(32, ge=1, description="files stored through POST /v1/files per key")
    quota_stored_mb: float = Field(256, gt=0, description="MiB per key held in the blob store: its files + the uploads of its unfinished jobs")
    quota_jobs: int = Field(64, ge=1, description="jobs queued or running per key (a quarter of queue_max's default)")
    quota_streams: int = Field(1024, ge=1, description="event streams (SSE, ?wait=true, chat answers) per key, per gateway process (a quarter of sse_max_clients' default)")
    quota_uploads: int = Field(4, ge=1, description="request bodies being received at once per key, per gateway process")
    # A job's 3D scene (~1 MB) is only written below the store's high-water mark and lives this long
    # (not job_ttl_s): the page fetches it right after the answer, and 60 finished jobs' scenes kept
    # for an hour filled a 40 MB store (issue 30 item 1).
    scene_ttl_s: int = Field(900, ge=60, description="a finished job's 3D scene lives this long (<= job_ttl_s)")
    # With API keys on: whether these answer without a key on the gateway's port.
    metrics_public: bool = Field(False, description="/metrics without a key (keys on); scrape with a key otherwise")
    docs_public: bool = Field(True, description="/docs, /redoc and /openapi.json without a key (keys on)")

    log_level: str = "INFO"

    @field_validator("api_keys", "cors_origins", "trusted_proxies", "remote_media_domains", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @cached_property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @cached_property
    def chat_body_max_bytes(self) -> int:
        return int(self.chat_body_max_mb * 1024 * 1024)

    @cached_property
    def quota_stored_bytes(self) -> int:
        return int(self.quota_stored_mb * 1024 * 1024)

    @cached_property
    def resolved_blob_dir(self) -> Path:
        return self.blob_dir if self.blob_dir is not None else self.data_dir / "blobs"
