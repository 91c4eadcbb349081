"""Full-size flat checkpoints without weights (vLLM `load_format=dummy` fills them at random), for benchmarks.

Random weights generate ids across the whole embedding table, so the tokenizer must cover it: with the
512-token demo tokenizer a 152,064-row model's ids detokenized to nothing, no `token` event was ever sent
and the service benches could not measure TTFT or inter-token latency (issue 19).

`tokenizer_builder` is the hook for a better tokenizer (a replica of Qwen2's real vocabulary, once one
exists); the default, `full_vocab_tokenizer`, has exactly `vocab_size` entries and every id decodes to
non-empty text, so each generated token streams as text, as with the real model.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from model.checkpoint import _config_dict
from model.config import SR3DConfig
from model.errors import CheckpointError
from model.tokenizer_build import MEDIA_TOKENS, QWEN2_CHAT_TEMPLATE, SPECIAL_TOKENS

TokenizerBuilder = Callable[[int], PreTrainedTokenizerFast]  # vocab_size (embedding rows) -> tokenizer

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def _word_pieces() -> Iterator[str]:
    """Distinct pronounceable pieces, shortest first: 'ba', 'Ġba', 'be', ..., 'Ġbaba', ... ('Ġ' = space, byte level)."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    for n in itertools.count(1):
        for combo in itertools.product(syllables, repeat=n):
            word = "".join(combo)
            yield word
            yield "Ġ" + word


def full_vocab_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with exactly `vocab_size` ids: the 256 byte symbols (any UTF-8 text encodes),
    generated word pieces, then the qwen2 special tokens and the media/region placeholders (last ids, as in
    Qwen2). Encoding is byte by byte (no merges): prompts are longer than Qwen2's by a few dozen tokens, which
    the thousands of visual tokens per request dwarf."""
    added = [*SPECIAL_TOKENS, *MEDIA_TOKENS]
    n_regular = vocab_size - len(added)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if n_regular < len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the byte alphabet plus {len(added)} special tokens")
    regular = itertools.chain(alphabet, itertools.islice(_word_pieces(), n_regular - len(alphabet)))
    vocab = {tok: i for i, tok in enumerate(regular)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(added)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=[t for t in added if t not in ("<|im_end|>", "<|endoftext|>")],
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = QWEN2_CHAT_TEMPLATE
    return fast


def build_dummy_flat(path: str | Path, config: SR3DConfig, tokenizer_builder: TokenizerBuilder = full_vocab_tokenizer) -> Path:
    """Write a flat checkpoint directory (config.json in bf16 + tokenizer files, no tensors) for vLLM's
    load_format=dummy. The tokenizer must fit the embedding table and hold the media placeholders."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    vocab_size = int(config.llm_cfg["vocab_size"])
    tokenizer = tokenizer_builder(vocab_size)
    if len(tokenizer) > vocab_size:
        raise CheckpointError("bad_config", f"tokenizer has {len(tokenizer)} tokens, the model's vocab_size is {vocab_size}")
    missing = [t for t in (config.image_token, config.region_token) if t not in tokenizer.get_vocab()]
    if missing:
        raise CheckpointError("bad_config", f"tokenizer lacks the placeholders {missing}")
    d = _config_dict(config, SR3DConfig.model_type, ["SR3DForConditionalGeneration"])
    d["torch_dtype"] = "bfloat16"
    (root / "config.json").write_text(json.dumps(d, indent=2))
    tokenizer.save_pretrained(str(root))
    return root
