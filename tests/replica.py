"""A replica of NVILA-Lite-8B's checkpoint for tests: the real file set, config fields and Qwen2 vocabulary,
tiny random weights.

Weights cannot be downloaded here, but Qwen's BPE vocabulary ships inside a PyPI package: the DashScope SDK
carries `dashscope/resources/qwen.tiktoken` (151,643 ranked byte sequences = Qwen2's regular vocabulary).
At TEST time (never at service run time, never from a model hub) the wheel is fetched once with
`pip download` into a cache directory (SR3D_TEST_CACHE, default ~/.cache/sr3d-tests), the file's sha256 is
checked, and transformers' TikTokenConverter turns it into a fast tokenizer with Qwen2's pre-tokenisation
regex and Qwen's special tokens (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645) plus the
`[BOS]` 151646 / `[PAD]` 151647 VILA's training script adds (`llava/train/train.py`), which is what makes
VILA's media tokens land on the ids `llava/constants.py` lists (151648-151650). As in the real `llm/`, the
media tokens are NOT in the saved tokenizer; the loader adds them.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

DASHSCOPE = "dashscope==2.0.2"
TIKTOKEN_MEMBER = "dashscope/resources/qwen.tiktoken"
TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
QWEN2_REGULAR = 151643
# Qwen2's pre-tokenizer (tokenizer.json "Split" pattern): single digits, unlike cl100k's \p{N}{1,3}.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VILA_TRAIN_SPECIALS = ["[BOS]", "[PAD]"]


def cache_dir() -> Path:
    d = Path(os.environ.get("SR3D_TEST_CACHE") or Path.home() / ".cache" / "sr3d-tests")
    d.mkdir(parents=True, exist_ok=True)
    return d


def qwen_tiktoken() -> Path:
    """The qwen.tiktoken file, extracted from the pinned DashScope wheel (downloaded once). Raises
    FileNotFoundError (tests skip on it) when the wheel cannot be fetched."""
    out = cache_dir() / "qwen.tiktoken"
    if out.is_file() and hashlib.sha256(out.read_bytes()).hexdigest() == TIKTOKEN_SHA256:
        return out
    wheels = cache_dir() / "wheels"
    wheel = next(iter(sorted(wheels.glob("dashscope-2.0.2-*.whl"))), None) if wheels.is_dir() else None
    if wheel is None:
        r = subprocess.run([sys.executable, "-m", "pip", "download", DASHSCOPE, "--no-deps", "--only-binary=:all:",
                            "-d", str(wheels), "-q"], capture_output=True, text=True, timeout=300)
        wheel = next(iter(sorted(wheels.glob("dashscope-2.0.2-*.whl"))), None)
        if r.returncode != 0 or wheel is None:
            raise FileNotFoundError(f"pip download {DASHSCOPE} failed: {r.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheel) as z:
        data = z.read(TIKTOKEN_MEMBER)
    if hashlib.sha256(data).hexdigest() != TIKTOKEN_SHA256:
        raise FileNotFoundError(f"{wheel.name}:{TIKTOKEN_MEMBER} has an unexpected sha256")
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out


def qwen2_tokenizer():  # type: ignore[no-untyped-def]
    """Qwen2's tokenizer rebuilt from qwen.tiktoken (cached as tokenizer.json after the first conversion)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from model.tokenizer_build import QWEN2_CHAT_TEMPLATE

    src = qwen_tiktoken()
    built = cache_dir() / f"qwen2-tokenizer-{TIKTOKEN_SHA256[:12]}.json"
    if not built.is_file():
        tok = TikTokenConverter(vocab_file=str(src), pattern=QWEN2_PATTERN).converted()
        tmp = built.with_suffix(".tmp")
        tok.save(str(tmp))
        tmp.replace(built)
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(built)), clean_up_tokenization_spaces=False)
    if fast.vocab_size != QWEN2_REGULAR:
        raise AssertionError(f"qwen.tiktoken gave {fast.vocab_size} tokens, expected {QWEN2_REGULAR}")
    fast.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    fast.add_special_tokens({"bos_token": VILA_TRAIN_SPECIALS[0], "pad_token": VILA_TRAIN_SPECIALS[1],
                             "eos_token": "<|im_end|>"})
    fast.chat_template = QWEN2_CHAT_TEMPLATE  # the template VILA's `qwen2` chat template renders
    fast.model_max_length = 32768
    return fast


# NVILA-Lite-8B's top-level fields that decide behaviour (values as NVILA-Lite ships them, to our knowledge
# of VILA's configuration: dynamic tiling up to 12 tiles, SigLIP penultimate layer, basic encoders).
NVILA_FIELDS = {
    "image_aspect_ratio": "dynamic",
    "max_tiles": 12,
    "num_video_frames": 32,
    "fps": 0.0,
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "cls_patch",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "image_encoder": json.dumps({"_target_": "llava.model.encoders.BasicImageEncoder"}),
    "video_encoder": json.dumps({"_target_": "llava.model.encoders.BasicVideoEncoder"}),
    "model_dtype": "torch.bfloat16",
    "s2": False,
    "dynamic_s2": False,
    "video_max_tiles": -1,
    "vision_resolution": -1,
    "interpolate_mode": "linear",
    "drop_path_rate": 0.0,
    "tune_language_model": True,
    "tune_mm_projector": True,
    "tune_vision_tower": True,
}
SIGLIP_PREPROCESSOR = {
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor",
    "resample": 3, "rescale_factor": 1 / 255, "size": {"height": 448, "width": 448},
}


def build_replica_checkpoint(path: Path, seed: int = 0) -> Path:
    """NVILA-Lite-8B's layout and vocabulary (llm vocab_size 152064, no media tokens, no sr3d/), tiny weights."""
    import torch

    from model.checkpoint import build_model, save_model, tiny_config

    tokenizer = qwen2_tokenizer()
    config = tiny_config(152064)  # Qwen2-7B's padded embedding table
    for k, v in NVILA_FIELDS.items():
        setattr(config, k, v)
    model = build_model(config, tokenizer, "cpu", torch.float32)
    _fill(model, seed)
    save_model(model, path, extras=False)
    cfg = json.loads((path / "config.json").read_text())
    for k in ("pos3d_cfg", "region_cfg", "tile_text", "video_frame_text", "region_text", "mark_text",
              "system_prompt", "prompt_template", "image_token", "region_token", "tile_size", "max_frames"):
        cfg.pop(k, None)  # NVILA's config has none of SR-3D's fields: the defaults must do
    cfg["llm_cfg"]["_name_or_path"] = str(path / "llm")
    cfg["vision_tower_cfg"]["_name_or_path"] = str(path / "vision_tower")
    cfg["mm_projector_cfg"]["_name_or_path"] = str(path / "mm_projector")
    cfg["resume_path"] = str(path)
    cfg["mm_hidden_size"] = cfg["vision_tower_cfg"]["hidden_size"]  # VILA builds the projector from it
    cfg["hidden_size"] = cfg["llm_cfg"]["hidden_size"]
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "vision_tower" / "preprocessor_config.json").write_text(json.dumps(SIGLIP_PREPROCESSOR, indent=2))
    _v4_vision_keys(path / "vision_tower")
    llm_cfg = json.loads((path / "llm" / "config.json").read_text())
    llm_cfg["rope_theta"] = llm_cfg["rope_parameters"]["rope_theta"]  # transformers 4 (NVILA's files) reads this
    (path / "llm" / "config.json").write_text(json.dumps(llm_cfg, indent=2))
    _v4_tokenizer_files(path / "llm", tokenizer)
    return path


def _fill(model, seed: int) -> None:  # type: ignore[no-untyped-def]
    """Weights from our own seeded generator, parameter by parameter in name order, so the replica (and the
    VILA reference numbers made from it) do not depend on how a transformers version initialises modules.
    Norm scales near 1, biases small, matrices N(0, 0.5) (large logit margins keep greedy decoding stable)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            else:
                p.copy_(0.5 * noise)


def _v4_vision_keys(folder: Path) -> None:
    """NVILA's SigLIP shards were written by transformers 4: keys carry the `vision_model.` level."""
    from safetensors.torch import load_file, save_file

    for shard in folder.glob("*.safetensors"):
        tensors = load_file(str(shard))
        save_file({f"vision_model.{k}": v for k, v in tensors.items()}, str(shard), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {f"vision_model.{k}": v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def _v4_tokenizer_files(folder: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The file set of a Qwen2 `llm/` saved by transformers 4 (what NVILA ships): vocab.json, merges.txt,
    tokenizer.json, tokenizer_config.json (class Qwen2Tokenizer, added tokens, chat template inline),
    added_tokens.json, special_tokens_map.json."""
    tj = json.loads((folder / "tokenizer.json").read_text())
    (folder / "vocab.json").write_text(json.dumps(tj["model"]["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {t["content"]: t["id"] for t in tj["added_tokens"]}
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2))
    decoder = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
               for t in tj["added_tokens"]}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "added_tokens_decoder": decoder, "additional_special_tokens": QWEN_SPECIALS,
        "bos_token": "[BOS]", "eos_token": "<|im_end|>", "pad_token": "[PAD]", "unk_token": None,
        "chat_template": tokenizer.chat_template, "clean_up_tokenization_spaces": False, "errors": "replace",
        "model_max_length": 32768, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
    }, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": QWEN_SPECIALS, "bos_token": "[BOS]", "eos_token": "<|im_end|>", "pad_token": "[PAD]",
    }, indent=2))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
