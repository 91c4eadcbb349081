"""Wire shapes of the OpenAI-compatible routes (service/api/openai.py): the chat-completions request
as OpenAI's and vLLM's clients send it, plus SR-3D's `regions`/`num_frames` extension (sent through
the client's `extra_body`), and the response, chunk, model and file objects their clients parse.

Requests are strict (extra="forbid"): a field we do not implement is refused, never ignored. Values are
strict too (`max_tokens: true`, `n: "1"`, `temperature: "0.5"` are refused, as the multipart route's
options are), and every list has a length cap, so no request validates millions of items (issue 30).
Ranges of the generation knobs are NOT checked here: GenerationOptions (service/schemas.py) owns
them, through submission.check_fields.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

from service.schemas import AnswerMode, Measurements


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------------
# Request


class MediaURL(_Strict):
    """`data:` URL, `sr3d-media://<file id>` (POST /v1/files) or, when the deployment allows it, http(s)."""

    url: str = Field(min_length=1)


class ImageURL(MediaURL):
    # OpenAI's resolution hint; SR-3D tiles every image the same way, so only "auto" is honest.
    detail: Literal["auto"] | None = None


# Caps far above any legal request (the deployment's own caps are checked after, in check_fields).
MAX_PARTS = 64  # content parts of the one message: text parts + one media part
MAX_TEXT_CHARS = 64 * 1024  # one text part; the joined question is capped by SR3D_MAX_QUESTION_CHARS
MAX_REGION_ITEMS = 256  # regions (SR3D_MAX_REGIONS: 8 by default)
MAX_STOP_ITEMS = 64  # a bound; OpenAI's limit of 4 is stop_list's (openai.py) clearer error


class TextPart(_Strict):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: MediaURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class UserMessage(_Strict):
    role: Literal["user"]
    content: list[ContentPart] = Field(max_length=MAX_PARTS)

    @field_validator("content", mode="before")
    @classmethod
    def _text_shorthand(cls, value: Any) -> Any:
        # A plain string is one text part; converting it first keeps errors about the parts precise.
        return [{"type": "text", "text": value}] if isinstance(value, str) else value


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[UserMessage] = Field(min_length=1, max_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None  # strict float still takes a JSON integer (0, 1)
    top_p: StrictFloat | None = None
    seed: StrictInt | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_ITEMS)] | None = None  # each checked by stop_list
    n: StrictInt | None = None
    # --- SR-3D extension (extra_body) --------------------------------------------------------------
    # Same items as the multipart `regions` field, except that a mask is a `data:image/png;base64,...`
    # URL or an `sr3d-media://<file id>` reference instead of a part name.
    regions: list[Any] | None = Field(None, max_length=MAX_REGION_ITEMS)
    num_frames: StrictInt | None = None  # frames sampled from a video (capped by SR3D_MAX_FRAMES)
    answer_mode: AnswerMode | None = None  # model | grounded | measured (None = SR3D_ANSWER_MODE)
    scale_hint: dict[str, Any] | None = None  # one known length; validated as the multipart option is


# --------------------------------------------------------------------------------------------------
# Responses


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    # Extension (README "Measured answers"): what the point maps measured, and how the text was written.
    # The openai client keeps unknown fields: `completion.measurements` / `completion.model_extra`.
    measurements: Measurements | None = None
    answer_mode: AnswerMode | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """Serialised with exclude_none: a delta carries only what changed."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    # Extension, on the chunk that carries the finish_reason only (see ChatCompletion).
    measurements: Measurements | None = None
    answer_mode: AnswerMode | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sr3d"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FileObject(BaseModel):
    """OpenAI's file object, for media uploaded through POST /v1/files."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its $defs inlined, for a route's openapi_extra (the route reads
    its body itself, to refuse in OpenAI's shape, so FastAPI cannot document it). No recursive models here."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node

    return resolve(schema)
