"""A checkpoint's `config.chat_template` overrides its tokenizer's template, as in VILA.

VILA (`llava/model/language_model/builder.py` and the HF remote code's `builder.py`,
`build_llm_and_tokenizer`): when the top-level config.json sets `chat_template` (a NAME, e.g. "qwen2"),
the tokenizer's own template is replaced by `<name>.jinja`, looked up first among the templates VILA's
code ships, then (remote code) in the checkpoint's root folder, and flattened with
`.replace("    ", "").replace("\\n", "")` (indentation and line breaks of the file are layout, not output).

VILA ships two: `qwen2` (rendered by our `QWEN2_CHAT_TEMPLATE`, the same text for every conversation we
build: one user turn after the default system turn) and `mistral` (not an NVILA LLM; refused unless the
checkpoint carries its own `mistral.jinja`). A name that is neither built in nor a file in the checkpoint
is refused (`unsupported_config`) rather than silently falling back to the tokenizer's template.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from model.errors import CheckpointError
from model.tokenizer_build import QWEN2_CHAT_TEMPLATE

# Templates VILA's own code ships, by name, as we render them (VILA looks these up before the checkpoint).
BUILT_IN: dict[str, str] = {"qwen2": QWEN2_CHAT_TEMPLATE}


def flatten(jinja: str) -> str:
    """VILA's transform of a template file: drop 4-space indents and line breaks."""
    return jinja.replace("    ", "").replace("\n", "")


def config_chat_template(config: Any, root: Path) -> str | None:
    """The template `config.chat_template` names (None when the config names none)."""
    name = getattr(config, "chat_template", None)
    if name is None:
        return None
    if not isinstance(name, str) or not name or "/" in name or "\\" in name:
        raise CheckpointError("unsupported_config", f"{root}: chat_template={name!r} is not a template name")
    if name in BUILT_IN:
        return BUILT_IN[name]
    path = root / f"{name}.jinja"
    if not path.is_file():
        raise CheckpointError("unsupported_config", f"{root}: chat_template={name!r} names a template that is neither "
                              f"built in (supported: {sorted(BUILT_IN)}) nor a file {path.name} in the checkpoint")
    return flatten(path.read_text(encoding="utf-8"))


def apply_config_chat_template(tokenizer: Any, config: Any, root: Path) -> None:
    """Set the tokenizer's template from `config.chat_template` when the config names one (VILA's rule)."""
    template = config_chat_template(config, root)
    if template is not None:
        tokenizer.chat_template = template
