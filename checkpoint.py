"""The checkpoint contract: one safetensors file, written atomically, never unpickled.

A checkpoint holds every tensor of the model ("model/<name>"), of a fine-tune's task modules
("task/<module>.<name>") and of the optimizer ("optim/<param index>/<key>") in safetensors format;
everything else sits in the file's JSON metadata: the model Config, the training config, the loop
state (step, data position, skipped steps; a fine-tune's epoch history), the optimizer's
hyper-parameters and the GradScaler state. The learning-rate schedule is a pure function of the
step and the training config, and the random state of a step is a function of (seed, rank, step)
(the loops reseed every step), so the step restores both exactly.

Writes go to a temporary file beside the target, are fsync'ed, then renamed over it: a crash, a
SIGKILL or a full disk during a write leaves the previous checkpoint untouched. A failed write
removes its temporary file; one left by a writer killed with SIGKILL is removed by the next save.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import Config, PTUnifier

FORMAT = "ptunifier-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that does not match the model or run asking for it."""


def dedupe_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied MLM decoder / word embeddings):
    keep the first name of each shared tensor and record the others as aliases."""
    seen, unique, aliases = {}, {}, {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.detach().contiguous().cpu()
    return unique, aliases


def atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (temp file + fsync + rename); on failure remove the temp."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a writer that was SIGKILLed
        stale.unlink(missing_ok=True)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; "
                                  f"the previous checkpoint (if any) is intact") from e
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path, model, optimizer, scaler, state: dict, model_cfg, train_cfg,
                    task_modules: dict | None = None, finetune: dict | None = None) -> None:
    """The PTUnifier `model` under "model/", a fine-tune's `task_modules` under "task/<name>.", the
    optimizer (None: none) under "optim/"; `finetune`: what a fine-tuned checkpoint says of its task."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    for name, module in (task_modules or {}).items():
        tensors.update({f"task/{name}.{k}": v for k, v in module.state_dict().items()})
    opt = optimizer.state_dict() if optimizer is not None else {"state": {}, "param_groups": []}
    for idx, slots in opt["state"].items():
        for key, value in slots.items():
            tensors[f"optim/{idx}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors, aliases = dedupe_shared(tensors)
    meta = dict(format=FORMAT, model_config=dataclasses.asdict(model_cfg),
                train_config=dataclasses.asdict(train_cfg) if train_cfg is not None else None,
                state=state, optimizer_groups=opt["param_groups"],
                scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                aliases=aliases, **({"finetune": finetune} if finetune is not None else {}))
    atomic_save(Path(path), tensors, {"ptunifier": json.dumps(meta)})


def read_checkpoint(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a checkpoint file, with a clear error for anything that is not one."""
    return _read(path, with_tensors=True)


def read_metadata(path) -> dict:
    """The metadata of a checkpoint file (its header only; the tensors are not read)."""
    return _read(path, with_tensors=False)[0]


def _read(path, with_tensors: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size < 8:
        raise CheckpointError(f"checkpoint {path} is empty or truncated ({path.stat().st_size} bytes)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated, or another "
                              f"format such as a pickle, which is never loaded): {e}") from e
    if "ptunifier" not in raw:
        raise CheckpointError(f"{path} is a safetensors file but not a PTUnifier checkpoint "
                              f"(no 'ptunifier' metadata); for Hugging Face encoders use --vision-init/--text-init")
    meta = json.loads(raw["ptunifier"])
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")
    for alias, source in meta["aliases"].items() if with_tensors else ():
        tensors[alias] = tensors[source]
    return meta, tensors


def config_mismatch(saved: dict, current: dict, fields=None) -> list[str]:
    """Human-readable list of fields whose values differ between a saved and a current config."""
    names = fields if fields is not None else sorted(set(saved) | set(current))
    return [f"{n}: checkpoint {saved.get(n)!r} != current {current.get(n)!r}"
            for n in names if saved.get(n) != current.get(n)]


def load_model_state(path, meta: dict, tensors: dict[str, torch.Tensor], model) -> None:
    diff = config_mismatch(meta["model_config"], dataclasses.asdict(model.config))
    if diff:
        raise CheckpointError(f"{path} was made for a different model configuration:\n  " + "\n  ".join(diff))
    state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    model.load_state_dict(state, strict=True)


def load_pretrained(path):
    """(PTUnifier rebuilt from the checkpoint's own Config with its weights, metadata, tensors)."""
    meta, tensors = read_checkpoint(path)
    model = PTUnifier(Config(**meta["model_config"]))
    load_model_state(path, meta, tensors, model)
    return model, meta, tensors


# Training-config fields that must not change when a run resumes (they define the data stream).
RESUME_FIELDS = ("preset", "batch_size", "seed", "data", "mlm_prob")


def load_checkpoint(path, model, optimizer, scaler, expect_train=None) -> dict:
    """Restore model, optimizer and scaler from `path` for --resume; returns the loop state."""
    meta, tensors = read_checkpoint(path)
    check_resume(path, meta, model.config, expect_train, RESUME_FIELDS)
    load_model_state(path, meta, tensors, model)
    load_optimizer_state(meta, tensors, optimizer, scaler)
    return meta["state"]


def check_resume(path, meta: dict, model_cfg, run_cfg, fields) -> None:
    """A resumed run builds the same model and reads the same data stream: one error names every
    field of the model Config, and of the run config's `fields`, that differs from the checkpoint's."""
    diff = config_mismatch(meta["model_config"], dataclasses.asdict(model_cfg))
    if run_cfg is not None and meta["train_config"] is not None:
        diff = config_mismatch(meta["train_config"], dataclasses.asdict(run_cfg), fields) + diff
    if diff:
        raise CheckpointError(f"cannot resume from {path}: the run's settings changed:\n  " + "\n  ".join(diff))


def load_optimizer_state(meta: dict, tensors: dict[str, torch.Tensor], optimizer, scaler) -> None:
    slots: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, idx, key = k.split("/", 2)
            slots.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": slots, "param_groups": meta["optimizer_groups"]})
    if meta["scaler"] is not None and scaler is not None:
        scaler.load_state_dict(meta["scaler"])
