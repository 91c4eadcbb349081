"""Checkpoint I/O: NVILA layout in and out, the flat layout vLLM loads, and the tiny demo checkpoint.

NVILA layout (what `Efficient-Large-Model/NVILA-Lite-8B` ships, plus SR-3D's optional extras):
    config.json          model_type "llava_llama", architectures ["LlavaLlamaModel"], llm_cfg,
                         vision_tower_cfg, mm_projector_cfg (+ pos3d_cfg, region_cfg, tiling fields)
    llm/                 HF Qwen2ForCausalLM: config.json, *.safetensors (sharded + index), tokenizer files
    vision_tower/        HF SiglipVisionModel: config.json, *.safetensors
    mm_projector/        config.json, model.safetensors with keys layers.{1,2,4,5,7}.{weight,bias}
    sr3d/                optional: SR-3D's 3D-PE and region modules, keys mapped through EXTRA_KEY_TABLE.
                         Absent -> 3D-PE zero (2D behaviour) and no region embeddings: region questions run in
                         `marks` mode (model/marks.py); `embedding` mode is refused.

Loading follows VILA (NVlabs/VILA `llava/model/language_model/builder.py`, `llava/model/builder.py`):
- `llm/config.json` and `vision_tower/config.json` are the truth (the top-level dict copies are ignored);
- the media tokens are added to the `llm/` tokenizer when absent, in VILA's order: `<vila/sentinel>` (added
  first, by `infer_stop_tokens`), then `<image>`, `<vila/video>` (`MEDIA_TOKENS`); on a Qwen2 tokenizer with
  VILA's `[BOS]`/`[PAD]` they get ids 151648, 151649, 151650, the ids `llava/constants.py` lists;
- the LLM's embedding table and head are resized to `len(tokenizer)` (VILA: `resize_token_embeddings`);
- then SR-3D's `<region>` is added after them: its id lies past the table; region slots are never looked up.
What we cannot serve faithfully is refused (`unsupported_config`): see `check_servable`.

Flat layout (`convert_to_flat`; one directory vLLM's default loader reads without secondary sources):
    config.json          model_type "sr3d", architectures ["SR3DForConditionalGeneration"], same fields
    tokenizer files      from llm/ (with <image>, <region>, ... as single tokens) + chat template
    *.safetensors        one state dict, keys prefixed by submodule:
                           llm.model.embed_tokens.weight, llm.model.layers.N.…, llm.model.norm.weight, llm.lm_head.weight
                           vision_tower.vision_model.embeddings.…, vision_tower.vision_model.encoder.layers.N.…,
                           vision_tower.vision_model.post_layernorm.…
                           mm_projector.layers.{1,2,4,5,7}.{weight,bias}
                           pos3d.mlp.{0,2}.{weight,bias}
                           region_extractor.region_projector.{0,2}.{weight,bias}
`load_model` reads both layouts.
"""
from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from transformers import AutoTokenizer

from model.chat_template import apply_config_chat_template
from model.config import NVILAConfig, SR3DConfig, config_from_dict
from model.dtype import resolve_model_dtype
from model.errors import CheckpointError
from model.marks import resolve_region_mode
from model.modeling import SR3DForConditionalGeneration

log = logging.getLogger(__name__)

PARTS = {"llm": "llm", "vision_tower": "vision_tower", "mm_projector": "mm_projector"}
EXTRAS = ("pos3d", "region_extractor")
EXTRAS_DIR = "sr3d"
MAX_SHARD = "5GB"
# VILA's media tokens in the order VILA adds them (sentinel first), see the module doc.
VILA_ADDED_TOKENS = ("<vila/sentinel>", "<image>", "<vila/video>")
# The one table mapping SR-3D module weights (keys in sr3d/*.safetensors) to our modules: checkpoint key
# prefix -> our key prefix. A release of SR-3D whose keys are named differently needs only an entry here.
EXTRA_KEY_TABLE: dict[str, str] = {
    "pos3d.": "pos3d.",  # pos3d.mlp.{0,2}.{weight,bias}
    "region_extractor.": "region_extractor.",  # region_extractor.region_projector.{0,2}.{weight,bias}
}
# What NVILA-Lite-8B's config.json says and we implement; anything else is refused (check_servable).
SERVABLE = {
    "image_aspect_ratio": {"dynamic"},
    "image_encoder": {"llava.model.encoders.BasicImageEncoder"},
    "video_encoder": {"llava.model.encoders.BasicVideoEncoder"},
    "mm_projector_type": {"mlp_downsample_3x3_fix"},
    # VILA's SigLIP tower: "cls_patch" keeps every token (SigLIP has no CLS); "patch" drops the first patch
    # token, which the 3x3 projector's square grid cannot take. Absent = "cls_patch" (our tiny checkpoints).
    "mm_vision_select_feature": {"cls_patch"},
}


# ------------------------------------------------------------------ reading
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError("missing_file", f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError("bad_config", f"{path}: {e}") from e


def _shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index)["weight_map"].values()))
        shards = [folder / f for f in files]
    else:
        shards = sorted(folder.glob("*.safetensors"))
    missing = [s for s in shards if not s.is_file()]
    if not shards or missing:
        raise CheckpointError("missing_file", f"no safetensors weights in {folder}" + (f" (missing {missing})" if missing else ""))
    return shards


def _read_tensors(folder: Path, device: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in _shards(folder):
        with safe_open(str(shard), framework="pt", device=str(device)) as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def _load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str, strict: bool = True) -> set[str]:
    """Copy tensors into `module`; CheckpointError on unknown keys or shape mismatch. Returns missing keys."""
    expected = module.state_dict()
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise CheckpointError("unknown_keys", f"{where}: {len(unknown)} unexpected keys, e.g. {unknown[:5]}")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError("wrong_shape", f"{where}: {k} has shape {tuple(t.shape)}, model expects {tuple(expected[k].shape)}")
    missing = set(expected) - set(tensors)
    if getattr(module, "config", None) is not None and getattr(module.config, "tie_word_embeddings", False):
        missing.discard("lm_head.weight")
    if strict and missing:
        raise CheckpointError("missing_keys", f"{where}: {len(missing)} keys absent, e.g. {sorted(missing)[:5]}")
    with torch.no_grad():
        for k, t in tensors.items():
            expected[k].copy_(t)
    return missing


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(config: SR3DConfig, tokenizer, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SR3DForConditionalGeneration:  # type: ignore[no-untyped-def]
    """Allocate (random init) directly on `device` in `dtype`: an 8B model never passes through CPU memory."""
    with torch.device(device), _default_dtype(dtype):
        model = SR3DForConditionalGeneration(config, tokenizer)
    model.to(device=device, dtype=dtype)
    return model.eval()


def add_media_tokens(tokenizer, config: SR3DConfig) -> int:  # type: ignore[no-untyped-def]
    """Add VILA's media tokens (when absent, in VILA's order), then `<region>`. Returns the vocabulary size
    VILA resizes the LLM to (before `<region>`, which VILA does not have)."""
    for token in VILA_ADDED_TOKENS:
        if token not in tokenizer.get_vocab():
            tokenizer.add_tokens([token], special_tokens=True)
    vila_vocab = len(tokenizer)
    if config.region_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([config.region_token], special_tokens=True)
    return vila_vocab


def _target(value: Any) -> Any:
    """VILA stores encoder configs as JSON strings or dicts with a `_target_` class path."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        value = json.loads(value)
    return value.get("_target_") if isinstance(value, dict) else value


def _encoder_extras(value: Any) -> dict[str, Any]:
    if isinstance(value, str) and value.lstrip().startswith("{"):
        value = json.loads(value)
    return {k: v for k, v in value.items() if k != "_target_"} if isinstance(value, dict) else {}


def check_servable(config: SR3DConfig, where: Path) -> None:
    """Refuse, with the field named, any NVILA option whose behaviour we do not implement (rather than
    silently serving a different model)."""
    fields = {
        "image_aspect_ratio": getattr(config, "image_aspect_ratio", "dynamic"),
        "image_encoder": _target(getattr(config, "image_encoder", None) or "llava.model.encoders.BasicImageEncoder"),
        "video_encoder": _target(getattr(config, "video_encoder", None) or "llava.model.encoders.BasicVideoEncoder"),
        "mm_projector_type": config.mm_projector_cfg.get("mm_projector_type", "mlp_downsample_3x3_fix"),
        "mm_vision_select_feature": getattr(config, "mm_vision_select_feature", None) or "cls_patch",
    }
    for name, value in fields.items():
        if value not in SERVABLE[name]:
            raise CheckpointError("unsupported_config", f"{where}: {name}={value!r} is not implemented "
                                  f"(supported: {sorted(SERVABLE[name])})")
    for name in ("image_encoder", "video_encoder"):
        extras = _encoder_extras(getattr(config, name, None))
        if extras.get("start_tokens") is not None or extras.get("end_tokens", "\n") != "\n" or set(extras) - {
                "start_tokens", "end_tokens"}:
            raise CheckpointError("unsupported_config", f"{where}: {name} options {extras} are not implemented "
                                  "(only the default: no start tokens, end token \"\\n\")")
    if int(getattr(config, "video_max_tiles", 1) or 1) > 1:
        raise CheckpointError("unsupported_config", f"{where}: video_max_tiles > 1 (tiled video frames) is not implemented")
    if getattr(config, "dynamic_s2", False) or getattr(config, "s2", False):
        raise CheckpointError("unsupported_config", f"{where}: S2 multi-scale features are not implemented")
    if int(getattr(config, "min_tiles", 1) or 1) != 1:
        raise CheckpointError("unsupported_config", f"{where}: min_tiles != 1 is not implemented")
    # VILA resizes SigLIP's position embeddings to `vision_resolution` unless it is -1 or the tower's own size
    # (siglip_encoder `_maybe_resize_pos_embeds`); we do not, so only those two values are servable.
    resolution = getattr(config, "vision_resolution", None)
    native = int(config.vision_tower_cfg.get("image_size", config.tile_size))
    if resolution is not None and (isinstance(resolution, bool) or resolution not in (-1, native)):
        raise CheckpointError("unsupported_config", f"{where}: vision_resolution={resolution!r} is not implemented "
                              f"(supported: -1 or the vision tower's image_size {native}; other values resize its "
                              "position embeddings)")


def resize_vocab(model: SR3DForConditionalGeneration, rows: int) -> None:
    """Resize the LLM's embedding table and head to `rows`, as VILA does after adding its tokens: shrinking
    drops the padded rows; new rows get the mean of the old ones (deterministic)."""
    emb = model.llm.get_input_embeddings().weight
    old = emb.shape[0]
    if old == rows:
        return
    mean_in = emb.detach().float().mean(0)
    head = model.llm.get_output_embeddings()
    mean_out = head.weight.detach().float().mean(0) if head is not None else None
    model.llm.resize_token_embeddings(rows, mean_resizing=False)
    if rows > old:
        with torch.no_grad():
            model.llm.get_input_embeddings().weight[old:] = mean_in.to(emb.dtype)
            if mean_out is not None:
                model.llm.get_output_embeddings().weight[old:] = mean_out.to(emb.dtype)
    model.config.llm_cfg["vocab_size"] = rows
    model.config.__dict__.pop("_sr3d_cache_text_config", None)


def _load_extras(model: SR3DForConditionalGeneration, tensors: dict[str, torch.Tensor], where: str) -> bool:
    """Map sr3d/ tensors through EXTRA_KEY_TABLE into pos3d / region_extractor. -> region modules trained?"""
    mapped: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        prefix = next((p for p in EXTRA_KEY_TABLE if key.startswith(p)), None)
        if prefix is None:
            raise CheckpointError("unknown_keys", f"{where}: {key!r} matches no entry of EXTRA_KEY_TABLE")
        mapped[EXTRA_KEY_TABLE[prefix] + key[len(prefix):]] = t
    for name in EXTRAS:
        part = {k[len(name) + 1:]: v for k, v in mapped.items() if k.startswith(name + ".")}
        if part:
            _load_into(getattr(model, name), part, f"{where} [{name}.]")
        elif name == "pos3d":
            model.pos3d.reset_output()
    return any(k.startswith("region_extractor.") for k in mapped)


def _unprefixed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SigLIP keys as NVILA stores them (transformers 4: `vision_model.embeddings.…`) or as transformers 5
    saves them (`embeddings.…`) -> ours (transformers 5)."""
    return {k.removeprefix("vision_model."): v for k, v in tensors.items()}


def _read_config(root: Path, flat: bool) -> SR3DConfig:
    raw = _read_json(root / "config.json")
    try:
        if not flat:
            # VILA reads the subfolders' config.json; the top-level dict copies can be stale.
            raw["llm_cfg"] = _read_json(root / "llm" / "config.json")
            raw["vision_tower_cfg"] = _read_json(root / "vision_tower" / "config.json")
            proj = root / "mm_projector" / "config.json"
            if proj.is_file():
                raw["mm_projector_cfg"] = {k: v for k, v in _read_json(proj).items()
                                           if k not in ("architectures", "model_type", "_name_or_path")}
            extras_cfg = root / EXTRAS_DIR / "config.json"
            if extras_cfg.is_file():
                raw.update({k: v for k, v in _read_json(extras_cfg).items() if k in ("pos3d_cfg", "region_cfg")})
        config = config_from_dict(raw)
        _ = config.text_config, config.vision_config
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed config is a checkpoint problem, reported as such
        raise CheckpointError("bad_config", f"{root / 'config.json'}: {e}") from e
    check_servable(config, root)
    return config


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
               region_mode: str = "auto") -> SR3DForConditionalGeneration:
    """Load either layout. `region_mode` (auto | embedding | marks, model/marks.py) is resolved against what
    the checkpoint carries and stored on the model; `embedding` without trained region modules is refused.
    `dtype` None = NVIDIA's inference dtype on a GPU (float16), float32 on a CPU (model/dtype.py)."""
    root = Path(path)
    dtype = dtype or resolve_model_dtype("auto", device)
    flat = not (root / "llm").is_dir()
    config = _read_config(root, flat)
    tok_dir = root if flat else root / "llm"
    if not any((tok_dir / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise CheckpointError("missing_file", f"no tokenizer files in {tok_dir}")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    if not flat:
        # VILA: config.chat_template (a name) replaces the tokenizer's template. The flat layout stores the
        # tokenizer converted from here, template included, so it is applied once, on the NVILA layout.
        apply_config_chat_template(tokenizer, config, root)
    vila_vocab = add_media_tokens(tokenizer, config)

    model = build_model(config, tokenizer, device, dtype)
    if flat:
        tensors = _read_tensors(root, "cpu")
        for name in (*PARTS, *EXTRAS):
            part = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            _load_into(getattr(model, name), _unprefixed(part) if name == "vision_tower" else part, f"{root} [{name}.]")
        stray = [k for k in tensors if k.split(".", 1)[0] not in (*PARTS, *EXTRAS)]
        if stray:
            raise CheckpointError("unknown_keys", f"{root}: keys outside known submodules, e.g. {stray[:5]}")
        trained = bool(config.region_cfg.get("trained", False))
    else:
        for name, sub in PARTS.items():
            tensors = _read_tensors(root / sub, "cpu")
            _load_into(getattr(model, name), _unprefixed(tensors) if name == "vision_tower" else tensors, str(root / sub))
        resize_vocab(model, vila_vocab)
        extras_dir = root / EXTRAS_DIR
        if extras_dir.is_dir() and _shards_exist(extras_dir):
            trained = _load_extras(model, _read_tensors(extras_dir, "cpu"), str(extras_dir))
        else:
            model.pos3d.reset_output()
            trained = False
            log.warning("%s has no %s/ weights: 3D positional encoding is zero (2D behaviour) and there are no "
                        "trained region modules", root, EXTRAS_DIR)
        config.region_cfg["trained"] = trained
    model.region_mode = resolve_region_mode(region_mode, trained)
    log.info("loaded %s: vocabulary %d (+ placeholders: %d tokens), region_mode=%s", root,
             model.llm.get_input_embeddings().weight.shape[0], len(tokenizer), model.region_mode)
    return model


def _shards_exist(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


# ------------------------------------------------------------------ writing
def _save_tensors(module_or_sd: torch.nn.Module | dict[str, torch.Tensor], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sd = module_or_sd.state_dict() if isinstance(module_or_sd, torch.nn.Module) else module_or_sd
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    save_torch_state_dict(sd, str(folder), max_shard_size=MAX_SHARD)


def _config_dict(config: SR3DConfig, model_type: str, architectures: list[str]) -> dict[str, Any]:
    d = config.to_dict()
    d["model_type"] = model_type
    d["architectures"] = architectures
    d["llm_cfg"] = {**config.llm_cfg, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    d["vision_tower_cfg"] = {**config.vision_tower_cfg, "model_type": "siglip_vision_model",
                             "architectures": ["SiglipVisionModel"]}
    d.pop("dtype", None)
    return d


def save_model(model: SR3DForConditionalGeneration, path: str | Path, extras: bool = True) -> None:
    """Write the NVILA layout (+ sr3d/ extras unless `extras=False`, i.e. a plain NVILA checkpoint)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    (root / "config.json").write_text(json.dumps(_config_dict(cfg, NVILAConfig.model_type, ["LlavaLlamaModel"]), indent=2))
    _save_tensors(model.llm, root / "llm")
    model.llm.config.save_pretrained(str(root / "llm"))
    model.tokenizer.save_pretrained(str(root / "llm"))
    _save_tensors(model.vision_tower, root / "vision_tower")
    model.vision_tower.config.save_pretrained(str(root / "vision_tower"))
    for sub, arch in (("llm", "Qwen2ForCausalLM"), ("vision_tower", "SiglipVisionModel")):
        # VILA picks the tower class from `architectures` (NVILA's files have it; _from_config leaves it unset)
        f = root / sub / "config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "architectures": [arch]}, indent=2))
    _save_tensors(model.mm_projector, root / "mm_projector")
    (root / "mm_projector" / "config.json").write_text(json.dumps(
        {"model_type": "v2l_projector", "architectures": ["MultimodalProjector"], **cfg.mm_projector_cfg}, indent=2))
    if not extras:
        return
    _save_tensors({f"{n}.{k}": v for n in EXTRAS for k, v in getattr(model, n).state_dict().items()}, root / EXTRAS_DIR)
    (root / EXTRAS_DIR / "config.json").write_text(json.dumps({"pos3d_cfg": cfg.pos3d_cfg, "region_cfg": cfg.region_cfg}, indent=2))


def save_flat(model: SR3DForConditionalGeneration, path: str | Path) -> None:
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    d = _config_dict(model.config, SR3DConfig.model_type, ["SR3DForConditionalGeneration"])
    # vLLM reads these at top level of the model config.
    d["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    # The plugin tells vLLM which placeholder ids may lie past the embedding table (handle_oov_mm_token).
    tok = model.tokenizer
    d["sr3d_token_ids"] = {"image": int(tok.convert_tokens_to_ids(model.config.image_token)),
                           "region": int(tok.convert_tokens_to_ids(model.config.region_token))}
    (root / "config.json").write_text(json.dumps(d, indent=2))
    model.tokenizer.save_pretrained(str(root))
    sd = {k: v for k, v in model.state_dict().items() if k.split(".", 1)[0] in (*PARTS, *EXTRAS)}
    _save_tensors(sd, root)


def convert_to_flat(src: str | Path, dst: str | Path) -> None:
    """NVILA layout -> flat layout, tensors copied unchanged (dtype kept as stored in bf16 checkpoints)."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError("bad_config", f"{dst} exists and is not empty")
    stored = _stored_dtype(src)
    model = load_model(src, device="cpu", dtype=stored)
    save_flat(model, dst)
    gen = src / "llm" / "generation_config.json"
    if gen.is_file():
        shutil.copy(gen, dst / "generation_config.json")


def _stored_dtype(src: Path) -> torch.dtype:
    shard = _shards(src / "llm")[0]
    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    with safe_open(str(shard), framework="pt") as f:
        stored = f.get_slice(next(iter(f.keys()))).get_dtype()
    return names.get(stored, torch.float32)


# ------------------------------------------------------------------ tiny demo checkpoint
def tiny_config(vocab_size: int) -> SR3DConfig:
    return SR3DConfig(
        llm_cfg=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                     rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.5),
        vision_tower_cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              patch_size=14, image_size=448, hidden_act="gelu_pytorch_tanh",
                              layer_norm_eps=1e-6, vision_use_head=False),
        mm_projector_cfg={"mm_projector_type": "mlp_downsample_3x3_fix"},
        pos3d_cfg={"num_freqs": 8, "mlp_hidden": 32},
        region_cfg={"max_regions": 8, "mlp_hidden": 64},
    )


def nvila_lite_8b_config(vocab_size: int = 152064) -> SR3DConfig:
    """NVILA-Lite-8B shapes (SigLIP-so400m-448 + 3x3 projector + Qwen2-7B) with SR-3D's default extras."""
    return SR3DConfig(
        llm_cfg=dict(vocab_size=vocab_size, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                     rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False),
        vision_tower_cfg=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                              patch_size=14, image_size=448, hidden_act="gelu_pytorch_tanh",
                              layer_norm_eps=1e-6, vision_use_head=False),
        mm_projector_cfg={"mm_projector_type": "mlp_downsample_3x3_fix"},
    )


def build_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """A complete NVILA-layout checkpoint with random weights and a real (small) BPE tokenizer."""
    from model.tokenizer_build import build_tokenizer

    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config, tokenizer, "cpu", torch.float32)
        with torch.no_grad():
            # A trained SR-3D has a non-zero 3D-PE; give the demo one so the 3D path visibly matters.
            for p in model.pos3d.mlp[2].parameters():
                p.normal_(0.0, 0.5)
    save_model(model, path)
    return Path(path)
