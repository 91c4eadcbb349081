"""The one prompt layout both engines use: the same text, the same token ids, the same slot positions.

NVILA's layout (NVlabs/VILA; `llava/utils/media.py` `extract_media`, `llava_arch.generate_content`,
`encoders/image/basic.py`, `encoders/video/basic.py`):
- image (dynamic tiling): the user turn starts with `"<image>\\n"` per tile (thumbnail included), then the text;
- video: `"<image>"` per frame with NO literal newline between frames (VILA's `extract_media` writes one media
  token per frame; its HF remote code writes one `<vila/video>` that `BasicVideoEncoder` expands per frame the
  same way: the embeddings the LLM sees are identical);
- every media token becomes `tokens_per_tile` (121) projected features followed by the embedding of `"\\n"`.
So a tile of an image costs 123 prompt positions and a frame of a video 122.
The user text is normalised as VILA does (the user turn is `.strip()`ped: trailing whitespace of the question
goes), and the chat template is the checkpoint tokenizer's own when it has one (`config.prompt_template` with
`config.system_prompt` otherwise). SR-3D's `<regionK>` becomes `config.region_text` ("Region [K] <region>")
[I: SR-3D's exact wording is not published]; each `<region>` is one slot filled by a region vector.
The visual prefix comes first and is the same for every question on the same media, so prefix caching reuses
its KV.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model.config import SR3DConfig
from model.errors import ModelInputError
from model.inputs import SpatialQuery
from model.marks import mark_regions
from model.region_refs import REGION_REF, parse_region_refs
from model.tiling import frame_grid, tiles_for_grid, validate_query


@dataclass
class PromptLayout:
    input_ids: list[int]  # one image_token_id per tile / frame, one region_token_id per region reference
    image_token_id: int
    region_token_id: int
    newline_ids: list[int]
    tokens_per_tile: int  # 121
    num_tiles: int
    region_order: list[int] = field(default_factory=list)  # region index of each <region> slot, in order

    @property
    def num_image_tokens_per_tile(self) -> int:
        return self.tokens_per_tile + len(self.newline_ids)

    @property
    def num_tokens(self) -> int:
        """Length of the expanded prompt, i.e. what the LLM prefills."""
        return prompt_token_count(self)


def prompt_token_count(layout: PromptLayout) -> int:
    return len(layout.input_ids) + layout.num_tiles * (layout.num_image_tokens_per_tile - 1)


def special_token_id(tokenizer: Any, token: str) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    tid = ids[0] if ids else None
    if tid is None or tid == tokenizer.unk_token_id:
        raise KeyError(f"tokenizer has no single token {token!r}")
    return int(tid)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The stop rule of both engines: EOS, <|im_end|>, <|endoftext|> (whichever the tokenizer has).
    VILA stops on EOS and on the token that ends an assistant turn in the chat template (<|im_end|>)."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)


def check_question(question: str, num_regions: int, tokenizer: Any, config: SR3DConfig) -> list[int]:
    """The region-reference rules (`model.region_refs`) plus the one rule that needs the tokenizer: the
    user must not type any token the tokenizer treats as special (they differ per checkpoint)."""
    order = parse_region_refs(question, num_regions, config.max_regions)
    reserved = set(getattr(tokenizer, "all_special_tokens", [])) | set(tokenizer.get_added_vocab())
    typed = next((t for t in sorted(reserved) if t and t in question), None)
    if typed is not None:
        raise ModelInputError("placeholder_in_question", f"the question contains the reserved token {typed!r}")
    return order


# `grounded` answer mode: the measured facts (model/measure `grounding_text`) go before the user's
# question in this one fixed template, after the media, so the model's answer can cite them.
GROUNDING_TEMPLATE = "{facts}\nUse these measurements in the answer.\n{question}"


def grounded_question(question: str, facts: str) -> str:
    """The question with the measured facts before it. The facts name regions in words ("region 0"),
    never as `<regionK>` references: the region slots stay exactly the user's."""
    facts = REGION_REF.sub(lambda m: f"region {m.group(1)}", facts).strip()
    return GROUNDING_TEMPLATE.format(facts=facts, question=question) if facts else question


def media_text(num_tiles: int, is_video: bool, config: SR3DConfig) -> str:
    return (config.video_frame_text if is_video else config.tile_text) * num_tiles


def chat_text(user: str, tokenizer: Any, config: SR3DConfig) -> str:
    """One user turn + the generation prompt, through the checkpoint's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return config.prompt_template.format(system=config.system_prompt, user=user)


def build_prompt(question: str, num_tiles: int, is_video: bool, num_regions: int, tokenizer: Any,
                 config: SR3DConfig) -> PromptLayout:
    order = check_question(question, num_regions, tokenizer, config)
    text = REGION_REF.sub(lambda m: config.region_text.format(k=m.group(1)), question)
    user = (media_text(num_tiles, is_video, config) + text).strip()  # VILA strips the user turn
    ids = tokenizer(chat_text(user, tokenizer, config), add_special_tokens=False)["input_ids"]
    image_id = special_token_id(tokenizer, config.image_token)
    region_id = special_token_id(tokenizer, config.region_token)
    if ids.count(image_id) != num_tiles or ids.count(region_id) != len(order):
        raise ModelInputError("placeholder_in_question", "the question changes how placeholders tokenize")
    return PromptLayout(
        input_ids=list(ids),
        image_token_id=image_id,
        region_token_id=region_id,
        newline_ids=list(tokenizer("\n", add_special_tokens=False)["input_ids"]),
        tokens_per_tile=config.tokens_per_tile,
        num_tiles=num_tiles,
        region_order=order,
    )


def layout_query(query: SpatialQuery, tokenizer: Any, config: SR3DConfig, context: int, reserve: int = 1,
                 region_mode: str = "embedding") -> tuple[SpatialQuery, PromptLayout]:
    """Every cheap check of a query, then its prompt layout: the one entry point of both engines.
    `context` is the engine's context length; `reserve` the tokens that must still fit after the prompt.
    In `marks` region mode the returned query is the marked one (regions drawn, referenced in words)."""
    validate_query(query, config)
    if region_mode == "marks" and query.regions:
        check_question(query.question, len(query.regions), tokenizer, config)  # the rules, on the user's text
        query = mark_regions(query, config)
    n, h, w = query.frames.shape[:3]
    # The prompt needs only the tile counts; check it (cheap) before resizing any pixel.
    per_frame = tiles_for_grid(frame_grid(w, h, query.is_video, config))
    layout = build_prompt(query.question, n * per_frame, query.is_video, len(query.regions), tokenizer, config)
    if layout.num_tokens + reserve > context:
        raise ModelInputError("prompt_too_long",
                              f"prompt {layout.num_tokens} + {reserve} generated tokens > context {context}")
    return query, layout


def expand_prompt(layout: PromptLayout) -> tuple[list[int], list[int]]:
    """-> (input ids with each `<image>` replaced by tokens_per_tile image slots + newline ids,
    positions of the image slots in order). Region slots stay `region_token_id`, one per reference."""
    out: list[int] = []
    image_pos: list[int] = []
    for tid in layout.input_ids:
        if tid == layout.image_token_id:
            image_pos.extend(range(len(out), len(out) + layout.tokens_per_tile))
            out.extend([layout.image_token_id] * layout.tokens_per_tile)
            out.extend(layout.newline_ids)
        else:
            out.append(tid)
    return out, image_pos
