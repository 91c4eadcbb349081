"""Prompt layout shared by both engines: the same text, the same token ids, the same slot positions.

User turn = one `tile_text` ("<image>\\n") per tile first (a visual prefix identical for every question on the
same media, so prefix caching reuses its KV), then the question with `<regionK>` rewritten to
`region_text` ("Region [K] <region>") [I: SR-3D's exact wording is not published; both strings are config].
Expansion: each `<image>` becomes `tokens_per_tile` image slots followed by the ids of "\\n" (NVILA appends the
newline embedding after every tile's features); each `<region>` is one slot filled by a region vector.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from model.config import SR3DConfig
from model.errors import ModelInputError

REGION_REF = re.compile(r"<region(\d+)>")
# Anything that looks like a control token of the model or of our own placeholder scheme.
_RESERVED = re.compile(r"<\|[^|>]*\|>|<vila/[^>]*>|<image>|<region>|<video>")


@dataclass
class PromptLayout:
    input_ids: list[int]  # one image_token_id per tile, one region_token_id per region reference
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


def special_token_id(tokenizer, token: str) -> int:  # type: ignore[no-untyped-def]
    ids = tokenizer.convert_tokens_to_ids([token])
    tid = ids[0] if ids else None
    if tid is None or tid == tokenizer.unk_token_id:
        raise KeyError(f"tokenizer has no single token {token!r}")
    return int(tid)


def check_question(question: str, num_regions: int, tokenizer, config: SR3DConfig) -> list[int]:  # type: ignore[no-untyped-def]
    """Validate the question; return the region index of each `<regionK>` reference in order."""
    if num_regions > config.max_regions:
        raise ModelInputError("too_many_regions", f"{num_regions} regions > limit {config.max_regions}")
    reserved = set(getattr(tokenizer, "all_special_tokens", [])) | set(tokenizer.get_added_vocab())
    reserved |= {config.image_token, config.region_token}
    hit = _RESERVED.search(question)
    typed = hit.group(0) if hit else next((t for t in reserved if t and t in question), None)
    if typed is not None:
        raise ModelInputError("placeholder_in_question", f"the question contains the reserved token {typed!r}")
    order = [int(m.group(1)) for m in REGION_REF.finditer(question)]
    for k in order:
        if k >= num_regions:
            raise ModelInputError("region_out_of_range", f"<region{k}> referenced but only {num_regions} region(s) given")
    missing = sorted(set(range(num_regions)) - set(order))
    if missing:
        raise ModelInputError("unreferenced_region", f"region(s) {missing} given but never referenced as <regionK>")
    return order


def build_prompt(question: str, tiles_per_frame: list[int], num_regions: int, tokenizer, config: SR3DConfig) -> PromptLayout:  # type: ignore[no-untyped-def]
    order = check_question(question, num_regions, tokenizer, config)
    text = REGION_REF.sub(lambda m: config.region_text.format(k=m.group(1)), question)
    num_tiles = sum(tiles_per_frame)
    user = config.tile_text * num_tiles + text
    full = config.prompt_template.format(system=config.system_prompt, user=user)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
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
