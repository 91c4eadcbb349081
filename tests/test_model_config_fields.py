"""NVILA config fields that change behaviour (issue 28): `chat_template` overrides the tokenizer's template as
in VILA, and `check_servable` refuses `mm_vision_select_feature` / `vision_resolution` values we do not
implement, naming the field. Runs on copies of the tiny demo checkpoint (NVILA layout).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model.checkpoint import convert_to_flat, load_model
from model.errors import CheckpointError
from model.prompt import chat_text
from model.tokenizer_build import QWEN2_CHAT_TEMPLATE

pytestmark = pytest.mark.timeout(300)

# A template that differs visibly from the tokenizer's (qwen2) one; indented and broken over lines as a
# VILA template file is, which VILA flattens (4-space indents and newlines dropped) before use.
CUSTOM_JINJA = """{% for message in messages %}
    {{ 'USER: ' + message['content'] + ' ' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ 'ASSISTANT:' }}
{% endif %}
"""


def _copy(src: Path, dst: Path, **fields: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(fields)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _load(path: Path):  # type: ignore[no-untyped-def]
    return load_model(path, device="cpu", dtype=torch.float32)


def test_config_chat_template_file_in_the_checkpoint_overrides_the_tokenizers(tiny_checkpoint: Path,
                                                                             tmp_path: Path) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "nvila", chat_template="plain")
    (ckpt / "plain.jinja").write_text(CUSTOM_JINJA)
    model = _load(ckpt)
    text = chat_text("How far is the door?", model.tokenizer, model.config)
    assert text == "USER: How far is the door? ASSISTANT:"
    # The flat (vLLM) layout is written from the loaded tokenizer: it carries the same template.
    convert_to_flat(ckpt, tmp_path / "flat")
    flat = _load(tmp_path / "flat")
    assert chat_text("How far is the door?", flat.tokenizer, flat.config) == text


def test_config_chat_template_qwen2_is_vilas_built_in_one(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "nvila", chat_template="qwen2")
    # The tokenizer's own template says something else; the config's name wins (VILA's order).
    (ckpt / "llm" / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = ckpt / "llm" / "tokenizer_config.json"
    data = json.loads(tok_cfg.read_text())
    data["chat_template"] = CUSTOM_JINJA
    tok_cfg.write_text(json.dumps(data))
    model = _load(ckpt)
    assert model.tokenizer.chat_template == QWEN2_CHAT_TEMPLATE
    assert chat_text("Hi", model.tokenizer, model.config).startswith("<|im_start|>system\nYou are a helpful assistant")


@pytest.mark.parametrize("name", ["mistral", "no-such-template", "../x"])
def test_config_chat_template_that_cannot_be_found_is_refused(tiny_checkpoint: Path, tmp_path: Path, name: str) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "nvila", chat_template=name)
    with pytest.raises(CheckpointError, match="chat_template") as e:
        _load(ckpt)
    assert e.value.code == "unsupported_config"


@pytest.mark.parametrize(("field", "value"), [("mm_vision_select_feature", "patch"),
                                              ("mm_vision_select_feature", "cls"),
                                              ("vision_resolution", 896), ("vision_resolution", 384)])
def test_unsupported_vision_fields_are_refused_naming_the_field(tiny_checkpoint: Path, tmp_path: Path,
                                                                field: str, value: object) -> None:
    ckpt = _copy(tiny_checkpoint, tmp_path / "nvila", **{field: value})
    with pytest.raises(CheckpointError, match=f"{field}={value!r}") as e:
        _load(ckpt)
    assert e.value.code == "unsupported_config"


@pytest.mark.parametrize("fields", [{"mm_vision_select_feature": "cls_patch", "vision_resolution": -1},
                                    {"vision_resolution": 448}, {"vision_resolution": None}, {}])
def test_nvila_vision_field_values_load(tiny_checkpoint: Path, tmp_path: Path, fields: dict[str, object]) -> None:
    _load(_copy(tiny_checkpoint, tmp_path / "nvila", **fields))  # NVILA-Lite-8B's values, and absent
