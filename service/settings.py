"""Every knob of the service, read from the environment (SR3D_* and REDIS_URL), grouped by role.

A process builds the settings of its own role and validates nothing else, so a typo in a worker-only
variable cannot stop a gateway and the other way round:

    sr3d gateway          GatewaySettings = StoreSettings + the HTTP front (caps, quotas, streams, OpenAI)
    sr3d worker           WorkerSettings  = StoreSettings + EngineSettings + GeometrySettings + worker knobs
    sr3d serve, tools     Settings        = all of them (one process runs both)
    sr3d ask, sr3d eval   ClientSettings  (where the service is, the key to send)

StoreSettings is what both sides of the queue must agree on: Redis and the blob store, job lifetimes
and queue timing, and the request defaults the worker applies again. Field names are flat
(`settings.max_upload_mb`, not `settings.gateway.max_upload_mb`), so code that takes a role reads
the same as code that takes everything. Roles are built with `load`, which names a refused variable.

Nothing else in service/ or model/ reads the environment (tests/test_settings_by_role.py checks).
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CsvList = Annotated[list[str], NoDecode]
# Engine and geometry both place their networks with it: one variable, declared in both roles.
Device = Literal["auto", "cpu", "cuda"]
S = TypeVar("S", bound=BaseSettings)


class _Env(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SR3D_", extra="ignore", frozen=True)


class CommonSettings(_Env):
    """Every server process: where its files go and how much it logs."""

    data_dir: Path = Path("./var")
    log_level: str = "INFO"


class StoreSettings(CommonSettings):
    """Both sides of the queue (gateway and worker) read these and must agree on them."""

    # --- storage ----------------------------------------------------------------------------------
    redis_url: str | None = Field(None, validation_alias=AliasChoices("REDIS_URL", "SR3D_REDIS_URL"))
    blob_store: Literal["redis", "dir"] = "redis"
    blob_dir: Path | None = Field(None, description="shared directory for SR3D_BLOB_STORE=dir; default data_dir/blobs")
    # Redis values of many MB stall the server; blobs are stored as chunks of this size.
    blob_chunk_bytes: int = Field(1 << 20, ge=4096)
    # Redis runs `maxmemory-policy noeviction` (an evicted job hash or stream would lose a job
    # silently; volatile-* cannot help, job keys carry TTLs too). So uploads stop at this fraction of
    # maxmemory with 503 upload_store_full, and queue/event writes keep the rest. Blobs are deleted
    # when their job is terminal. Production with large uploads: SR3D_BLOB_STORE=dir.
    blob_redis_high_water: float = Field(0.7, gt=0, le=1)

    # --- job lifetimes and queue timing (the job store, built by both processes) --------------------
    job_ttl_s: int = Field(3600, ge=1, description="job hash and events live this long after a terminal state (blobs are deleted at once)")
    job_max_age_s: int = Field(86400, ge=60, description="safety TTL on a job that never finishes")
    # A job's 3D scene (~1 MB) is only written below the store's high-water mark and lives this long
    # (not job_ttl_s): the page fetches it right after the answer, while an hour of finished jobs'
    # scenes would crowd uploads out of a small store.
    scene_ttl_s: int = Field(900, ge=60, description="a finished job's 3D scene lives this long (<= job_ttl_s)")
    jobs_maxlen: int = Field(100000, ge=100, description="approximate MAXLEN of the jobs stream")
    queue_max: int = Field(256, ge=1)
    claim_idle_ms: int = Field(60000, ge=100, description="a pending job idle this long is reclaimed by another worker")
    max_deliveries: int = Field(3, ge=1, description="deliveries beyond this dead-letter the job")
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 429 at the queue cap and 503")

    # --- request caps and defaults: the gateway checks them, the worker fills a job's defaults ------
    max_upload_mb: float = Field(64, gt=0)
    max_frames: int = Field(64, ge=1)
    num_frames: int = Field(32, ge=1, description="frames sampled per video by default (SR-3D's paper: 32)")
    max_tokens: int = Field(512, ge=1)
    default_max_tokens: int = Field(128, ge=1)
    # How answers are written when the request does not say (README "Measured answers" says why grounded).
    answer_mode: Literal["model", "grounded", "measured"] = "grounded"

    @cached_property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @cached_property
    def resolved_blob_dir(self) -> Path:
        return self.blob_dir if self.blob_dir is not None else self.data_dir / "blobs"


class GatewaySettings(StoreSettings):
    """The HTTP front: where it listens, who may call it, and how much each caller may ask for."""

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
    # Read timeouts (service.http_timeouts): a client trickling its request must not hold a
    # connection (and a spooled upload file) forever.
    http_header_timeout_s: float = Field(10, gt=0, description="a request head must be complete this long after the connection opened or the previous response ended")
    http_body_idle_s: float = Field(30, gt=0, description="longest wait for the next chunk of a request body (408 after)")
    http_body_timeout_s: float = Field(600, gt=0, description="a whole request body must arrive within this (64 MB at ~110 KB/s)")
    http_keepalive_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after this")
    trusted_proxies: CsvList = Field(default_factory=list, description="proxy addresses whose X-Forwarded-For is believed; empty = none")
    max_head_kb: int = Field(64, ge=1, description="request line + headers, in KiB; the connection gets 431 and is closed beyond")
    # With API keys on: whether these answer without a key on the gateway's port.
    metrics_public: bool = Field(False, description="/metrics without a key (keys on); scrape with a key otherwise")
    docs_public: bool = Field(True, description="/docs, /redoc and /openapi.json without a key (keys on)")
    # The embedded redis-server (REDIS_URL unset) is started by the gateway, or by `sr3d serve`.
    redis_maxmemory_mb: int = Field(1024, ge=0, description="maxmemory of the embedded redis-server; 0 = unlimited")

    # --- request shape (checked before anything expensive) ------------------------------------------
    max_regions: int = Field(8, ge=1)
    max_masks_per_region: int = Field(8, ge=1)
    max_question_chars: int = Field(2000, ge=1)

    # --- OpenAI-compatible API (service/api/openai.py) ----------------------------------------------
    served_model_name: str = Field("sr3d", min_length=1, description="the `model` id of /v1/models and /v1/chat/completions")
    files_ttl_s: int = Field(3600, ge=60, description="media uploaded through POST /v1/files lives this long")
    chat_body_max_mb: float = Field(16, gt=0, description="POST /v1/chat/completions body cap (413 beyond); larger media: POST /v1/files")
    # Remote http(s) media URLs: off while empty. Exact host names (no wildcards); see service/media_fetch.py.
    remote_media_domains: CsvList = Field(default_factory=list)
    remote_media_timeout_s: float = Field(10, gt=0, le=120, description="DNS + connect + whole download")
    # UNSAFE: lets remote fetches reach private/loopback/link-local addresses (SSRF). Tests only.
    allow_private_fetch: bool = False

    # --- per-key rate limit and quotas (README "Quotas") ---------------------------------------------
    # "Per key" = per API key, or per client address when keys are off. 429 + Retry-After beyond.
    rate_limit_per_min: float = Field(0, ge=0, description="per API key (or client IP); 0 = off")
    rate_limit_burst: int = Field(0, ge=0, description="bucket size; 0 = same as the per-minute rate")
    quota_files: int = Field(32, ge=1, description="files stored through POST /v1/files per key")
    quota_stored_mb: float = Field(256, gt=0, description="MiB per key held in the blob store: its files + the uploads of its unfinished jobs")
    quota_jobs: int = Field(64, ge=1, description="jobs queued or running per key (a quarter of queue_max's default)")
    quota_streams: int = Field(1024, ge=1, description="event streams (SSE, ?wait=true, chat answers) per key, per gateway process (a quarter of sse_max_clients' default)")
    quota_uploads: int = Field(4, ge=1, description="request bodies being received at once per key, per gateway process")
    quota_upload_mib_s: float = Field(32, ge=0, description="request-body MiB per second per key, per gateway process, after a burst of one second's worth; a key's bodies past it are read more slowly (TCP pushes back), other keys' not at all; 0 = unpaced")

    @field_validator("api_keys", "cors_origins", "trusted_proxies", "remote_media_domains", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        # Env lists are written "a,b,c" by operators; JSON lists would be surprising in a shell.
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @cached_property
    def chat_body_max_bytes(self) -> int:
        return int(self.chat_body_max_mb * 1024 * 1024)

    @cached_property
    def quota_stored_bytes(self) -> int:
        return int(self.quota_stored_mb * 1024 * 1024)


class VLLMSettings(_Env):
    """SR3D_VLLM_* knobs of the vLLM engine (nested in EngineSettings as `settings.vllm`)."""

    model_config = SettingsConfigDict(env_prefix="SR3D_VLLM_", extra="ignore", frozen=True)

    max_model_len: int = Field(8192, ge=256)
    # The worker's depth model shares the GPU: DA-V2-L on 128-frame batches needs ~16 GB, which 0.8
    # does not leave on an 80 GB card.
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
    # A lossy speed lever: "fp8" = vLLM's W8A8 fp8 with weights quantized at load (dynamic activation
    # scales); None = the checkpoint's dtype, the exact path. The benchmarks' quant_error measures its
    # greedy-token agreement and logit error against bf16.
    quantization: Literal["fp8"] | None = None


class EngineSettings(CommonSettings):
    """The language model: which checkpoint, which engine, in what precision."""

    model: str | None = Field(None, description="checkpoint dir; unset = tiny demo checkpoint under data_dir")
    engine: Literal["torch", "vllm"] = "torch"
    device: Device = "auto"
    # The VLM's compute dtype, both engines (model/dtype.py): auto = float16 on a GPU, what NVIDIA's NVILA
    # inference uses (VILA's builder and remote code), float32 on a CPU; bfloat16 = the weights' stored type.
    model_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    # How region questions reach the model (model/marks.py): `embedding` = SR-3D's trained region modules,
    # `marks` = regions drawn into the frames and named in words; `auto` picks by what the checkpoint has.
    region_mode: Literal["auto", "embedding", "marks"] = "auto"
    # The torch engine waits this long for concurrent requests to join one batch.
    torch_batch_window_ms: float = Field(10, ge=0, le=1000)
    # Read from its own SR3D_VLLM_* variables when the settings are built.
    vllm: VLLMSettings = Field(default_factory=VLLMSettings)


class GeometrySettings(CommonSettings):
    """The point maps: which depth networks, how they are batched on the GPU, and their cache."""

    device: Device = "auto"
    depth_model: str | None = Field(None, description="Depth Anything V2 dir; unset = tiny random demo depth model")
    multiview_model: str | None = Field(None, description="Depth Anything 3 dir (config.json + model.safetensors); unset = tiny random demo DA3")
    # Metric route for plain videos and images (model/geometry/metric.py): the multiview / single point maps
    # scaled to metres by DA3's metric model. Unset = no metric route: those inputs stay relative (no demo
    # model stands in: a random model's metres are not metres).
    metric_model: str | None = Field(None, description="DA3 metric dir (DA3METRIC-LARGE layout); unset = relative scale for videos/images")
    # Point-map backend per input (model/geometry/routes.py): auto = rgbd for a scene with poses,
    # pose_recovery for a scene with depth only, multiview for videos, single for images.
    pointmap_backend: Literal["auto", "multiview", "single", "rgbd", "pose_recovery"] = "auto"
    # Speed levers of the depth networks; the lossy ones are off by default (the benchmarks'
    # depth_error measures by how much they move the points).
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
    # Depth batches in flight at once on a GPU, each in its own thread and CUDA stream (exact: the same
    # maths). One batch's host copies and CPU work overlap another's network, which one batch at a time
    # leaves idle; each extra batch holds its own activations, so fewer where vLLM leaves less room.
    depth_streams: int = Field(4, ge=1, le=16)
    # Point maps of recent uploads, so a second question on a video skips decode and depth
    # (one 16-frame 640x360 clip is ~44 MB).
    pointmap_cache_mb: int = Field(256, ge=0)


class WorkerSettings(StoreSettings, EngineSettings, GeometrySettings):
    """A GPU worker: the job store, the engine and the point maps, and how the worker itself runs."""

    worker_concurrency: int = Field(4, ge=1, le=256)
    heartbeat_s: float = Field(10, gt=0, description="workers refresh in-flight jobs this often (< claim_idle_ms)")
    drain_timeout_s: float = Field(60, ge=0, description="on SIGTERM, in-flight jobs get this long to finish")
    worker_name: str | None = Field(None, description="stable consumer name (one live worker per name); unset = host-pid, see service.consumer_name")
    # Unset = 9100 + the first GPU index in CUDA_VISIBLE_DEVICES (9100 without one), so one worker per GPU on
    # one host needs no hand-picked ports; 0 = any free port (logged, and in the worker's Redis registration).
    # The rule and why: service/worker_startup.py.
    worker_metrics_port: int | None = Field(None, ge=0, le=65535)
    # Loopback by default: /metrics is not for the world. Container images set 0.0.0.0 (Dockerfile),
    # where the network namespace is the boundary and Prometheus/kubelet must reach it.
    worker_metrics_host: str = "127.0.0.1"
    # Read only to derive the worker's default metrics port (CUDA itself reads the variable, not us).
    cuda_visible_devices: str | None = Field(None, validation_alias=AliasChoices("CUDA_VISIBLE_DEVICES"))


class Settings(GatewaySettings, WorkerSettings):
    """Every role at once: `sr3d serve` (gateway and worker in one process), tools and tests."""


class ClientSettings(_Env):
    """The command-line clients (`sr3d ask`, `sr3d eval`): which service they talk to, and as whom."""

    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None


# Role name -> the class that declares its variables (README "Configuration" has one table per role).
ROLES: dict[str, type[BaseSettings]] = {
    "common": CommonSettings,
    "store": StoreSettings,
    "gateway": GatewaySettings,
    "worker": WorkerSettings,
    "engine": EngineSettings,
    "vllm": VLLMSettings,
    "geometry": GeometrySettings,
    "client": ClientSettings,
}


def own_fields(role: type[BaseSettings]) -> list[str]:
    """The fields a role class declares itself (not those it inherits)."""
    return [name for name in vars(role).get("__annotations__", {}) if name in role.model_fields]


def env_names(role: type[BaseSettings], field: str) -> tuple[str, ...]:
    """The environment variable(s) a field is read from: its aliases, else the prefix + its name."""
    alias = role.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return tuple(str(choice) for choice in alias.choices)
    return (f"{role.model_config.get('env_prefix', '')}{field.upper()}",)


class SettingsError(ValueError):
    """An environment variable its role refuses; the message names the variable and its value."""


def load(role: type[S]) -> S:
    """The role's settings from the environment; a refused variable raises SettingsError naming it."""
    try:
        return role()
    except ValidationError as e:
        raise SettingsError(_describe(e, role)) from None


def _describe(error: ValidationError, role: type[BaseSettings]) -> str:
    # A nested model (SR3D_VLLM_*) raises its own error, titled with its class name.
    model = VLLMSettings if error.title == VLLMSettings.__name__ else role
    problems = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        names = env_names(model, field) if field in model.model_fields else (field,)
        problems.append(f"{' or '.join(names)}={item.get('input')!r}: {item['msg']}")
    return "; ".join(problems)
