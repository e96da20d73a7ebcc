"""Pre-training PTUnifier: MLM + ITM + ITC over prompt-completed inputs (paper section 3.3, Eq. 5-10).

    python train.py                                   # tiny preset, synthetic benchmark, CPU, < 10 min
    torchrun --nproc_per_node=8 train.py --preset base --data data/pretrain \
        --vision-init weights/clip-vit-base-patch16 --text-init weights/roberta-base

One optimisation step runs four fusion passes over a batch of B image-text pairs:
  1. MLM  (Eq. 5): masked text + its image        -> predict the masked tokens from the text stream
  2. ITM  (Eq. 6): text + its image or another one -> matched or not, from the joint feature
  3. image-only  : image + textual prompts (Eq. 3-4) -> ITC image embedding
  4. text-only   : text + visual prompts  (Eq. 3-4) -> ITC text embedding; Eq. 7-10 contrast 3 vs 4
The ViT has no dropout, so the true images' ViT output is computed once and reused by passes 1-3
(`PretrainStep.forward`); where the text encoder has no dropout either (the tiny preset), the true
texts' encoding is computed once for passes 2 and 4. `reuse=False` gives the naive step (every
pass encodes its inputs), kept for the equivalence test and `bench.py reuse`.

From scratch (the tiny preset), the run starts with passes 3-4 only (ITC alone, "align before
fuse"): with MLM from the first step, the pooled [CLS] features that ITC and ITM read stay identical
across the batch and both losses sit at chance (ln B, ln 2) for the whole run; after an ITC-only
start they fall (README, "Learning from scratch"). When ITC leaves chance varies from run to run,
so the start ends once a moving average of the ITC loss is `itc_escape` nats below ln B, and after
`itc_warmup` of the steps at the latest.

Everything about a run lives in its folder (--out): config.json (resolved configuration),
metrics.jsonl (one line per logged step), checkpoint.safetensors (model, optimizer, scaler, step and
data position, written atomically; `--resume` continues exactly from it: the random state of a step
is a function of (seed, rank, step) and the data stream of (seed, epoch, position), so the step and
the data position restore them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoint import load_checkpoint, save_checkpoint
from data import PretrainDataset, SkipTracker, Tokenizer, locate_tokenizer, make_train_stream
from losses import LossParts, LossWeights, itc_loss, itm_loss, mlm_loss, total_loss
from model import (PRESETS, Config, PTUnifier, hf_text_fields, hf_vision_fields,
                   restore_running_statistics, save_running_statistics)

COLLECTIVE_TIMEOUT = timedelta(hours=2)  # longest a rank waits in one collective or barrier

# Training defaults per model preset. The paper's learning rates (1e-5 encoders, 5e-5 the rest) are
# for pre-trained encoders; the tiny preset trains from scratch on synthetic data and needs more.
TRAIN_DEFAULTS = {
    "tiny": dict(steps=900, batch_size=64, lr_encoder=5e-4, lr_other=5e-4, lr_temperature=5e-3,
                 warmup=0.05, text_unit="text", itc_warmup=0.5, itc_escape=0.2),
    "base": dict(steps=100_000, batch_size=256, lr_encoder=1e-5, lr_other=5e-5, lr_temperature=5e-5,
                 warmup=0.1, text_unit="sentence", itc_warmup=0.0, itc_escape=0.0),
}


@dataclass
class TrainConfig:
    """Everything that defines a pre-training run besides the architecture (saved in each checkpoint)."""
    data: str = "data/synth/pretrain"  # task folder with manifest.jsonl + meta.json (task "pretrain")
    out: str = "runs/pretrain"         # run folder: config.json, metrics.jsonl, checkpoint.safetensors
    preset: str = "tiny"               # model preset in model.PRESETS
    tokenizer: str = ""                # tokenizer.json / folder; default: beside the data, or --text-init
    vision_init: str = ""              # HF CLIP (vision) folder to initialise the ViT from
    text_init: str = ""                # HF RoBERTa/BERT folder to initialise the text encoder from
    steps: int = 0                     # optimisation steps (0: the preset's default)
    batch_size: int = 0                # global batch per optimisation step (0: preset default)
    micro_batch: int = 0               # per-process batch per forward; accumulation fills the rest
    lr_encoder: float = 0.0            # ViT and text encoder (0: preset default)
    lr_other: float = 0.0              # fusion, projections, prompt pools, heads (0: preset default)
    lr_temperature: float = 0.0        # a learnable ITC temperature (0: preset default; tiny 5e-3)
    weight_decay: float = 0.01
    warmup: float = -1.0               # fraction of steps with linear warm-up (-1: preset default)
    clip_grad: float = 1.0             # max global gradient norm (0: off)
    mlm_weight: float = 1.0            # loss weights, official config: MLM 1, ITM 0.5, ITC 0.1
    itm_weight: float = 0.5
    itc_weight: float = 0.1
    itc_warmup: float = -1.0           # most steps at the start trained on ITC alone, as a fraction
                                       # (-1: the preset's; tiny 0.5, base 0)
    itc_escape: float = -1.0           # the ITC-only start ends once the ITC moving average is this
                                       # many nats below ln B (0: never early; -1: preset's, tiny 0.2)
    mlm_prob: float = 0.15
    text_unit: str = ""                # "sentence" (official: one random sentence) | "text" (one
                                       # whole text); "": the preset's (tiny: text, base: sentence)
    image_size: int = 0                # 0: the preset's
    max_text_len: int = 0              # 0: the preset's
    workers: int = -1                  # DataLoader workers per rank (-1: 1 on CPU, 8 on CUDA)
    seed: int = 0
    log_every: int = 10
    save_every: int = 200              # steps between checkpoints (also saved at the end and on SIGTERM)
    max_bad_steps: int = 20            # consecutive non-finite losses before the run stops
    max_bad_images: float = 0.01       # fraction of unreadable images in the split before the run stops
    eval_batch: int = 128
    device: str = "auto"               # auto | cpu | cuda
    compile: bool = False              # torch.compile the step (GPU)
    resume: bool = False               # continue from out/checkpoint.safetensors

    def resolved(self) -> "TrainConfig":
        """Fill the preset-dependent zeros with the preset's defaults."""
        d = TRAIN_DEFAULTS.get(self.preset, TRAIN_DEFAULTS["base"])
        pick = lambda v, key: v if v else d[key]  # noqa: E731  (0 / "" = preset's)
        fraction = lambda v, key: v if v >= 0 else d[key]  # noqa: E731  (-1 = preset's; 0 is valid)
        return dataclasses.replace(
            self, steps=pick(self.steps, "steps"), batch_size=pick(self.batch_size, "batch_size"),
            lr_encoder=pick(self.lr_encoder, "lr_encoder"), lr_other=pick(self.lr_other, "lr_other"),
            lr_temperature=pick(self.lr_temperature, "lr_temperature"),
            text_unit=pick(self.text_unit, "text_unit"), warmup=fraction(self.warmup, "warmup"),
            itc_warmup=fraction(self.itc_warmup, "itc_warmup"),
            itc_escape=fraction(self.itc_escape, "itc_escape"))

    def itc_only_steps(self) -> int:
        """The longest ITC-only start, in steps (resolved configs only)."""
        return round(self.itc_warmup * self.steps)


@dataclass
class StepOutput:
    """What one pre-training step returns: the losses that ran (MLM and ITM are None in an
    ITC-only step), their weighted sum (Eq. 10), and the prompts chosen (for usage statistics
    and the gradient test)."""
    losses: LossParts
    total: torch.Tensor
    textual_prompts: torch.Tensor  # [B, k_t] textual-pool entries chosen for the image-only pass
    visual_prompts: torch.Tensor   # [B, k_v] visual-pool entries chosen for the text-only pass


class PretrainStep(nn.Module):
    """The four passes of one pre-training step as one module, so DDP wraps a single forward."""

    def __init__(self, model: PTUnifier, weights: LossWeights, reuse: bool = True):
        super().__init__()
        self.model, self.weights, self.reuse = model, weights, reuse

    def forward(self, batch, itc_only: bool = False) -> StepOutput:
        m = self.model
        if self.reuse:  # one ViT pass over the B true images: [B, 1+N, D_v] and query [B, D_v]
            states, query = m.encode_image(batch.pixel_values, return_query=True)
        # Without dropout the true texts encode the same in passes 2 and 4: [B, L, D_t], [B, D_t].
        reuse_text = self.reuse and not itc_only and (m.config.text_dropout == 0 or not m.training)
        if reuse_text:
            words, words_query = m.encode_text(batch.input_ids, batch.attention_mask, return_query=True)

        def image(rows=None) -> dict:
            """Image inputs of a fusion pass (rows [B] of the batch's images, or all): rows of the
            shared ViT output, or (naive step) the raw pixels, so that every pass runs the ViT again.
            index_select, not states[rows]: its backward adds duplicated rows in index order, where
            advanced indexing accumulates them with parallel atomic adds on the CPU (last bits then
            differ from run to run)."""
            if self.reuse:
                if rows is None:
                    return dict(image_states=states, image_query=query)
                return dict(image_states=states.index_select(0, rows), image_query=query.index_select(0, rows))
            return dict(pixel_values=batch.pixel_values if rows is None else batch.pixel_values[rows])

        def text() -> dict:
            """Text inputs of passes 2 and 4: the shared encoding, or the ids (encoded again)."""
            if reuse_text:
                return dict(text_states=words, text_query=words_query, attention_mask=batch.attention_mask)
            return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

        l_mlm = l_itm = None
        if not itc_only:
            # 1. MLM (Eq. 5): masked text + its image; the head runs only on masked positions.
            out = m(input_ids=batch.mlm_input_ids, attention_mask=batch.attention_mask, **image())
            masked = batch.mlm_labels != -100                                    # [B, L]
            l_mlm = mlm_loss(m.mlm_head(out.text[masked]), batch.mlm_labels[masked])

            # 2. ITM (Eq. 6): text i with image itm_image_index[i] (itself or another batch image).
            out = m(**text(), **image(batch.itm_image_index))
            l_itm = itm_loss(m.itm_head(out.joint), batch.itm_labels)

        # 3-4. ITC (Eq. 7-9): image-only pass (textual prompts) against text-only pass (visual prompts).
        image_only = m(**image())
        text_only = m(**text())
        l_itc = itc_loss(m.itc_image(image_only.joint), m.itc_text(text_only.joint), m.logit_scale())

        parts = LossParts(l_mlm, l_itm, l_itc)
        return StepOutput(parts, total_loss(parts, self.weights),                # Eq. 10
                          image_only.text_prompt_indices, text_only.image_prompt_indices)


# ----------------------------------------------------------------------------- optimisation

def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over the first `warmup` fraction of steps, then linear decay to 0 (paper 5.3)."""
    warm = max(1, int(round(warmup * total)))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Scale every group's base_lr by the schedule at `step`; returns the factor."""
    f = lr_factor(step, cfg.steps, cfg.warmup)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * f
    return f


def make_optimizer(model: PTUnifier, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (paper 5.3) over the model's groups: encoders at lr_encoder, a learnable temperature at
    lr_temperature, the rest at lr_other, no decay on biases, norms, embeddings and prompt pools
    (decay would pull the pool entries that a batch does not select towards zero); `base_lr` is
    what the schedule scales."""
    groups = model.param_groups(cfg.lr_encoder, cfg.lr_other, cfg.weight_decay, cfg.lr_temperature)
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr_other, betas=(0.9, 0.98), eps=1e-8,
                             fused=device.type == "cuda")


# ----------------------------------------------------------------------------- environment

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


def setup_runtime(device: str = "auto") -> Runtime:
    """Detect torchrun from its environment variables; NCCL on CUDA, gloo on CPU."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1:  # other ranks wait at a barrier while rank 0 saves or evaluates (fine-tuning's
        # val generation can take longer than NCCL's 10-minute default), hence the long timeout
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev, amp = torch.device("cpu"), None
    return Runtime(dev, rank, world, local_rank, amp)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_step(seed: int, rank: int, step: int) -> None:
    """The random state of a step (dropout) is a function of (seed, rank, step): ranks differ, and a
    resumed run draws exactly what the uninterrupted run drew, with no RNG state to carry."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def print0(rt: Runtime, *args) -> None:
    if rt.master:
        print(*args, flush=True)


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked between steps, so the run saves and exits cleanly."""

    def __init__(self):
        self.received = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        """Give SIGTERM/SIGINT back to their previous handlers (train() may run inside a notebook)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def any_rank(flags: list[bool], rt: Runtime) -> list[bool]:
    """OR of per-rank flags, so every rank takes the same decision (skip a step, stop the run)."""
    t = torch.tensor([float(f) for f in flags], device=rt.device)
    if rt.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


# ----------------------------------------------------------------------------- building a run

def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> PTUnifier:
    """The model config: the preset, whose encoder fields give way to those of the HF folders
    given, with the vocabulary and special ids of the tokenizer; then the HF weights."""
    preset = dataclasses.asdict(PRESETS[cfg.preset])
    overrides = dict(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                     bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    if cfg.image_size:
        overrides["image_size"] = cfg.image_size
    if cfg.max_text_len:
        overrides["max_text_len"] = cfg.max_text_len
    if cfg.vision_init or cfg.text_init:
        from_folders = {"tie_mlm_decoder"}  # from_hf ties the decoder when the widths allow it
        if cfg.vision_init:
            from_folders |= set(hf_vision_fields(cfg.vision_init))
        if cfg.text_init:
            from_folders |= set(hf_text_fields(cfg.text_init, with_special_ids=True))
        rest = {k: v for k, v in preset.items() if k not in from_folders}
        mcfg = Config.from_hf(vision=cfg.vision_init or None, text=cfg.text_init or None,
                              **{**rest, **overrides})
    else:
        mcfg = Config(**{**preset, **overrides})
    model = PTUnifier(mcfg)
    if cfg.vision_init or cfg.text_init:
        model.load_hf_encoders(vision=cfg.vision_init or None, text=cfg.text_init or None)
    return model


def ensure_synthetic(cfg: TrainConfig, rt: Runtime) -> None:
    """The default run creates the synthetic benchmark when it is missing (rank 0 only)."""
    default = TrainConfig().data
    if cfg.data != default or (Path(cfg.data) / "manifest.jsonl").exists():
        return
    if rt.master:
        import synth
        print0(rt, f"creating the synthetic benchmark in {Path(default).parent} ...")
        synth.main(["--out", str(Path(default).parent)])
    if rt.world > 1:
        dist.barrier()


def dataclass_cli(cls, argv, description: str, helps: dict, required=()):
    """A flat CLI generated from a config dataclass: every field is a flag, with its help from
    `helps`; unknown flags are an error. Returns the filled dataclass."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=helps.get(f.name))
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            p.add_argument(flag, type=kind, default=f.default, help=helps.get(f.name, " "),
                           required=f.name in required)
    return cls(**vars(p.parse_args(argv)))


def parse_args(argv=None) -> TrainConfig:
    return dataclass_cli(TrainConfig, argv, __doc__.split("\n")[0], {
        "micro_batch": "per-process batch per forward; lower it (32, 16, 8) if you run out of memory",
        "workers": "DataLoader workers per process; 0 loads in the main process",
        "resume": "continue exactly from OUT/checkpoint.safetensors",
        "compile": "torch.compile the model (CUDA; slow to start, faster steps)",
        "itc_warmup": "most steps, as a fraction, at the start that train ITC alone (-1: preset's; tiny 0.5, "
                      "base 0); lets a from-scratch model align before MLM and ITM join",
        "itc_escape": "MLM and ITM join as soon as the ITC moving average is this many nats below ln B "
                      "(chance); 0: the ITC-only start runs all its steps (-1: preset's; tiny 0.2)",
        "text_unit": "pre-training text per access: 'sentence' (official) or 'text' (a whole text); "
                     "'' takes the preset's (tiny: text, base: sentence)",
    })


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig) -> dict:
    rt = setup_runtime(cfg.device)
    cfg = cfg.resolved()
    out = Path(cfg.out)
    ensure_synthetic(cfg, rt)
    seed_everything(cfg.seed)  # the same initial weights on every rank

    tokenizer = Tokenizer.load(locate_tokenizer(cfg.data, cfg.tokenizer, cfg.text_init))
    model = build_model(cfg, tokenizer).to(rt.device)
    mcfg = model.config
    if cfg.workers < 0:
        cfg = dataclasses.replace(cfg, workers=8 if rt.device.type == "cuda" else 1)
    micro = cfg.micro_batch or cfg.batch_size // rt.world
    accum = cfg.batch_size // (micro * rt.world)
    if accum < 1 or accum * micro * rt.world != cfg.batch_size:
        raise SystemExit(f"--batch-size {cfg.batch_size} must be a multiple of micro batch {micro} "
                         f"x {rt.world} processes")

    dataset = PretrainDataset(cfg.data, "train", tokenizer, mcfg.image_size, mcfg.max_text_len,
                              train=True, mlm_prob=cfg.mlm_prob, seed=cfg.seed,
                              text_unit=cfg.text_unit)
    optimizer = make_optimizer(model, cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    step_module = PretrainStep(model, LossWeights(cfg.mlm_weight, cfg.itm_weight, cfg.itc_weight))
    runner = step_module
    if rt.world > 1:
        runner = DistributedDataParallel(step_module, device_ids=[rt.local_rank] if rt.device.type == "cuda"
                                         else None, gradient_as_bucket_view=True, bucket_cap_mb=100,
                                         find_unused_parameters=cfg.itc_warmup > 0)
    if cfg.compile:
        runner = torch.compile(runner)

    chance = math.log(micro * rt.world)  # ITC at chance: ln of the columns of one micro-batch
    state = dict(step=0, epoch=0, batch_in_epoch=0, bad_steps=0, skipped_steps=0,
                 itc_only_until=cfg.itc_only_steps(), itc_average=chance)
    if cfg.resume:
        state.update(load_checkpoint(out / "checkpoint.safetensors", model, optimizer, scaler, expect_train=cfg))
    if rt.master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(
            dict(train=dataclasses.asdict(cfg), model=dataclasses.asdict(mcfg), world_size=rt.world,
                 micro_batch=micro, grad_accum=accum), indent=2))
        print0(rt, f"model {cfg.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
                   f"{len(dataset)} training pairs; global batch {cfg.batch_size} = {rt.world} x {micro} "
                   f"x {accum} accumulation; {cfg.steps} steps on {rt.device}")

    stop = StopSignal()
    log = open(out / "metrics.jsonl", "a") if rt.master else None
    try:
        usage = PromptUsage(mcfg.pool_size, rt.device)
        bad_images = SkipTracker(len(dataset) // rt.world, cfg.max_bad_images, "train")  # this rank's shard
        bar = tqdm(total=cfg.steps, initial=state["step"], disable=not rt.master, dynamic_ncols=True)
        batches = micro_batches(dataset, micro, cfg, state)
        t_last, samples_since = time.perf_counter(), 0
        model.train()
        while state["step"] < cfg.steps:
            lr_scale = set_lr(optimizer, state["step"], cfg)
            seed_step(cfg.seed, rt.rank, state["step"])
            itc_only = state["step"] < state["itc_only_until"]
            statistics = save_running_statistics(model)
            running, n_samples = accumulate_gradients(runner, batches, accum, scaler, rt, bad_images, usage,
                                                      itc_only)
            bad, stopping = any_rank([not torch.isfinite(running['loss']).item(), stop.received is not None], rt)
            if bad:  # the model stays as it was: no update, running estimates restored
                optimizer.zero_grad(set_to_none=True)
                restore_running_statistics(model, statistics)
                state["bad_steps"] += 1
                state["skipped_steps"] += 1
                if state["bad_steps"] >= cfg.max_bad_steps:
                    _save(out, model, optimizer, scaler, state, mcfg, cfg, rt)
                    raise SystemExit(f"{state['bad_steps']} consecutive steps had a non-finite loss (last at step "
                                     f"{state['step']}); the parameters from before the first one are saved in "
                                     f"{out / 'checkpoint.safetensors'}. Lower the learning rate or check the data.")
            else:
                state["bad_steps"] = 0
                apply_update(model, optimizer, scaler, cfg.clip_grad)
            state["step"] += 1
            if itc_only and not bad and cfg.itc_escape > 0:
                if end_itc_start(state, mean_over_ranks(running["itc"], rt), chance, cfg.itc_escape):
                    print0(rt, f"\nstep {state['step']}: ITC left chance (moving average "
                               f"{state['itc_average']:.3f} <= ln {micro * rt.world} - {cfg.itc_escape}); "
                               "MLM and ITM join")
                elif state["step"] == state["itc_only_until"]:
                    print0(rt, f"\nwarning: the ITC-only start ended at step {state['step']} with ITC still "
                               f"near chance (moving average {state['itc_average']:.3f}, ln {micro * rt.world} "
                               f"= {chance:.3f}); retrieval will stay near chance (try another --seed)")
            samples_since += n_samples * rt.world
            bar.update(1)
            if state["step"] % cfg.log_every == 0 or state["step"] == cfg.steps:
                now = time.perf_counter()
                row = dict(step=state["step"], **{k: v.item() for k, v in running.items()},
                           lr=cfg.lr_other * lr_scale, samples_per_s=samples_since / (now - t_last),
                           skipped_steps=state["skipped_steps"])
                t_last, samples_since = now, 0
                bar.set_postfix(**{k: f"{row[k]:.3f}" for k in ("loss", "mlm", "itm", "itc") if k in row},
                                sps=f"{row['samples_per_s']:.0f}")
                if log:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
            if stopping:
                _save(out, model, optimizer, scaler, state, mcfg, cfg, rt)
                bar.close()
                print0(rt, f"stopped by {stop.received or 'a signal on another rank'} at step {state['step']}; "
                           f"checkpoint saved; continue with --resume")
                cleanup(rt)
                return dict(stopped=True, step=state["step"])
            if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
                _save(out, model, optimizer, scaler, state, mcfg, cfg, rt)
        bar.close()
        if rt.master or bad_images.paths:  # each rank reads (and reports) its own shard
            print(f"[rank {rt.rank}] " * (rt.world > 1) + skipped_report(bad_images), flush=True)

        result = dict(step=state["step"], skipped_steps=state["skipped_steps"],
                      itc_only_steps=min(state["itc_only_until"], cfg.steps), **usage.summary())
        print0(rt, "prompts selected at least once during training (this process, this session): "
                   f"{result['train_textual_prompts_used']} textual and {result['train_visual_prompts_used']} "
                   f"visual of {mcfg.pool_size} each")
        if rt.master:
            result.update(final_evaluation(model, tokenizer, cfg, rt))
            (out / "result.json").write_text(json.dumps(result, indent=2))
        cleanup(rt)
        return result
    finally:
        stop.restore()
        if log:
            log.close()


def accumulate_gradients(runner, batches, accum: int, scaler, rt: Runtime, bad_images: SkipTracker,
                         usage: "PromptUsage", itc_only: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """Forward and backward over `accum` micro-batches (DDP syncs gradients on the last one only);
    returns the mean detached losses that ran and the number of samples seen."""
    running, n_samples = None, 0
    for i in range(accum):
        batch = next(batches)
        bad_images.update(batch)
        while len(batch) == 0:  # every image of this micro-batch was unreadable: take the next
            batch = next(batches)
            bad_images.update(batch)
        batch = batch.to(rt.device, non_blocking=True)
        defer_sync = rt.world > 1 and i < accum - 1
        with (runner.no_sync() if defer_sync else nullcontext()), \
                torch.autocast(rt.device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None):
            out = runner(batch, itc_only)
        scaler.scale(out.total / accum).backward()
        running = step_mean(running, out, accum)
        usage.add(out)
        n_samples += len(batch.ids)
    return running, n_samples


def end_itc_start(state: dict, itc: float, chance: float, margin: float, decay: float = 0.9) -> bool:
    """Adaptive end of the ITC-only start, after each of its steps: the moving average
    a <- decay a + (1 - decay) ITC starts at chance (ln B); once a <= ln B - margin, the start ends
    with the step just taken. The average lives in `state`, so a resumed run decides the same."""
    state["itc_average"] = decay * state["itc_average"] + (1 - decay) * itc
    if state["itc_average"] <= chance - margin:
        state["itc_only_until"] = state["step"]
        return True
    return False


def mean_over_ranks(value: torch.Tensor, rt: Runtime) -> float:
    """The mean of a scalar over all ranks, on the host (every rank gets the same float)."""
    value = value.detach().float().clone()
    if rt.world > 1:
        dist.all_reduce(value)
        value /= rt.world
    return value.item()


def apply_update(model: nn.Module, optimizer, scaler, clip_grad: float) -> None:
    """Unscale, clip the global gradient norm, step AdamW (through the fp16 scaler), zero grads."""
    scaler.unscale_(optimizer)
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def step_mean(acc: dict | None, out: StepOutput, accum: int) -> dict[str, torch.Tensor]:
    """Running mean of the detached losses over the micro-batches of one step (no host sync)."""
    d = dict(loss=out.total, mlm=out.losses.mlm, itm=out.losses.itm, itc=out.losses.itc)
    d = {k: v.detach() / accum for k, v in d.items() if v is not None}
    return d if acc is None else {k: v + acc[k] for k, v in d.items()}


def micro_batches(dataset, micro: int, cfg: TrainConfig, state: dict):
    """Endless stream of micro-batches from the saved data position; it keeps state["epoch"] and
    state["batch_in_epoch"] current, which is all a checkpoint needs to replay the stream exactly
    (data.SeededBatches)."""
    loader = make_train_stream(dataset, micro, cfg.seed, state["epoch"], state["batch_in_epoch"],
                               cfg.workers)
    per_epoch = loader.batch_sampler.batches_per_epoch
    for batch in loader:
        state["batch_in_epoch"] += 1
        if state["batch_in_epoch"] == per_epoch:
            state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
        yield batch


class PromptUsage:
    """How often each pool entry is selected, counted on the device (no host sync per step)."""

    def __init__(self, pool_size: int, device: torch.device):
        self.textual = torch.zeros(pool_size, dtype=torch.long, device=device)
        self.visual = torch.zeros(pool_size, dtype=torch.long, device=device)

    def add(self, out: StepOutput) -> None:
        self.textual += torch.bincount(out.textual_prompts.flatten(), minlength=len(self.textual))
        self.visual += torch.bincount(out.visual_prompts.flatten(), minlength=len(self.visual))

    def summary(self) -> dict:
        return dict(train_textual_prompts_used=int((self.textual > 0).sum()),
                    train_visual_prompts_used=int((self.visual > 0).sum()))


def skipped_report(tracker: SkipTracker) -> str:
    """End-of-run line naming the unreadable training images that were skipped."""
    if not tracker.paths:
        return "all training images were readable"
    return f"{len(tracker.paths)} unreadable training images skipped: " + ", ".join(sorted(tracker.paths)[:20])


def _save(out, model, optimizer, scaler, state, mcfg, cfg, rt) -> None:
    if rt.master:
        save_checkpoint(out / "checkpoint.safetensors", model, optimizer, scaler, state, mcfg, cfg)
    if rt.world > 1:
        dist.barrier()


def final_evaluation(model: PTUnifier, tokenizer: Tokenizer, cfg: TrainConfig, rt: Runtime) -> dict:
    """Zero-shot retrieval on the test split by ITC similarity, and prompt-pool usage."""
    from evaluate import zero_shot_retrieval
    folder = Path(cfg.data).parent / "retrieval"
    if not (folder / "manifest.jsonl").exists():
        return {}
    res = zero_shot_retrieval(model, folder, "test", tokenizer, rt.device, cfg.eval_batch)
    print0(rt, "zero-shot retrieval on {n} test pairs (chance R@1 = {c:.2%}):".format(
        n=res["n"], c=1 / res["n"]))
    for direction in ("i2t", "t2i"):
        print0(rt, "  {}: R@1 {:.2%}  R@5 {:.2%}  R@10 {:.2%}".format(
            direction, *(res[f"{direction}_r{k}"] for k in (1, 5, 10))))
    print0(rt, "prompt-pool usage: {} of {} textual prompts and {} of {} visual prompts selected".format(
        res["textual_prompts_used"], model.config.pool_size, res["visual_prompts_used"], model.config.pool_size))
    return res


def cleanup(rt: Runtime) -> None:
    if rt.world > 1 and dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()


def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
