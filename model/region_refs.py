"""The one parser of region references in a question. Tokenizer-free, so the gateway runs it at submit
(before anything is stored or queued) and the prompt builder runs the very same rules.

A region is referenced as `<regionK>` with K written in ASCII digits without leading zeros (`<region0>`,
`<region12>`; not `<region00>`); region K
is the K-th entry of the request's `regions` list. Rules, each a ModelInputError code:
- too_many_regions: more regions than the cap;
- placeholder_in_question: the user typed a control token of the model (`<|im_end|>`, `<image>`,
  `<vila/video>`, ...) or something shaped like one of our placeholders that is not a valid reference
  (`<region>`, `<region 1>`, `<region٣>`): it could inject media or region slots;
- region_out_of_range: `<regionK>` with K >= the number of regions given;
- unreferenced_region: a region was given but the question never references it (the model would
  compute its embedding for nothing, and the answer could not be about it).
"""
from __future__ import annotations

import re

from model.errors import ModelInputError

# [0-9], not \d: \d also matches other scripts' digits ("<region٣>"), which int() would happily parse.
# One spelling per region, no leading zeros: `<region00>` is not region 0 (it is placeholder-shaped, so
# it is refused as placeholder_in_question), or two spellings would name one region.
REGION_REF = re.compile(r"<region(0|[1-9][0-9]*)>")
# Control tokens of Qwen (`<|...|>`), VILA's media tokens and anything placeholder-shaped we own.
_RESERVED = re.compile(r"<\|[^|>]*\|>|<\s*/?\s*(?:image|video|region|mask|depth|vila/)[^<>]*>", re.IGNORECASE)


def parse_region_refs(question: str, num_regions: int, max_regions: int) -> list[int]:
    """-> the region index of each `<regionK>` reference, in order of appearance (repeats kept)."""
    if num_regions > max_regions:
        raise ModelInputError("too_many_regions", f"{num_regions} regions > limit {max_regions}")
    for hit in _RESERVED.finditer(question):
        if not REGION_REF.fullmatch(hit.group(0)):
            raise ModelInputError("placeholder_in_question", f"the question contains the reserved token {hit.group(0)!r}")
    order = [int(m.group(1)) for m in REGION_REF.finditer(question)]
    for k in order:
        if k >= num_regions:
            raise ModelInputError("region_out_of_range",
                                  f"<region{k}> is referenced but only {num_regions} region(s) were given")
    missing = sorted(set(range(num_regions)) - set(order))
    if missing:
        raise ModelInputError("unreferenced_region", f"region(s) {missing} given but never referenced as <regionK>")
    return order
