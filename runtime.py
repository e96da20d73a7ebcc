"""What every training program shares: where it runs, its randomness, its signals, its optimiser step.

- `setup_runtime`: detect torchrun from its environment variables (NCCL on CUDA, gloo on CPU),
  pick the device and the autocast dtype; rank 0 (`print0`) prints and saves.
- seeding: `seed_everything` once (the same initial weights on every rank), `seed_step` before
  every step: the random state of a step (dropout) is a function of (seed, rank, step), so a
  resumed run draws exactly what the uninterrupted run drew, with no RNG state to carry.
- `StopSignal`: SIGTERM / SIGINT become a flag checked between steps (save, then exit 0);
  `SaveClock`: a checkpoint by wall time; `resume_point`: --resume (strict) and --resume auto.
- `launch_store`: a key space of its own for each launch of the workers, so that a group
  relaunched by `torchrun --max-restarts` does not read the keys of the group that failed.
- collectives: `any_rank` (every rank takes the same decision), `cleanup`.
- the schedule (paper 5.3): linear warm-up, then linear decay to 0, optionally after a plateau
  (`lr_factor`, `set_lr`).
- the guarded step both programs take (`guarded_step`): micro-batches accumulated (DDP all-reduces
  on the last only), then one read from the device (`step_verdict`) decides on every rank alike
  whether to apply the update or, when a loss was not finite on some rank, to drop the gradients
  and put the buffers back, so that a skipped step leaves the model exactly as it was.
- the pieces of a run both programs share: `wrap_ddp`, `write_run_config`, `save_on_rank0`.
- `dataclass_cli`: a flat command line generated from a run's config dataclass.
Nothing here imports another module of the project.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import inspect
import os
import random
import re
import signal
import time
import typing
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# The longest a rank waits in one collective or barrier: other ranks wait while rank 0 saves or
# evaluates (fine-tuning's validation generation can take longer than NCCL's 10-minute default).
COLLECTIVE_TIMEOUT = timedelta(hours=2)


# ----------------------------------------------------------------------------- where it runs

@dataclass
class Runtime:
    """Where this process runs: device, rank, world size, and the autocast / scaler choice."""
    device: torch.device
    rank: int
    world: int
    local_rank: int
    amp_dtype: torch.dtype | None  # bf16 or fp16 autocast on CUDA, None (fp32) on CPU

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """Mixed precision on CUDA (bf16 where supported), a no-op on the CPU."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def setup_runtime(device: str = "auto") -> Runtime:
    """Detect torchrun from its environment variables; NCCL on CUDA, gloo on CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"--device {device!r}: expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: no CUDA device is visible to torch {torch.__version__} (built for CUDA "
                         f"{torch.version.cuda or 'no CUDA: a CPU build'}); use --device cpu or auto")
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1:
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=COLLECTIVE_TIMEOUT))
        dist.init_process_group("nccl" if want_cuda else "gloo", store=launch_store(store, rank, world),
                                rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev, amp = torch.device("cpu"), None
    return Runtime(dev, rank, world, local_rank, amp)


def launch_store(store: dist.Store, rank: int, world: int) -> dist.Store:
    """`store` under a prefix that no earlier launch of the workers used: the key space of this
    launch's process group.

    Why: `torchrun --max-restarts N` keeps one store (MASTER_PORT) for every round of workers it
    launches, and `init_process_group` names its keys after the group ("default_pg/0/..."), the
    same in every round. A relaunched worker then finds the keys of the round that failed, reads a
    dead worker's address and gives up ("Gloo connectFullMesh failed ... Connection refused"; NCCL
    likewise, PyTorch issue #167288). TORCHELASTIC_RESTART_COUNT cannot name the round: each node's
    agent counts only its own restarts (PyTorch issue #135712). So rank 0 numbers the launch (a
    counter in the store) and sends the number to each other rank in answer to a ticket that rank
    has just drawn from its own counter, a key that no earlier launch can have answered.
    """
    store = dist.PrefixStore("ptunifier", store)  # our keys, apart from any other user of the store
    if rank == 0:
        launch = store.add("launches", 1)
        answered, deadline = set(), time.monotonic() + COLLECTIVE_TIMEOUT.total_seconds()
        while store.add(f"launch{launch}/joined", 0) < world - 1:  # every other rank got its answer
            for r in range(1, world):  # a ticket may be the last launch's: answering it is harmless
                ticket = store.add(f"rank{r}/tickets", 0)
                if ticket and (r, ticket) not in answered:
                    store.set(f"rank{r}/ticket{ticket}", str(launch))
                    answered.add((r, ticket))
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank 0: not every one of {world} ranks joined within {COLLECTIVE_TIMEOUT}")
            time.sleep(0.01)
    else:
        ticket = store.add(f"rank{rank}/tickets", 1)
        launch = int(store.get(f"rank{rank}/ticket{ticket}"))  # waits for rank 0's answer
        store.add(f"launch{launch}/joined", 1)
    return dist.PrefixStore(f"launch{launch}/", store)


def print0(rt: Runtime, *args) -> None:
    if rt.master:
        print(*args, flush=True)


def any_rank(flags: list[bool], rt: Runtime) -> list[bool]:
    """OR of per-rank flags, so every rank takes the same decision (skip a step, stop the run)."""
    t = torch.tensor([float(f) for f in flags], device=rt.device)
    if rt.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def barrier(rt: Runtime) -> None:
    if rt.world > 1:
        dist.barrier()


def cleanup(rt: Runtime) -> None:
    """Destroy the process group. Drop every DDP wrapper first: DDP is a reference cycle that holds
    the group, so it would otherwise be freed by a later garbage collection, possibly while the
    interpreter shuts down, where tearing down gloo's threads can abort the process."""
    if rt.world > 1 and dist.is_initialized():
        gc.collect()  # the dropped wrappers, while the group and the interpreter are still whole
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- randomness, signals

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_step(seed: int, rank: int, step: int) -> None:
    """The random state of a step (dropout) is a function of (seed, rank, step): ranks differ, and a
    resumed run draws exactly what the uninterrupted run drew, with no RNG state to carry."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


class SaveClock:
    """A save by wall time (--save-every-minutes): due once `minutes` have passed since the last
    checkpoint (0: never), so that a preempted run loses at most that much work whatever its step
    time. Each rank reads its own clock; `due()` rides the step's one read (`step_verdict`), so
    every rank saves at the same step, without a sync of its own."""

    def __init__(self, minutes: float):
        self.minutes, self.last = minutes, time.monotonic()

    def due(self) -> bool:
        return self.minutes > 0 and time.monotonic() - self.last >= 60 * self.minutes

    def restart(self) -> None:
        self.last = time.monotonic()


RESUME_MODES = (None, "strict", "auto")  # no --resume, a bare --resume, --resume auto


def resume_point(path: Path, mode: str | None, rt: Runtime) -> Path | None:
    """The checkpoint `path` when the run continues from it, else None (a fresh start).
    mode None: fresh; "strict" (a bare --resume): `path`, which must exist (its reader says so);
    "auto": `path` when it exists (else it says, first, that the run starts fresh), so that one
    command line serves the first launch and every relaunch. Every rank must see the same file:
    the run folder lives on a filesystem that all nodes share."""
    if mode is None:
        return None
    here = Path(path).is_file()
    somewhere, missing_somewhere = any_rank([here, not here], rt)
    if somewhere and missing_somewhere:
        raise SystemExit(f"{path} exists on some nodes but not on others: the run folder (--out) "
                         "must be on a filesystem that every node shares")
    if mode == "auto" and not somewhere:
        print0(rt, f"--resume auto: no checkpoint at {path}: starting fresh")
        return None
    return Path(path)


def check_resume_mode(mode: str | None) -> None:
    if mode not in RESUME_MODES:
        raise SystemExit(f"--resume {mode!r}: expected 'auto', or no value (strict)")


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked between steps, so the run saves and exits cleanly."""

    def __init__(self):
        self.received = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        """Give SIGTERM/SIGINT back to their previous handlers (a run may live inside a notebook)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- the optimiser step

def lr_factor(step: int, total: int, warmup: float, decay_from: float = 0.0) -> float:
    """Linear warm-up over the first `warmup` fraction of the steps, then linear decay to 0 (paper
    5.3); with `decay_from`, the rate holds at its peak until that fraction of the steps and decays
    linearly to 0 from there."""
    warm = max(1, int(round(warmup * total)))
    if step < warm:
        return (step + 1) / warm
    start = max(warm, int(round(decay_from * total)))
    if step < start:
        return 1.0
    return max(0.0, (total - step) / max(1, total - start))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group's learning rate = its base_lr x `factor` (the schedule's value at this step)."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor


def adamw(groups: list[dict], device: torch.device) -> torch.optim.AdamW:
    """AdamW as the paper sets it (betas 0.9 / 0.98, eps 1e-8) over parameter groups; each group
    keeps its rate as `base_lr`, which the schedule scales. The fused kernel on CUDA and on the
    CPU (faster there too: docs/NOTES.md 4.10)."""
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8, fused=device.type in ("cuda", "cpu"))


def snapshot_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the model's buffers (running estimates that a training forward updates in place),
    taken before a step so that a skipped step can put them back."""
    return [b.detach().clone() for b in model.buffers()]


def finish_step(model: nn.Module, optimizer, scaler, clip_grad: float, buffers: list[torch.Tensor],
                finite: bool) -> None:
    """The end of a guarded step. finite: unscale, clip the global gradient norm (clip_grad > 0),
    step AdamW through the fp16 scaler. Not finite (on some rank; every rank decides the same):
    drop the gradients and restore `buffers`, so the model is exactly as before the step."""
    if finite:
        scaler.unscale_(optimizer)
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
    else:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
    optimizer.zero_grad(set_to_none=True)


def step_verdict(losses: dict[str, torch.Tensor], flags: list[bool], rt: Runtime
                 ) -> tuple[bool, list[bool], dict[str, float]]:
    """What every rank decides at the end of a step, from one all-reduce and one read from the
    device (the step's only sync): (losses["loss"] was not finite on some rank, each host flag
    raised on some rank, each loss averaged over the ranks)."""
    host = torch.tensor([float(f) for f in flags], device=rt.device)                      # [F]
    means = [v.float()[None] / rt.world for v in losses.values()]                          # [1] each
    verdict = torch.cat([(~torch.isfinite(losses["loss"])).float()[None], host, *means])
    if rt.world > 1:
        dist.all_reduce(verdict)  # sums: a flag > 0 on any rank stays > 0
    values = verdict.tolist()
    raised = [v > 0 for v in values[:1 + len(flags)]]
    return raised[0], raised[1:], dict(zip(losses, values[1 + len(flags):]))


class Trainable(typing.Protocol):
    """What a guarded step updates: `model` (parameters, buffers), `runner` (the model as the step
    runs it: wrapped by DDP / torch.compile), AdamW, the fp16 scaler, `cfg.clip_grad`, `rt`."""
    model: nn.Module
    runner: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    cfg: typing.Any
    rt: Runtime


def guarded_step(run: Trainable, micro_batches: Iterable, accum: int,
                 forward: Callable[[nn.Module, typing.Any], dict[str, torch.Tensor]], flags: list[bool]
                 ) -> tuple[dict[str, torch.Tensor], bool, list[bool], dict[str, float]]:
    """One optimisation step over `accum` micro-batches: forward(runner, batch) -> losses ("loss" is
    minimised) and backward of loss / accum for each, DDP's all-reduce on the last only; then
    `step_verdict` and `finish_step`. Returns (the mean detached losses on this rank, the step was
    skipped, the host `flags` as every rank sees them, the losses averaged over the ranks)."""
    rt, buffers, losses = run.rt, snapshot_buffers(run.model), None
    for i, batch in zip(range(accum), micro_batches):
        defer_sync = rt.world > 1 and i < accum - 1
        with run.runner.no_sync() if defer_sync else nullcontext(), rt.autocast():
            out = forward(run.runner, batch)
        run.scaler.scale(out["loss"] / accum).backward()
        out = {k: v.detach() / accum for k, v in out.items()}
        losses = out if losses is None else {k: v + losses[k] for k, v in out.items()}
    bad, raised, means = step_verdict(losses, flags, rt)
    finish_step(run.model, run.optimizer, run.scaler, run.cfg.clip_grad, buffers, finite=not bad)
    return losses, bad, raised, means


# ----------------------------------------------------------------------------- a run's folder

def wrap_ddp(module: nn.Module, rt: Runtime, **options) -> nn.Module:
    """`module` under DistributedDataParallel when there are several processes, else itself."""
    if rt.world == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None, **options)


def write_run_config(out: Path, rt: Runtime, **sections) -> None:
    """Rank 0 creates the run folder and writes its resolved configuration (config.json)."""
    if rt.master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(sections, indent=2))


def save_on_rank0(write: Callable[[], None], rt: Runtime, clock: "SaveClock") -> None:
    """A checkpoint: rank 0 writes it while the others wait; the wall-time clock starts again."""
    if rt.master:
        write()
    barrier(rt)
    clock.restart()


# ----------------------------------------------------------------------------- command line

def field_comments(cls) -> dict[str, str]:
    """The comment after each field of a dataclass's source (and comment-only lines below it)."""
    comments, last = {}, None
    for line in inspect.getsource(cls).splitlines():
        field = re.match(r"\s+(\w+): [^#]*?(?:#\s*(.*))?$", line)
        if field and "=" in line:
            last = field.group(1)
            comments[last] = field.group(2) or ""
        elif last and re.match(r"\s+#", line):
            comments[last] = (comments[last] + " " + line.strip().lstrip("#").strip()).strip()
        else:
            last = None
    return comments


def dataclass_cli(cls, argv, description: str, helps: dict, required=(), bare=None):
    """A flat CLI generated from a run's config dataclass: every field is a flag whose help is
    `helps[field]` or else the field's comment in the source; unknown flags are an error; a field
    in `bare` may be given without a value, and then takes `bare[field]` (`--resume` alone is
    `--resume strict`). Returns `cls(...).resolved()`.

    A field left at None means "not set": `resolved()` takes it from the recipe. The command line is
    read twice: once to learn the flags that choose the recipe (--preset, --task, --init), then
    with the resolved values as the defaults, so that --help prints the values the run would use.
    """
    hints = typing.get_type_hints(cls)
    helps = {**field_comments(cls), **helps}

    def parser(defaults: dict, full: bool) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(description=description, add_help=full,
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
            text = helps.get(f.name) or "-"
            if kind is bool:  # a bool that the recipe may set takes --flag / --no-flag
                optional = type(None) in typing.get_args(hints[f.name])
                p.add_argument(flag, action=argparse.BooleanOptionalAction if optional else "store_true",
                               default=defaults[f.name], help=text)
            elif f.name in (bare or {}):
                p.add_argument(flag, type=kind, nargs="?", const=bare[f.name], default=defaults[f.name],
                               help=text)
            else:
                p.add_argument(flag, type=kind, default=defaults[f.name], help=text,
                               required=full and f.name in required)
        return p

    first, _ = parser(dataclasses.asdict(cls()), full=False).parse_known_args(argv)
    try:
        defaults = dataclasses.asdict(cls(**vars(first)).resolved())
    except (SystemExit, ValueError, KeyError):  # e.g. no --task yet: show the unresolved defaults
        defaults = vars(first)
    return cls(**vars(parser(defaults, full=True).parse_args(argv))).resolved()
