"""The authors' checkpoints -> a checkpoint of this project (safetensors), without unpickling code.

    python convert.py ptunifier.ckpt --out ptunifier.safetensors --tokenizer biomed_roberta_base/
    python finetune.py --task ic --data data/chexpert --init ptunifier.safetensors
    python predict.py classify --checkpoint ptunifier.safetensors --images scans/

Reads a PyTorch Lightning checkpoint of the official code (github.com/zhjohnchan/PTUnifier) with
`torch.load(weights_only=True)`: tensors, plain containers and the data-only `AttributeDict` of
`hyper_parameters`; any other pickled object is refused. Two namings are read:

- PTUnifier (`ptunifier.ckpt`): `vision_encoder.visual.` (CLIP ViT), `language_encoder.`
  (RoBERTa), `multi_modal_{language,vision}_{proj,layers,pooler}`, `modality_type_embeddings`,
  `mlm_head`, `itm_head`, `itc_head`, `pseudo_{vision,language}_token_pool`;
- METER (the start weights, `meter.ckpt`): `vit_model.`, `text_transformer.`,
  `cross_modal_{text,image}_{transform,layers,pooler}`, `token_type_embeddings`, `mlm_score`,
  `itm_score`; it has no pools and no ITC heads, which start at this project's initialisation.

The model Config is inferred from the tensors (widths, depths, vocabulary, position tables, pool
sizes, untied decoder, ITC bias); what the tensors cannot give (attention heads of the text encoder
and the fusion, k, temperature, eps, special ids, text length) comes from `hyper_parameters`
when the file holds them, else the official defaults. Official classifier heads (`vqa_head`,
`cls_head`, `mlc_head`: Linear, LayerNorm, GELU, Linear) become the task head (`task/head.`).
Every official key that is not used is listed. Writes are atomic; a refused file writes nothing.
"""
import argparse
import collections
import dataclasses
import json
import math
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch

from checkpoint import FORMAT, atomic_save, dedupe_shared
from hf import _bert_recipe
from model import Config, ConfigError, PTUnifier


class ConvertError(RuntimeError):
    """An official checkpoint that cannot be converted; the message names the file and the problem."""


class AttributeDict(dict):
    """Data-only stand-in for Lightning's AttributeDict (a dict) in `hyper_parameters`: unpickling
    it makes a plain dict (the only container torch's weights-only unpickler fills)."""

    def __new__(cls, *args, **kwargs):
        return dict()


SAFE_CLASSES = {"pytorch_lightning.utilities.parsing.AttributeDict": AttributeDict,
                "lightning_fabric.utilities.data.AttributeDict": AttributeDict,
                "collections.OrderedDict": collections.OrderedDict}

METER_PREFIXES = (("vit_model.", "vision_encoder."), ("text_transformer.", "language_encoder."),
                  ("cross_modal_text_transform.", "multi_modal_language_proj."),
                  ("cross_modal_image_transform.", "multi_modal_vision_proj."),
                  ("token_type_embeddings.", "modality_type_embeddings."),
                  ("cross_modal_text_layers.", "multi_modal_language_layers."),
                  ("cross_modal_image_layers.", "multi_modal_vision_layers."),
                  ("cross_modal_text_pooler.", "multi_modal_language_pooler."),
                  ("cross_modal_image_pooler.", "multi_modal_vision_pooler."),
                  ("mlm_score.", "mlm_head."), ("itm_score.", "itm_head."))
CLASSIFIER_HEADS = ("vqa_head", "cls_head", "mlc_head")
# Official defaults (ptunifier/config.py, task_pretrain_ptunifier; RoBERTa-base's eps and ids).
DEFAULTS = dict(num_pseudo_vision_tokens=49, num_pseudo_langauge_tokens=32, cl_temp=0.1,
                max_text_len=48, drop_rate=0.1)


# ----------------------------------------------------------------------------- reading the file


def _stand_in(name: str) -> type:
    """A class a data-only stand-in replaces, under its pickled module path."""
    module, _, qualname = name.rpartition(".")
    stand_in = SAFE_CLASSES[name]
    return type(qualname, (stand_in,), {"__module__": module}) if stand_in is AttributeDict else stand_in


def read_lightning(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, hyper_parameters config or {}) of a Lightning checkpoint, read with
    torch.load(weights_only=True) only."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ConvertError(f"{path}: not a torch.save zip archive (truncated, or another format)")
    safe = [_stand_in(n) for n in SAFE_CLASSES if n != "collections.OrderedDict"]
    try:
        with torch.serialization.safe_globals(safe):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"a pickled object of class {found.group(1)}" if found else "a pickled object"
        raise ConvertError(f"{path}: holds {what}, beyond tensors and plain data; it is never "
                           "unpickled (only tensors and data-only containers are read)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise ConvertError(f"{path}: unreadable (truncated or damaged?): {err}") from None
    if not isinstance(ckpt, dict):
        raise ConvertError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    state = ckpt.get("state_dict", ckpt)
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if not tensors:
        raise ConvertError(f"{path}: no state_dict of tensors inside (keys: {sorted(ckpt)[:8]})")
    hparams = ckpt.get("hyper_parameters") or {}
    return tensors, dict(hparams.get("config", hparams)) if isinstance(hparams, dict) else {}


# ----------------------------------------------------------------------------- key maps


def _pair(ours: str, theirs: str) -> dict[str, tuple[str, ...]]:
    return {f"{ours}.{n}": (f"{theirs}.{n}",) for n in ("weight", "bias")}


def _vision_map(layers: int) -> dict[str, tuple[str, ...]]:
    v = "vision_encoder.visual"
    out = {"vision.patch_embed.weight": (f"{v}.conv1.weight",),
           "vision.class_embedding": (f"{v}.class_embedding",),
           "vision.pos_embed": (f"{v}.positional_embedding",),
           **_pair("vision.ln_pre", f"{v}.ln_pre"), **_pair("vision.ln_post", f"{v}.ln_post")}
    for i in range(layers):
        src, dst = f"{v}.transformer.resblocks.{i}", f"vision.blocks.{i}"
        out[f"{dst}.attn.qkv.weight"] = (f"{src}.attn.in_proj_weight",)  # q, k, v stacked
        out[f"{dst}.attn.qkv.bias"] = (f"{src}.attn.in_proj_bias",)
        for ours, theirs in (("attn.out", "attn.out_proj"), ("ln1", "ln_1"), ("ln2", "ln_2"),
                             ("fc1", "mlp.c_fc"), ("fc2", "mlp.c_proj")):
            out.update(_pair(f"{dst}.{ours}", f"{src}.{theirs}"))
    return out


def _fusion_map(layers: int) -> dict[str, tuple[str, ...]]:
    out = {**_pair("fusion.text_proj", "multi_modal_language_proj"),
           **_pair("fusion.image_proj", "multi_modal_vision_proj"),
           "fusion.modality_type.weight": ("modality_type_embeddings.weight",),
           **_pair("fusion.text_pooler", "multi_modal_language_pooler.dense"),
           **_pair("fusion.image_pooler", "multi_modal_vision_pooler.dense")}
    for stream, theirs in (("text", "language"), ("image", "vision")):
        for i in range(layers):
            src, dst = f"multi_modal_{theirs}_layers.{i}", f"fusion.{stream}_layers.{i}"
            for n in ("weight", "bias"):
                out[f"{dst}.self_attn.qkv.{n}"] = tuple(f"{src}.attention.self.{p}.{n}"
                                                        for p in ("query", "key", "value"))
                out[f"{dst}.cross_attn.q.{n}"] = (f"{src}.crossattention.self.query.{n}",)
                out[f"{dst}.cross_attn.kv.{n}"] = tuple(f"{src}.crossattention.self.{p}.{n}"
                                                        for p in ("key", "value"))
            for ours, part in (("self_attn.out", "attention.output.dense"),
                               ("ln1", "attention.output.LayerNorm"),
                               ("cross_attn.out", "crossattention.output.dense"),
                               ("ln2", "crossattention.output.LayerNorm"),
                               ("fc1", "intermediate.dense"), ("fc2", "output.dense"),
                               ("ln3", "output.LayerNorm")):
                out.update(_pair(f"{dst}.{ours}", f"{src}.{part}"))
    return out


def _heads_map(itc_bias: bool) -> dict[str, tuple[str, ...]]:
    out = {**_pair("mlm_head.dense", "mlm_head.transform.dense"),
           **_pair("mlm_head.norm", "mlm_head.transform.LayerNorm"),
           "mlm_head.decoder.weight": ("mlm_head.decoder.weight",),
           "mlm_head.decoder.bias": ("mlm_head.bias",), **_pair("itm_head", "itm_head.fc")}
    for ours, theirs in (("itc_image", "vision"), ("itc_text", "language")):
        out.update(_pair(f"{ours}.norm", f"itc_head.{theirs}_ln"))
        out[f"{ours}.proj.weight"] = (f"itc_head.{theirs}_proj.weight",)
        if itc_bias:
            out[f"{ours}.proj.bias"] = (f"itc_head.{theirs}_proj.bias",)
    out["visual_prompts.weight"] = ("pseudo_vision_token_pool",)
    out["textual_prompts.weight"] = ("pseudo_language_token_pool",)
    return out


def key_map(cfg: Config) -> dict[str, tuple[str, ...]]:
    """Our key -> the official key(s) it is made of (several are concatenated in order)."""
    text = {f"text.{k}": tuple(f"language_encoder.{s}" for s in v)
            for k, v in _bert_recipe(cfg.text_layers).items()}
    return {**_vision_map(cfg.vision_layers), **text, **_fusion_map(cfg.fusion_layers),
            **_heads_map(cfg.itc_bias)}


# ----------------------------------------------------------------------------- the configuration


def _count(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return 1 + max(found) if found else 0


def _need(state: dict, key: str, source) -> torch.Tensor:
    if key not in state:
        raise ConvertError(f"{source}: missing key {key!r}: not a PTUnifier or METER checkpoint "
                           "(or a damaged one)")
    return state[key]


def infer_config(state: dict, hp: dict, source="state_dict", **overrides) -> tuple[Config, list[str]]:
    """(Config, notes): the fields the tensors give, then `hp` (hyper_parameters config) or the
    official defaults for the rest, then `overrides`. Notes say where each came from."""
    conv = _need(state, "vision_encoder.visual.conv1.weight", source)
    words = _need(state, "language_encoder.embeddings.word_embeddings.weight", source)
    proj = _need(state, "multi_modal_language_proj.weight", source)
    grid = math.isqrt(_need(state, "vision_encoder.visual.positional_embedding", source).shape[0] - 1)
    pools = [state[k].shape[0] for k in ("pseudo_vision_token_pool", "pseudo_language_token_pool") if k in state]
    if len(set(pools)) > 1:
        raise ConvertError(f"{source}: the pools have {pools[0]} and {pools[1]} rows; this "
                           "project's Config has one pool_size for both")
    dec = state.get("mlm_head.decoder.weight")
    fields = dict(
        vision_width=conv.shape[0], patch_size=conv.shape[-1], image_size=grid * conv.shape[-1],
        vision_layers=_count(state, r"vision_encoder\.visual\.transformer\.resblocks\.(\d+)\."),
        vision_heads=conv.shape[0] // 64,  # the official ViT: width // 64 heads
        vision_mlp=_need(state, "vision_encoder.visual.transformer.resblocks.0.mlp.c_fc.weight", source).shape[0],
        vocab_size=words.shape[0], text_width=words.shape[1],
        text_layers=_count(state, r"language_encoder\.encoder\.layer\.(\d+)\."),
        text_mlp=_need(state, "language_encoder.encoder.layer.0.intermediate.dense.weight", source).shape[0],
        max_positions=state["language_encoder.embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state["language_encoder.embeddings.token_type_embeddings.weight"].shape[0],
        hidden_size=proj.shape[0],
        fusion_layers=_count(state, r"multi_modal_language_layers\.(\d+)\."),
        fusion_mlp=_need(state, "multi_modal_language_layers.0.intermediate.dense.weight", source).shape[0],
        pool_size=pools[0] if pools else 2048,
        tie_mlm_decoder=dec is not None and dec.shape == words.shape and torch.equal(dec, words),
        itc_bias="itc_head.vision_proj.bias" in state,
        embed_dim=state["itc_head.vision_proj.weight"].shape[0] if "itc_head.vision_proj.weight" in state
        else proj.shape[0])
    notes = [f"from the tensors: {', '.join(f'{k}={v}' for k, v in fields.items())}"]
    got = {k: hp[k] for k in DEFAULTS if k in hp}
    settings = {**DEFAULTS, **got}
    bert = "bert" in str(hp.get("tokenizer", "")) and "roberta" not in str(hp.get("tokenizer", ""))
    fields.update(
        text_heads=fields["text_width"] // 64, fusion_heads=hp.get("num_heads", fields["hidden_size"] // 64),
        k_visual=settings["num_pseudo_vision_tokens"], k_textual=settings["num_pseudo_langauge_tokens"],
        temperature=settings["cl_temp"], max_text_len=settings["max_text_len"],
        text_dropout=settings["drop_rate"], fusion_dropout=settings["drop_rate"],
        **(dict(pad_token_id=0, bos_token_id=101, eos_token_id=102, position_style="bert", text_ln_eps=1e-12)
           if bert else dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, position_style="roberta",
                             text_ln_eps=1e-5)))
    from_hp = [f"{k}={v}" for k, v in {**got, "num_heads": hp.get("num_heads")}.items() if v is not None]
    default = ["text_heads = width / 64"] + ["fusion_heads = width / 64"] * ("num_heads" not in hp)
    default += [f"{k}={v}" for k, v in DEFAULTS.items() if k not in got]
    default.append("BERT ids (101, 0, 102), eps 1e-12" if bert else "RoBERTa ids (0, 1, 2), eps 1e-5")
    notes.append(f"from hyper_parameters: {', '.join(from_hp) or 'nothing (the file has none)'}")
    notes.append(f"official defaults: {', '.join(default)}")
    if overrides:
        fields.update(overrides)
        notes.append(f"given: {overrides}")
    try:
        return Config(**fields), notes
    except ConfigError as err:
        raise ConvertError(f"{source}: the inferred configuration does not fit: {err}") from None


# ----------------------------------------------------------------------------- conversion


def rename_meter(state: dict) -> tuple[dict, bool]:
    """METER keys -> PTUnifier keys (same modules); (state, whether it was METER naming)."""
    if not any(k.startswith("vit_model.") for k in state):
        return state, False
    out = {}
    for key, value in state.items():
        for old, new in METER_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out, True


def convert_state(state: dict, hp: dict | None = None, source="state_dict", **overrides):
    """Official state dict (PTUnifier or METER naming) -> (PTUnifier model, task head state or {},
    notes). Pools and ITC heads absent from the file (METER) keep this project's initialisation."""
    state, meter = rename_meter(dict(state))
    cfg, notes = infer_config(state, hp or {}, source, **overrides)
    model = PTUnifier(cfg)
    ours = model.state_dict()
    used, fresh, loaded = set(), [], {}
    for dst, srcs in key_map(cfg).items():
        if not all(s in state for s in srcs):
            if dst.startswith(("itc_", "visual_prompts", "textual_prompts")):
                fresh.append(dst)
                continue
            missing = [s for s in srcs if s not in state]
            raise ConvertError(f"{source}: missing key {missing[0]!r} (for {dst})")
        value = torch.cat([state[s] for s in srcs]) if len(srcs) > 1 else state[srcs[0]]
        if tuple(value.shape) != tuple(ours[dst].shape):
            raise ConvertError(f"{source}: {srcs[0]} has shape {tuple(value.shape)}, the inferred "
                               f"model expects {tuple(ours[dst].shape)} for {dst}")
        loaded[dst] = value.float()
        used.update(srcs)
    if cfg.tie_mlm_decoder:
        loaded.pop("mlm_head.decoder.weight")
    model.load_state_dict({**ours, **loaded}, strict=True)
    head, used_head = classifier_head(state)
    used |= used_head
    unused = sorted(set(state) - used)
    if meter:
        notes.append("METER naming: renamed to PTUnifier's")
    if fresh:
        notes.append(f"not in the file, freshly initialised: {sorted({k.split('.')[0] for k in fresh})}")
    if head:
        notes.append(f"classifier head {head['name']} -> task/head ({head['fc2.weight'].shape[0]} outputs)")
    notes.append(f"unused keys ({len(unused)}): {unused}")
    return model, head, notes


def classifier_head(state: dict) -> tuple[dict, set]:
    """An official fine-tuning head Sequential(Linear, LayerNorm, GELU, Linear) -> our
    ClassifierHead keys (.0 -> fc1, .1 -> norm, .3 -> fc2), with its name; ({}, set()) if none."""
    for name in CLASSIFIER_HEADS:
        keys = {f"{ours}.{n}": f"{name}.{i}.{n}" for ours, i in (("fc1", 0), ("norm", 1), ("fc2", 3))
                for n in ("weight", "bias")}
        if all(k in state for k in keys.values()):
            return {"name": name, **{o: state[t].float() for o, t in keys.items()}}, set(keys.values())
    return {}, set()


def write_checkpoint(out, model: PTUnifier, head: dict, source: str, tokenizer: str | None) -> None:
    """Our checkpoint format (checkpoint.py): the model under model/; a classifier head under
    task/head. (for reading by hand: finetune.py starts a new head); the tokenizer recorded."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"task/head.{k}": v for k, v in head.items() if k != "name"})
    tensors, aliases = dedupe_shared(tensors)
    meta = dict(format=FORMAT, model_config=dataclasses.asdict(model.config),
                train_config=dict(preset="base", data="", tokenizer=tokenizer, converted_from=source),
                state=dict(step=0), optimizer_groups=[], scaler=None, aliases=aliases)
    atomic_save(Path(out), tensors, {"ptunifier": json.dumps(meta)})


def convert_file(path, out, tokenizer: str | None = None, **overrides) -> list[str]:
    """Convert one official checkpoint file to `out`; returns the notes to print."""
    state, hp = read_lightning(path)
    model, head, notes = convert_state(state, hp, source=str(path), **overrides)
    if tokenizer is not None and not Path(tokenizer).exists():
        raise ConvertError(f"--tokenizer {tokenizer}: no such file or folder")
    write_checkpoint(out, model, head, str(path), tokenizer)
    if tokenizer is None:
        notes.append("no --tokenizer: pass --tokenizer DIR to predict.py / finetune.py (the authors "
                     "used biomed_roberta_base), or convert again with --tokenizer")
    return notes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="official Lightning checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="our checkpoint to write (.safetensors)")
    parser.add_argument("--tokenizer", help="the tokenizer the authors trained with (recorded)")
    a = parser.parse_args(argv)
    try:
        notes = convert_file(a.checkpoint, a.out, a.tokenizer)
    except ConvertError as err:
        sys.exit(f"convert.py: {err}; nothing written")
    print("\n".join(notes) + f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
