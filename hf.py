"""Hugging Face encoder checkpoints -> PTUnifier (CLIP ViT, BERT / RoBERTa), strictly.

Real users start from pre-trained encoders in Hugging Face format folders (config.json +
model.safetensors, or a sharded index): a CLIPModel or CLIPVisionModel (with or without the
`vision_model.` prefix: transformers 5 saves CLIPVisionModel without it, hub checkpoints carry it)
and a RoBERTa or BERT model with or without its MLM head. Loading is a contract:

- `config_from_hf` reads the encoder fields of the folders into a model Config;
- `convert_clip_vision` / `convert_bert` are pure state_dict -> state_dict functions with an
  explicit key map; every expected key must be present with the right shape, no unexpected key
  may remain (WeightLoadError lists them all), and the ViT position table is resized by bicubic
  interpolation to the model's image size;
- pickle checkpoints (pytorch_model.bin, *.pt) are refused, never unpickled.
"""
import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from model import Config, ConfigError, PTUnifier, resize_pos_embed


class WeightLoadError(RuntimeError):
    """A checkpoint that does not fit the model; the message names the file, keys and shapes."""



# transformers' defaults for keys a config.json may omit.
_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, patch_size=32,
                             hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)
_TEXT_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512,
                      type_vocab_size=2, layer_norm_eps=1e-12,
                      position_embedding_type="absolute")
_TEXT_MODEL_DEFAULTS = {"bert": dict(vocab_size=30522, pad_token_id=0),
                        "roberta": dict(vocab_size=50265, pad_token_id=1, bos_token_id=0,
                                        eos_token_id=2)}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise WeightLoadError(f"{path}: not found (a Hugging Face folder needs config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WeightLoadError(f"{path}: invalid JSON ({err})") from err


def hf_vision_fields(folder) -> dict:
    """Config fields of a CLIP / CLIP-vision folder (the image size is not one: positions are
    resized on load). As the official code does, the ViT takes all of CLIP's blocks but the last."""
    path = Path(folder) / "config.json"
    raw = _read_json(path)
    kind = raw.get("model_type")
    if kind == "clip":
        raw = raw.get("vision_config") or {}
    elif kind != "clip_vision_model":
        raise WeightLoadError(f"{path}: model_type {kind!r} is not 'clip' or 'clip_vision_model'")
    c = {**_CLIP_VISION_DEFAULTS, **raw}
    if c["num_channels"] != 3:
        raise WeightLoadError(f"{path}: num_channels={c['num_channels']}, only RGB (3) is supported")
    fields = dict(vision_width=c["hidden_size"], vision_layers=c["num_hidden_layers"] - 1,
                  vision_heads=c["num_attention_heads"], vision_mlp=c["intermediate_size"],
                  patch_size=c["patch_size"], vision_act=c["hidden_act"],
                  vision_ln_eps=c["layer_norm_eps"], vision_stem="patch")  # CLIP: one patch conv
    return fields


def hf_text_fields(folder, with_special_ids: bool = False) -> dict:
    """Config fields of a RoBERTa / BERT folder (bos/eos ids too when asked and known)."""
    path = Path(folder) / "config.json"
    raw = _read_json(path)
    kind = raw.get("model_type")
    if kind not in _TEXT_MODEL_DEFAULTS:
        raise WeightLoadError(f"{path}: model_type {kind!r} is not 'roberta' or 'bert'")
    c = {**_TEXT_DEFAULTS, **_TEXT_MODEL_DEFAULTS[kind], **raw}
    if c["hidden_act"] != "gelu" or c["position_embedding_type"] != "absolute":
        raise WeightLoadError(f"{path}: need hidden_act 'gelu' and absolute positions, got "
                              f"{c['hidden_act']!r} and {c['position_embedding_type']!r}")
    fields = dict(text_width=c["hidden_size"], text_layers=c["num_hidden_layers"],
                  text_heads=c["num_attention_heads"], text_mlp=c["intermediate_size"],
                  text_ln_eps=c["layer_norm_eps"], vocab_size=c["vocab_size"],
                  pad_token_id=c["pad_token_id"], max_positions=c["max_position_embeddings"],
                  type_vocab_size=c["type_vocab_size"], position_style=kind)
    if with_special_ids:
        fields.update({k: c[k] for k in ("bos_token_id", "eos_token_id") if c.get(k) is not None})
    return fields


def _check_fields(cfg: Config, fields: dict, folder) -> None:
    wrong = [f"{k}: Config has {getattr(cfg, k)!r}, config.json gives {v!r}"
             for k, v in fields.items() if getattr(cfg, k) != v]
    if wrong:
        raise WeightLoadError(f"{Path(folder) / 'config.json'} does not match the model Config "
                              "(build it with Config.from_hf):\n  " + "\n  ".join(wrong))


def read_safetensors(folder) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of `folder`/model.safetensors (or its sharded index) and a name for messages.

    Pickle checkpoints (pytorch_model.bin, *.pt) are refused, never loaded: unpickling can run
    arbitrary code.
    """
    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({folder / name for name in _read_json(index)["weight_map"].values()})
    else:
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
        hint = (f" Found {pickles}: pickle checkpoints are never loaded; convert them to "
                "safetensors first (save_pretrained writes model.safetensors).") if pickles else ""
        raise WeightLoadError(f"{single}: not found.{hint}")
    state = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightLoadError(f"{file}: not a readable safetensors file (truncated, or a "
                                  f"pickle under a safetensors name?): {err}") from err
    return state, str(single if single.is_file() else index)


def _shapes(module: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _pairs(src: str, dst: str) -> dict[str, tuple[str, ...]]:
    """Weight and bias of one module: our key -> (source key,)."""
    return {f"{dst}.{n}": (f"{src}.{n}",) for n in ("weight", "bias")}


def _clip_vision_recipe(layers: int) -> dict[str, tuple[str, ...]]:
    """Our VisionEncoder key -> CLIP vision key(s) (three keys are concatenated into one)."""
    recipe = {"class_embedding": ("embeddings.class_embedding",),
              "patch_embed.weight": ("embeddings.patch_embedding.weight",),
              "pos_embed": ("embeddings.position_embedding.weight",),
              **_pairs("pre_layrnorm", "ln_pre"), **_pairs("post_layernorm", "ln_post")}
    for i in range(layers):
        src, dst = f"encoder.layers.{i}", f"blocks.{i}"
        for n in ("weight", "bias"):
            recipe[f"{dst}.attn.qkv.{n}"] = tuple(f"{src}.self_attn.{p}_proj.{n}" for p in "qkv")
        recipe.update(_pairs(f"{src}.self_attn.out_proj", f"{dst}.attn.out"))
        recipe.update(_pairs(f"{src}.layer_norm1", f"{dst}.ln1"))
        recipe.update(_pairs(f"{src}.mlp.fc1", f"{dst}.fc1"))
        recipe.update(_pairs(f"{src}.mlp.fc2", f"{dst}.fc2"))
        recipe.update(_pairs(f"{src}.layer_norm2", f"{dst}.ln2"))
    return recipe


def _bert_recipe(layers: int) -> dict[str, tuple[str, ...]]:
    """Our TextEncoder key -> BERT/RoBERTa key(s) (three keys are concatenated into one)."""
    recipe = {f"{name}.weight": (f"embeddings.{name}.weight",)
              for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    recipe.update(_pairs("embeddings.LayerNorm", "ln_embed"))
    for i in range(layers):
        src, dst = f"encoder.layer.{i}", f"layers.{i}"
        for n in ("weight", "bias"):
            recipe[f"{dst}.attn.qkv.{n}"] = tuple(
                f"{src}.attention.self.{p}.{n}" for p in ("query", "key", "value"))
        recipe.update(_pairs(f"{src}.attention.output.dense", f"{dst}.attn.out"))
        recipe.update(_pairs(f"{src}.attention.output.LayerNorm", f"{dst}.ln1"))
        recipe.update(_pairs(f"{src}.intermediate.dense", f"{dst}.fc1"))
        recipe.update(_pairs(f"{src}.output.dense", f"{dst}.fc2"))
        recipe.update(_pairs(f"{src}.output.LayerNorm", f"{dst}.ln2"))
    return recipe


def _strip(state: dict, prefix: str, ignored) -> dict:
    """Remove `prefix` from keys that carry it and drop keys for which `ignored(key)` is true."""
    out = {}
    for key, value in state.items():
        short = key[len(prefix):] if prefix and key.startswith(prefix) else key
        if not ignored(key, short):
            out[short] = value
    return out


def _apply_recipe(state, recipe, target, source, flexible_rows=()) -> dict:
    """Check `state` against `recipe` and build our state dict; WeightLoadError lists all problems.

    target: our key -> shape. Keys in `flexible_rows` may differ in their first dimension.
    """
    wanted = {src: (dst, len(srcs)) for dst, srcs in recipe.items() for src in srcs}
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    wrong = []
    for src, (dst, parts) in wanted.items():
        if src in state:
            want = (target[dst][0] // parts, *target[dst][1:])
            got = tuple(state[src].shape)
            ok = got[1:] == want[1:] if dst in flexible_rows else got == want
            if not ok:
                wrong.append(f"{src}: file has {got}, model expects {want} (for {dst})")
    if missing or unexpected or wrong:
        lines = [f"missing keys ({len(missing)}): {missing}"] if missing else []
        lines += [f"unexpected keys ({len(unexpected)}): {unexpected}"] if unexpected else []
        lines += [f"wrong shapes ({len(wrong)}):"] + wrong if wrong else []
        raise WeightLoadError(f"{source}: does not fit the model:\n  " + "\n  ".join(lines))
    return {dst: torch.cat([state[s] for s in srcs]) if len(srcs) > 1 else state[srcs[0]]
            for dst, srcs in recipe.items()}


def convert_clip_vision(state: dict, target: dict, source: str = "state_dict") -> dict:
    """CLIP state dict -> VisionEncoder state dict (pure; position table resized to `target`).

    Accepts a full CLIPModel (keys under `vision_model.`; text_model.*, text_projection,
    visual_projection and logit_scale are ignored) or a CLIPVisionModel with or without the
    `vision_model.` prefix. `embeddings.position_ids` buffers, and blocks beyond the model's
    (the official ViT drops CLIP's last), are ignored.
    """
    prefixed = any(k.startswith("vision_model.") for k in state)
    clip_extras = {"text_projection.weight", "visual_projection.weight", "logit_scale"}
    layers = 1 + max((int(k.split(".")[1]) for k in target if k.startswith("blocks.")), default=-1)
    state = _strip(state, "vision_model." if prefixed else "", lambda key, short: (
        short == "embeddings.position_ids" or key in clip_extras or key.startswith("text_model.")
        or (short.startswith("encoder.layers.") and int(short.split(".")[2]) >= layers)))
    out = _apply_recipe(state, _clip_vision_recipe(layers), target, source, {"pos_embed"})
    rows = out["pos_embed"].shape[0] - 1
    if math.isqrt(rows) ** 2 != rows:
        raise WeightLoadError(f"{source}: position table has {rows} patch rows, not a square grid")
    out["pos_embed"] = resize_pos_embed(out["pos_embed"], math.isqrt(target["pos_embed"][0] - 1))
    return out


def convert_bert(state: dict, target: dict, source: str = "state_dict") -> dict:
    """BERT/RoBERTa state dict -> TextEncoder state dict (pure).

    Accepts bare models (`embeddings.`...) and MLM models (`roberta.`/`bert.` prefix; `lm_head.`
    and `cls.` keys ignored). Pooler weights and `embeddings.position_ids` buffers are ignored.
    """
    prefix = next((p for p in ("roberta.", "bert.") if any(k.startswith(p) for k in state)), "")
    state = _strip(state, prefix, lambda key, short: (
        short.startswith("pooler.") or short == "embeddings.position_ids"
        or (prefix and key.startswith(("lm_head.", "cls.")))))
    layers = 1 + max((int(k.split(".")[1]) for k in target if k.startswith("layers.")), default=-1)
    return _apply_recipe(state, _bert_recipe(layers), target, source)


def config_from_hf(vision=None, text=None, **overrides) -> Config:
    """The paper's `base` Config (the dataclass defaults) with the encoder fields of Hugging Face
    folders, then `overrides`.

    vision: a CLIPModel or CLIPVisionModel folder; text: a RoBERTa or BERT folder. The image size
    stays `base`'s 288 unless overridden (position embeddings are resized on load).
    """
    fields = dataclasses.asdict(Config())
    if vision is not None:
        fields.update(hf_vision_fields(vision))
    if text is not None:
        fields.update(hf_text_fields(text, with_special_ids=True))
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"config_from_hf: unknown fields {unknown}")
    fields.update(overrides)
    return Config(**fields)


def load_hf_encoders(model: PTUnifier, vision=None, text=None) -> None:
    """Fill the ViT from a CLIP folder and/or the text encoder from a RoBERTa/BERT folder.

    Strict: the folder's config.json must match the model's Config, and every encoder parameter
    must come from the file with the right shape (WeightLoadError otherwise).
    """
    if vision is not None:
        fields = hf_vision_fields(vision)
        if model.config.vision_layers <= fields["vision_layers"] + 1:  # the first blocks of CLIP's
            fields["vision_layers"] = model.config.vision_layers
        _check_fields(model.config, fields, vision)
        state, source = read_safetensors(vision)
        model.vision.load_state_dict(
            convert_clip_vision(state, _shapes(model.vision), source), strict=True)
    if text is not None:
        _check_fields(model.config, hf_text_fields(text), text)
        state, source = read_safetensors(text)
        model.text.load_state_dict(convert_bert(state, _shapes(model.text), source), strict=True)
