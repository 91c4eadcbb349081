"""Wire types: what the gateway validates a request into, what the worker reads back from Redis,
and what clients get from the API. Pydantic v2; no Redis, no HTTP here.
"""
from __future__ import annotations

import json
import re
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from model.errors import ModelInputError
from model.region_refs import parse_region_refs
from service.errors import ApiError
from service.settings import GatewaySettings, StoreSettings


class _Strict(BaseModel):
    # strict: "3"/true are not frame numbers and `max_tokens: true` is not 1 (no lax coercion);
    # allow_inf_nan=False: Infinity/NaN/1e400 are rejected here instead of being stored as null
    # (which the worker then cannot read back). The worker validates the stored spec with the same
    # models, so a spec that got past the gateway somehow is still caught before it runs.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------
# JSON form fields: parsed with bounds before pydantic sees them

MAX_JSON_DEPTH = 16  # regions nest 3 deep, options 1: anything deeper is an attack, not a request
MAX_JSON_INT_DIGITS = 20  # 2**64 has 20 digits; the largest meaningful integer here is a seed < 2**63
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(raw: str) -> int:
    """Maximum bracket nesting of a JSON text, counted without recursion (strings skipped)."""
    depth = deepest = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', raw)):
        depth += 1 if match.group(0) in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (max {MAX_JSON_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:32]!r} is not a finite number")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def parse_json_field(raw: str | None, field: str, default: Any) -> Any:
    """A JSON form field (`regions`, `options`) as Python data, or ApiError("<field>_not_json").

    Bounded before anything recursive runs: nesting depth (json.loads would raise RecursionError, a
    500), integer digits (int() of 5,000 digits raises a plain ValueError), and no Infinity/NaN/1e400
    (Python's json accepts them; JSON does not)."""
    if raw is None or raw.strip() == "":
        return default
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(f"{field}_not_json", f"{field} is nested {depth} deep (max {MAX_JSON_DEPTH})")
    try:
        return json.loads(raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ApiError(f"{field}_not_json", f"{field} is not valid JSON: {e.msg} at char {e.pos}") from None
    except (ValueError, RecursionError) as e:
        raise ApiError(f"{field}_not_json", f"{field} is not valid JSON: {e}") from None


# --------------------------------------------------------------------------------------------------
# Generation options


MIN_TEMPERATURE = 0.01  # vLLM's own floor (it clamps smaller values); below it sampling is numerically greedy
MIN_TOP_P = 0.01  # smaller keeps only the top token anyway; reject rather than pass degenerate floats on


AnswerMode = Literal["model", "grounded", "measured"]


class ScaleHint(_Strict):
    """One known length that puts a relative scene into metres: e.g. region 0's height is 0.30 m.
    Checked at submit (the region must exist); the worker rescales the scene's measurements by it."""

    region: int = Field(ge=0, description="the region (index into `regions`) whose size is known")
    dimension: Literal["width", "height", "depth", "longest"] = Field(
        "longest", description="which side of the region's gravity-aligned box the length is")
    metres: float = Field(gt=0.0, le=1000.0, description="the known length in metres")


class GenerationOptions(_Strict):
    """Client-tunable generation knobs. Absolute bounds here; deployment caps in `check_caps`."""

    max_tokens: int | None = Field(None, ge=1, description="None = SR3D_... default_max_tokens")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description=f"0 = greedy; otherwise >= {MIN_TEMPERATURE}")
    top_p: float = Field(1.0, ge=MIN_TOP_P, le=1.0)
    num_frames: int | None = Field(None, ge=1, description="frames sampled from a video; None = SR3D_NUM_FRAMES")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    cancel_on_disconnect: bool = Field(False, description="cancel the job when the streaming client goes away")
    ignore_eos: bool = Field(False, description="generate exactly max_tokens (fixed-length benchmarks); still capped")
    answer_mode: AnswerMode | None = Field(
        None, description="model: the language model's text alone; grounded: the measured facts go into the "
        "prompt before the question; measured: no language model, the text is written from the measurements. "
        "None = SR3D_ANSWER_MODE")
    scale_hint: ScaleHint | None = Field(None, description="one known length, to state a relative scene in metres")

    @field_validator("temperature")
    @classmethod
    def _temperature_floor(cls, value: float) -> float:
        # logits / 1e-300 overflow to inf, softmax gives NaN and torch.multinomial raises; vLLM
        # silently clamps below 0.01. One rule for both engines: 0 (greedy) or a usable temperature.
        if 0.0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}")
        return value

    def check_caps(self, settings: StoreSettings) -> GenerationOptions:
        """Raise ApiError (422) with a specific code when over a deployment cap; return a copy with defaults filled."""
        if self.max_tokens is not None and self.max_tokens > settings.max_tokens:
            raise ApiError("max_tokens_over_cap", f"max_tokens {self.max_tokens} > cap {settings.max_tokens}")
        if self.num_frames is not None and self.num_frames > settings.max_frames:
            raise ApiError("num_frames_over_cap", f"num_frames {self.num_frames} > cap {settings.max_frames}")
        return self.with_defaults(settings)

    def with_defaults(self, settings: StoreSettings) -> GenerationOptions:
        """The options with unset knobs filled from the deployment's defaults (each within its cap).
        The gateway stores jobs this way; the worker applies it again for specs written elsewhere."""
        return self.model_copy(
            update={
                "max_tokens": min(self.max_tokens or settings.default_max_tokens, settings.max_tokens),
                "num_frames": min(self.num_frames or settings.num_frames, settings.max_frames),
                "answer_mode": self.answer_mode or settings.answer_mode,
            }
        )


# --------------------------------------------------------------------------------------------------
# Regions: a region is one or more annotations (box or mask), each on one frame.


def _check_box(box: list[float]) -> list[float]:
    x0, y0, x1, y1 = box
    if min(box) < 0:
        raise ValueError("box coordinates must be >= 0 (pixels)")
    if not (x1 > x0 and y1 > y0):
        raise ValueError("box must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
    return box


class BoxRegion(_Strict):
    """A box in pixel coordinates of frame `frame` of the upload (0-based; 0 for an image)."""

    frame: int = Field(ge=0)
    box: list[float] = Field(min_length=4, max_length=4)

    _box = field_validator("box")(classmethod(lambda cls, v: _check_box(v)))


class MaskRegion(_Strict):
    """A mask given as a PNG multipart part named `mask`; non-zero pixels are inside the region."""

    frame: int = Field(ge=0)
    mask: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")


class MaskRef(_Strict):
    """A mask as stored for the worker: the PNG lives in the blob store under `mask_blob`."""

    frame: int = Field(ge=0)
    mask_blob: str


def _annotation_kind(value: Any) -> str:
    # Pick the model by its distinguishing key so errors name one shape, not every union member.
    get = value.get if isinstance(value, dict) else lambda k: getattr(value, k, None)
    if get("box") is not None:
        return "box"
    return "mask_blob" if get("mask_blob") is not None else "mask"


Annotation = Annotated[
    Annotated[BoxRegion, Tag("box")] | Annotated[MaskRegion, Tag("mask")], Discriminator(_annotation_kind)
]
StoredAnnotation = Annotated[
    Annotated[BoxRegion, Tag("box")] | Annotated[MaskRef, Tag("mask_blob")], Discriminator(_annotation_kind)
]
RegionSpec = list[Annotation]  # one region, as the client sends it
StoredRegion = list[StoredAnnotation]  # one region, as the worker reads it


class RegionsInput(BaseModel):
    """The `regions` form field: a JSON list; each item is one region, either a single annotation
    object or a list of annotations (the same object seen on several frames)."""

    model_config = ConfigDict(strict=True)

    regions: list[RegionSpec]

    @field_validator("regions", mode="before")
    @classmethod
    def _wrap_single(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [[item] if isinstance(item, dict) else item for item in value]
        return value

    @field_validator("regions")
    @classmethod
    def _non_empty(cls, value: list[RegionSpec]) -> list[RegionSpec]:
        if any(len(region) == 0 for region in value):
            raise ValueError("a region needs at least one annotation")
        return value


# --------------------------------------------------------------------------------------------------
# Questions

def check_question(question: str, n_regions: int, settings: GatewaySettings) -> str:
    """Validate the user question at submit: length here, every region-reference rule in the model's own
    parser (`model.region_refs`), so a question the model would refuse is a 422 before anything is stored."""
    question = question.strip()
    if not question:
        raise ApiError("question_empty", "question must not be empty")
    if len(question) > settings.max_question_chars:
        raise ApiError("question_too_long", f"question is {len(question)} chars > cap {settings.max_question_chars}")
    try:
        parse_region_refs(question, n_regions, settings.max_regions)
    except ModelInputError as e:
        raise ApiError(e.code, e.message) from None
    return question


# --------------------------------------------------------------------------------------------------
# Jobs


# --------------------------------------------------------------------------------------------------
# Measurements (model/measure `Measurements.to_dict`): the typed shape in `done`, GET and the OpenAI
# extension. Every length is a Length: its value, its unit ("m", or null when the scene has no metric
# scale) and that scale, so no number is read without knowing what it is.


class Length(BaseModel):
    value: float
    unit: Literal["m", "m^3"] | None = Field(description="null: relative units (no metric scale; ratios only)")
    scale: Literal["metric", "relative"]


class UpVector(BaseModel):
    vector: list[float] = Field(description="world-frame unit vector of 'up'")
    method: Literal["horizontal plane", "reference camera"] = Field(
        description="from the dominant horizontal plane of the scene, or the reference camera's up (fallback)")
    plane_inliers: int


class Box(BaseModel):
    center: list[float]
    size: list[float] = Field(description="width, height, depth along `axes`")
    yaw_deg: float
    axes: list[list[float]] = Field(description="world-frame unit vectors of width, height (= up), depth")
    unit: Literal["m"] | None
    scale: Literal["metric", "relative"]


class RegionMeasurementOut(BaseModel):
    region: int
    available: bool
    reason: str | None = Field(None, description="why no number when not available")
    points_used: int
    points_total: int
    frames: list[int] = Field(description="sampled frames whose masks gave points")
    cleaning: str = Field(description="the rules applied to the points")
    position_unit: Literal["m"] | None
    scale: Literal["metric", "relative"]
    centroid: list[float] | None
    width: Length | None
    height: Length | None
    depth: Length | None
    longest: Length | None
    volume: Length | None
    box: Box | None


class PairMeasurementOut(BaseModel):
    a: int
    b: int
    available: bool
    reason: str | None = None
    center_distance: Length | None
    closest_distance: Length | None
    horizontal_distance: Length | None
    vertical_distance: Length | None
    offset_right: Length | None
    offset_up: Length | None
    offset_forward: Length | None
    direction: dict[str, Any] | None = Field(
        description="where b is from a in the reference view: left_right, above_below, front_behind, clock (1-12)")
    bigger: bool | None
    taller: bool | None
    wider: bool | None


class Measurements(BaseModel):
    """What the job's point maps measured about its regions (README "Measured answers")."""

    scale: Literal["metric", "relative"]
    unit: Literal["m"] | None
    source: str = Field(description="where the scale comes from: the depth source, or the scale hint")
    up: UpVector
    frame: str
    regions: list[RegionMeasurementOut]
    pairs: list[PairMeasurementOut]


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.done, JobStatus.failed, JobStatus.cancelled)


class JobSpec(_Strict):
    """Everything a worker needs for one job. Lives in the jobs-stream entry and the job hash."""

    job_id: str
    media_kind: Literal["video", "image"]
    media_blob: str  # blob-store key of the upload
    media_hash: str  # sha256 hex of the upload bytes (cache key for decoded frames / point maps)
    media_filename: str
    question: str
    regions: list[StoredRegion] = Field(default_factory=list)
    scene_blob: str | None = None  # optional RGB-D scene npz, blob-store key
    options: GenerationOptions = Field(default_factory=GenerationOptions)
    created_at: float
    api_key_id: str | None = None  # short non-secret id of the API key (hash prefix), for rate limits and logs

    def blob_keys(self) -> list[str]:
        keys = [self.media_blob] + [a.mask_blob for region in self.regions for a in region if isinstance(a, MaskRef)]
        return keys + ([self.scene_blob] if self.scene_blob else [])


class ErrorInfo(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class JobView(BaseModel):
    """GET /v1/spatial-qa/{id}. `job_id` is the id's one spelling in every shape (submit response,
    events, this view); `id` carries the same value, kept so clients written before `job_id` was
    added here keep working (README: "job_id everywhere")."""

    job_id: str
    id: str = Field(description="deprecated alias of job_id (the same value)")
    status: JobStatus
    question: str | None = None
    media_kind: str | None = None
    answer: str | None = None
    finish_reason: str | None = None
    # `embedding` (SR-3D's region vectors) or `marks` (regions drawn into the frames); set when done.
    region_mode: Literal["embedding", "marks"] | None = None
    answer_mode: AnswerMode | None = None  # how the answer text was written; set when done
    measurements: Measurements | None = None  # what the point maps measured (units and scale on every number)
    error: ErrorInfo | None = None
    usage: Usage | None = None
    timings: dict[str, float | str] = Field(default_factory=dict)  # seconds; pointmaps_backend names the backend
    progress: dict[str, Any] = Field(default_factory=dict)  # {"stage": latest, "stages": {stage: {seconds, ...}}}
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0  # times a worker started it (>1 after a worker died mid-job)
    cancel_requested: bool = False


class SubmitResponse(BaseModel):
    job_id: str
    # The job's current status: `queued` for a new job, whatever it is now for an idempotent replay.
    status: JobStatus = JobStatus.queued
    status_url: str
    events_url: str


# A job's event types and their data: service/jobs/events.py. These two end a job.
TERMINAL_EVENTS = ("done", "error")
