"""The dummy full-size checkpoint the GPU benches load (vLLM load_format=dummy) streams text for any id.

Issue 19: the 8B dummy carried the 512-token demo tokenizer, so ids a 152,064-row model samples decoded
to nothing and the benches saw no token events (no TTFT, no ITL).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer

from model.checkpoint import nvila_lite_8b_config
from model.dummy_checkpoint import build_dummy_flat, full_vocab_tokenizer
from model.errors import CheckpointError
from model.tokenizer_build import build_tokenizer

VOCAB = nvila_lite_8b_config().llm_cfg["vocab_size"]


@pytest.fixture(scope="module")
def dummy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The call `sr3d bench engine --config nvila-lite-8b` and `sr3d bench workers --dummy-8b` build it with."""
    return build_dummy_flat(tmp_path_factory.mktemp("work") / "nvila-lite-8b-flat", nvila_lite_8b_config())


@pytest.fixture(scope="module")
def tok(dummy_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(str(dummy_dir))  # as the engine loads it


def test_the_saved_tokenizer_covers_exactly_the_models_vocabulary(dummy_dir: Path, tok) -> None:  # type: ignore[no-untyped-def]
    cfg = json.loads((dummy_dir / "config.json").read_text())
    assert cfg["llm_cfg"]["vocab_size"] == VOCAB == len(tok) == 152064
    assert cfg["torch_dtype"] == "bfloat16" and not list(dummy_dir.glob("*.safetensors"))
    # Placeholders and stop tokens are single tokens inside the embedding table.
    for t in ("<image>", "<region>", "<|im_end|>", "<|endoftext|>", "<|im_start|>"):
        assert tok.convert_tokens_to_ids(t) < VOCAB
        assert tok.encode(f"a {t} b").count(tok.convert_tokens_to_ids(t)) == 1
    assert tok.eos_token == "<|im_end|>"
    text = "How far is the chair from <image>? Café 東京 1.5 m"
    assert tok.decode(tok.encode(text)) == text  # byte level: any text round-trips


def test_every_id_decodes_to_text(tok) -> None:  # type: ignore[no-untyped-def]
    texts = tok.batch_decode([[i] for i in range(VOCAB)], skip_special_tokens=False)
    assert [i for i, t in enumerate(texts) if not t] == []


def test_random_ids_stream_as_text_like_the_engine_detokenizes(tok) -> None:  # type: ignore[no-untyped-def]
    """What the engine does with sampled ids: skip special tokens, decode incrementally (DecodeStream is
    the incremental detokenizer vLLM uses for fast tokenizers)."""
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(VOCAB) for _ in range(64)]
        assert tok.decode(ids, skip_special_tokens=True).strip()
        stream = DecodeStream(skip_special_tokens=True)
        pieces = [stream.step(tok._tokenizer, i) for i in ids]
        emitted = [p for p in pieces if p]
        assert len(emitted) >= 60  # only a lone non-ASCII byte (or a special id) can hold text back
        assert "".join(emitted) == tok.decode(ids, skip_special_tokens=True)


def test_the_tokenizer_hook(tmp_path: Path) -> None:
    # A smaller real tokenizer (e.g. a replica of Qwen2's 151,643 + specials) plugs in; ids past it stay unused.
    out = build_dummy_flat(tmp_path / "small", nvila_lite_8b_config(), tokenizer_builder=lambda _n: build_tokenizer())
    assert len(AutoTokenizer.from_pretrained(str(out))) == len(build_tokenizer())
    # One that does not fit the embedding table is refused.
    with pytest.raises(CheckpointError, match="vocab_size"):
        build_dummy_flat(tmp_path / "big", nvila_lite_8b_config(), tokenizer_builder=lambda n: full_vocab_tokenizer(n + 1))
