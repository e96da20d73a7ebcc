"""Fine-tuning PTUnifier on the six downstream tasks of the paper (section 5.2, Table 2).

    python finetune.py --task ic --data data/synth/ic --init runs/pretrain/checkpoint.safetensors
    torchrun --nproc_per_node=8 finetune.py --task vqa --data data/vqa-rad --init ckpt.safetensors

One backbone serves every task; a missing modality is filled by prompts (paper 3.2, Eq. 3-4). Each
task is one `Task` record of tasks.py (input kind, head, loss, selection key); the loop is shared
with train.py (runtime.guarded_step: DDP, mixed precision, `--micro-batch` accumulation, the
non-finite guard). The recipe (paper 5.3; the defaults per preset and task are in recipes.py,
taken from the preset the --init checkpoint was pre-trained with): AdamW betas (0.9, 0.98), weight
decay 0.01 except biases/norms/embeddings/pools, the backbone at 5e-6 and the task layers
(classifier heads, the whole generation decoder; for retrieval the ITC/ITM heads) at 2.5e-4,
linear warm-up over 10% of the steps then linear decay, gradient clipping; `--freeze
encoders|backbone` keeps those parts as loaded (linear probing). Every epoch ends with an
evaluation on val; the best epoch by the task's selection metric is written to
OUT/best.safetensors (a later, worse epoch never touches it); the test split is evaluated once,
at the end, on that checkpoint, and never used for selection. OUT/results.json holds the outcome.

Interruptions (as in train.py): OUT/checkpoint.safetensors holds everything a fine-tune needs to
continue (weights, optimizer, the position in the epoch, the epochs' history and the best so far),
written atomically every --save-every steps or --save-every-minutes, at each epoch end and on
SIGTERM / SIGINT (the run stops after the current step, on every rank). `--resume` continues
exactly from it and `--resume auto` when it exists: each epoch's order is drawn from (seed, epoch),
each sample's augmentation from (seed, epoch, index) and a step's randomness from (seed, rank,
step), so a resumed fine-tune replays what an uninterrupted one does, to the bit.

Checkpoint layout (both files): the PTUnifier weights under "model/" exactly as in a pre-training
checkpoint (so either can be an --init again) and the task modules under "task/"; the metadata
records the task and its label names, and loading a head with a different number of outputs than
the data's meta.json is an error naming both numbers.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from checkpoint import (CheckpointError, check_resume, load_model_state, load_optimizer_state,
                        load_pretrained, read_checkpoint, read_metadata, save_checkpoint)
from data import (SkipTracker, TaskDataset, check_image_size, make_loader, make_train_stream, read_meta,
                  stratified_subset)
from metrics import accuracy, class_aurocs, nlg_metrics, recall_at_k, vqa_accuracy
from model import Encoded, PTUnifier, param_groups
from recipes import build_model, recipe, with_defaults
from runtime import (Runtime, SaveClock, StopSignal, adamw, check_resume_mode, cleanup, dataclass_cli, guarded_step,
                     lr_factor, print0, resume_point, save_on_rank0, seed_everything, seed_step, set_lr,
                     setup_runtime, wrap_ddp, write_run_config)
from tasks import FREEZE, TASKS, FinetuneModel, Task, generate_texts, load_task_modules, vocabulary_mismatch
from tokenizer import Tokenizer, locate_tokenizer
from zeroshot import embed_retrieval

# ----------------------------------------------------------------------------- the run's configuration


@dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run besides the architecture (saved in results.json).
    None: not set, the recipe of the preset decides (recipes.py); `resolved()` fills those fields."""
    task: str | None = None         # ic | tc | ts | itg | retrieval | vqa
    data: str | None = None         # task folder (manifest.jsonl + meta.json)
    init: str | None = None         # checkpoint to start from (pre-training or fine-tuned); None: scratch
    out: str | None = None          # run folder (None: runs/ft-TASK)
    preset: str = "tiny"            # the recipe; with --init, the preset the checkpoint was trained with
    tokenizer: str | None = None    # tokenizer.json / folder; default: tokenizer.json beside the data
    epochs: int | None = None       # passes over the training split
    batch_size: int | None = None   # global batch per optimisation step
    micro_batch: int | None = None  # per-process batch per forward, gradients accumulated up to the
                                    # global batch (None: batch / processes); lower it to save memory
    freeze: str = "none"            # "encoders": the ViT and text encoder stay as loaded; "backbone":
                                    # all of PTUnifier (linear probing: only the task layers train)
    lr_backbone: float | None = None  # the pre-trained PTUnifier (paper 5e-6)
    lr_task: float | None = None    # new task layers (paper 2.5e-4)
    weight_decay: float = 0.01      # AdamW decay of the weight matrices (paper 5.3)
    warmup: float = 0.1             # fraction of the steps with linear warm-up
    clip_grad: float = 1.0          # max global gradient norm (0: off)
    max_steps_per_epoch: int | None = None  # cap on optimisation steps per epoch (None: the whole split)
    missing: str = "prompts"        # what fills the missing modality of ic / tc / ts / itg: "prompts"
                                    # (Eq. 3-4) or "blank" (an empty text, a constant image)
    train_fraction: float = 1.0     # train on a seeded, class-stratified fraction of the train split
                                    # (paper Table 3: 0.01, 0.1); stratified by the label (ic: the
                                    # label vector, tc: the class, vqa: the answer)
    itm_rerank: int = 0             # retrieval: re-rank the top K ITC candidates with the ITM head
    beams: int = 1                  # generation: beam width (1: greedy)
    max_gen_len: int | None = None  # generation: most tokens generated (None: Config.max_text_len)
    length_penalty: float = 1.0     # generation: beam score / length ** penalty
    no_repeat_ngram: int | None = None  # generation: no n-gram of generated tokens twice (0: off)
    eval_batch: int = 128           # batch of the val / test evaluations
    workers: int = 2                # DataLoader workers per process; 0 loads in the main process
    seed: int = 0                   # task head init, data order, augmentation
    device: str = "auto"            # auto | cpu | cuda
    save_every: int = 200           # steps between checkpoints (OUT/checkpoint.safetensors; also at
                                    # each epoch end and on SIGTERM / SIGINT)
    save_every_minutes: float = 30.0  # wall-clock minutes between checkpoints (0: off): the most work
                                    # a preempted fine-tune loses, whatever its step time
    resume: str | None = None       # continue from OUT/checkpoint.safetensors: a bare --resume (it
                                    # must exist) or --resume auto (when it exists, else start fresh)

    def resolved(self) -> "FinetuneConfig":
        """The recipe of the task in every field that is not set; the preset is the one the --init
        checkpoint was pre-trained with (its metadata), else --preset."""
        if self.task not in TASKS:
            raise SystemExit(f"--task {self.task!r}: expected one of {sorted(TASKS)}")
        if self.freeze not in FREEZE:
            raise SystemExit(f"--freeze {self.freeze!r}: expected one of {FREEZE}")
        if self.missing not in ("prompts", "blank"):
            raise SystemExit(f"--missing {self.missing!r}: expected 'prompts' or 'blank'")
        check_resume_mode(self.resume)
        preset = self.preset
        trained = read_metadata(self.init).get("train_config") if self.init else None
        if trained:
            preset = trained.get("preset", "base")
        defaults = dict(no_repeat_ngram=0, out=f"runs/ft-{self.task}") | recipe(preset).finetune[self.task]
        return with_defaults(dataclasses.replace(self, preset=preset), defaults)


# ----------------------------------------------------------------------------- the model


def make_optimizer(model: FinetuneModel, cfg: FinetuneConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over {backbone, task} x {decay, no decay} (no decay as in model.split_decay)."""
    new = model.new_parameters()
    groups = param_groups(model, lambda p: ("task", cfg.lr_task) if id(p) in new
                          else ("backbone", cfg.lr_backbone), cfg.weight_decay)
    return adamw(groups, device)


# ----------------------------------------------------------------------------- building a run


def output_names(task: Task, meta: dict) -> list[str]:
    """The classifier's output names (meta classes or answers); [] for heads without labels."""
    return list(meta[task.outputs]) if task.outputs else []


def load_backbone(cfg: FinetuneConfig, tokenizer: Tokenizer) -> tuple[PTUnifier, dict | None, dict]:
    """(backbone, checkpoint metadata or None, checkpoint tensors) from --init, else a fresh preset
    model. The model Config comes from the checkpoint; its vocabulary must be the tokenizer's."""
    if not cfg.init:
        return build_model(cfg.preset, tokenizer), None, {}
    backbone, meta, tensors = load_pretrained(cfg.init)
    mismatch = vocabulary_mismatch(cfg.init, backbone.config, tokenizer, locate_tokenizer(cfg.data, cfg.tokenizer))
    if mismatch:
        raise SystemExit(mismatch)
    return backbone, meta, tensors


def save_finetuned(path: Path, model: FinetuneModel, names: list[str], cfg: FinetuneConfig, state: dict,
                   val: dict | None = None, optimizer=None, scaler=None) -> None:
    """Atomic safetensors: backbone under "model/" (a valid --init), task modules under "task/";
    `state` (the epoch; for a resumable checkpoint the whole loop state, with the optimizer and
    scaler) and the epoch's `val` metrics in the metadata."""
    save_checkpoint(path, model.backbone, optimizer, scaler, state, model.backbone.config, cfg,
                    task_modules=model.task_modules(),
                    finetune=dict(task=model.task.name, outputs=names, epoch=state["epoch"], val=val,
                                  config=dataclasses.asdict(cfg)))


# ----------------------------------------------------------------------------- evaluation


@dataclass
class EvalContext:
    """What an evaluation needs besides the model."""
    folder: Path
    tokenizer: Tokenizer
    names: list[str]        # classifier output names (classes / answers)
    rt: Runtime
    cfg: FinetuneConfig


def eval_batches(model: FinetuneModel, ctx: EvalContext, split: str):
    """In-order, non-distributed batches of `split` on the device (eval transforms)."""
    cfg = model.backbone.config
    dataset = TaskDataset(ctx.folder, split, ctx.tokenizer, cfg.image_size, cfg.max_text_len,
                          train=False)
    if len(dataset) == 0:
        raise ValueError(f"{ctx.folder}/manifest.jsonl has no records in split {split!r}")
    loader = make_loader(dataset, ctx.cfg.eval_batch, train=False, seed=0, distributed=False,
                         num_workers=ctx.cfg.workers)
    for batch in loader:
        yield batch.to(ctx.rt.device)


def score_ic(model, ctx, split) -> dict:
    """Macro AUROC over the classes whose labels take both values in the split; the others are
    listed in "excluded" (never silently dropped)."""
    scores, labels = [], []
    for batch in eval_batches(model, ctx, split):
        with ctx.rt.autocast():
            scores.append(torch.sigmoid(model.outputs(batch).float()).cpu())
        labels.append(batch.labels.cpu())
    per_class, excluded = class_aurocs(torch.cat(scores).numpy(), torch.cat(labels).numpy(), ctx.names)
    if not per_class:
        raise ValueError(f"{ctx.folder} split {split!r}: no class has both label values")
    return dict(macro_auroc=float(np.mean(list(per_class.values()))), per_class=per_class,
                excluded=excluded)


def score_tc(model, ctx, split) -> dict:
    logits, labels = [], []
    for batch in eval_batches(model, ctx, split):
        with ctx.rt.autocast():
            logits.append(model.outputs(batch).float().cpu())
        labels.append(batch.labels.cpu())
    return dict(accuracy=accuracy(torch.cat(logits), torch.cat(labels)))


def score_vqa(model, ctx, split) -> dict:
    """Accuracy open / closed / overall; gold answers outside the vocabulary count as wrong and
    their number is reported (n_gold_out_of_vocab)."""
    preds, golds, kinds = [], [], []
    for batch in eval_batches(model, ctx, split):
        with ctx.rt.autocast():
            best = model.outputs(batch).argmax(dim=1).tolist()
        preds += [ctx.names[i] for i in best]
        golds += batch.answers
        kinds += batch.answer_types
    return dataclasses.asdict(vqa_accuracy(preds, golds, kinds, vocabulary=ctx.names))


def generations(model, ctx, split) -> tuple[dict[str, str], dict[str, list[str]]]:
    """({id: generated text}, {id: [reference]}) of every item of `split`, in order."""
    hyps, refs = {}, {}
    for batch in eval_batches(model, ctx, split):
        with ctx.rt.autocast():
            texts = generate_texts(model, batch, ctx.tokenizer, ctx.cfg)
        for rid, text, ref in zip(batch.ids, texts, batch.references):
            hyps[rid], refs[rid] = text, [ref]
    return hyps, refs


def score_generation(model, ctx, split, final: bool) -> dict:
    """Generate from the fused streams, then BLEU-1..4, ROUGE-L, CIDEr-D (+ METEOR when final)."""
    hyps, refs = generations(model, ctx, split)
    scores = dataclasses.asdict(nlg_metrics(hyps, refs, with_meteor=final))
    scores["examples"] = [dict(id=i, generated=hyps[i], reference=refs[i][0]) for i in list(hyps)[:3]]
    if final:  # every text, written to OUT/test_generations.jsonl by finetune()
        scores["generated"] = [dict(id=i, generated=hyps[i], reference=refs[i][0]) for i in hyps]
    return scores


def itm_rerank(model, ctx, split, sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank each query's top-k ITC candidates by the ITM head's match probability (pair passes).

    sim [N_img, N_txt] -> (i2t scores, t2i scores) [N_img, N_txt]: the top-k candidates of a
    query get 2 + P(match), above every other candidate (ITC cosines are <= 1)."""
    b = model.backbone
    states, ids, masks = [], [], []
    for batch in eval_batches(model, ctx, split):
        states.append(b.encode_image(batch.pixel_values).states)
        ids += list(batch.input_ids)
        masks += list(batch.attention_mask)
    images = Encoded(torch.cat(states), None, None)  # [N, 1 + N_patch, Dv]: every test image, once

    def match(image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        probs = []
        for start in range(0, len(image_rows), ctx.cfg.eval_batch):
            i, t = image_rows[start:start + ctx.cfg.eval_batch], text_rows[start:start + ctx.cfg.eval_batch]
            text_ids = nn.utils.rnn.pad_sequence([ids[j] for j in t], batch_first=True,
                                                 padding_value=ctx.tokenizer.pad_id)
            text_mask = nn.utils.rnn.pad_sequence([masks[j] for j in t], batch_first=True)
            with ctx.rt.autocast():
                joint = b.fuse_encoded(images.rows(i), b.encode_text(text_ids, text_mask)).joint
                probs.append(b.itm_head(joint).float().softmax(-1)[:, 1].cpu())
        return torch.cat(probs)

    k = min(k, sim.shape[1], sim.shape[0])
    top_t = sim.topk(k, dim=1).indices                     # [N_img, k] texts per image
    top_i = sim.topk(k, dim=0).indices.T                   # [N_txt, k] images per text
    rows = torch.arange(sim.shape[0]).repeat_interleave(k)
    cols = torch.arange(sim.shape[1]).repeat_interleave(k)
    i2t, t2i = sim.clone(), sim.clone()
    i2t[rows, top_t.flatten()] = 2 + match(rows, top_t.flatten())
    t2i[top_i.flatten(), cols] = 2 + match(top_i.flatten(), cols)
    return i2t, t2i


def score_retrieval(model, ctx, split) -> dict:
    """R@1/5/10 both ways by ITC cosine (optionally ITM re-ranked); mean_recall selects."""
    image_emb, text_emb, _, _ = embed_retrieval(model.backbone, ctx.folder, split, ctx.tokenizer,
                                                ctx.rt.device, ctx.cfg.eval_batch, ctx.cfg.workers)
    sim = image_emb @ text_emb.T  # [N_img, N_txt]
    i2t = t2i = sim
    if ctx.cfg.itm_rerank:
        i2t, t2i = itm_rerank(model, ctx, split, sim, ctx.cfg.itm_rerank)
    out = {f"i2t_r{k}": v for k, v in recall_at_k(i2t).i2t.items()}
    out.update({f"t2i_r{k}": v for k, v in recall_at_k(t2i).t2i.items()})
    out["mean_recall"] = float(np.mean(list(out.values())))
    out["itm_rerank"] = ctx.cfg.itm_rerank
    return out


SCORERS = {"ic": score_ic, "tc": score_tc, "vqa": score_vqa, "retrieval": score_retrieval,
           "ts": lambda m, c, s: score_generation(m, c, s, final=s == "test"),
           "itg": lambda m, c, s: score_generation(m, c, s, final=s == "test")}


def evaluate_split(model: FinetuneModel, ctx: EvalContext, split: str) -> dict:
    """The task's metrics on `split` (eval mode, no gradients; training mode restored after)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return SCORERS[model.task.name](model, ctx, split)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- the loop


# FinetuneConfig fields that must not change when a fine-tune resumes (the model and the data stream).
RESUME_FIELDS = ("task", "data", "init", "preset", "batch_size", "max_steps_per_epoch", "train_fraction",
                 "missing", "freeze", "seed")


@dataclass
class FinetuneRun:
    """A fine-tuning run in progress: what the epochs read and update."""
    cfg: FinetuneConfig
    rt: Runtime
    task: Task
    meta: dict                 # the task folder's meta.json
    model: FinetuneModel
    runner: nn.Module | None   # the model, wrapped by DDP under torchrun (None once torn down)
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler
    dataset: TaskDataset       # the training split (its --train-fraction subset)
    steps_per_epoch: int
    micro_batch: int           # per-process rows per forward (the per-process batch: no accumulation)
    ctx: EvalContext
    skips: SkipTracker
    clock: SaveClock           # --save-every-minutes
    state: dict                # the loop's position and record (new_state); saved in checkpoints


def new_state() -> dict:
    """Where a fine-tune starts: epoch 1 (1-based), no batch of it read, no step taken."""
    return dict(epoch=1, batch_in_epoch=0, step=0, skipped_steps=0,  # step: the schedule's position
                epoch_losses=[],  # this epoch's training losses so far (their mean goes into history)
                history=[],       # one {epoch, train_loss, val} per finished epoch
                best=None)        # [epoch, val score] of the best epoch so far (OUT/best.safetensors)


def start_finetune(cfg: FinetuneConfig, rt: Runtime) -> FinetuneRun:
    """The backbone from --init (or the preset), the task's new modules, data and optimiser;
    restored from OUT/checkpoint.safetensors with --resume."""
    task = TASKS[cfg.task]
    resume = resume_point(Path(cfg.out) / "checkpoint.safetensors", cfg.resume, rt)
    if resume:  # the first line says where the fine-tune continues from
        meta = read_metadata(resume)
        if not meta.get("finetune") or "history" not in meta["state"]:
            raise CheckpointError(f"{resume} is not a fine-tune's checkpoint to resume from (no loop state)")
        print0(rt, f"resuming from {resume} at epoch {meta['state']['epoch']}, step {meta['state']['step']}")
    seed_everything(cfg.seed)  # the same initial head on every rank
    meta = read_meta(cfg.data)
    if meta["task"] != task.name:
        raise SystemExit(f"{cfg.data}/meta.json: task {meta['task']!r}, but --task {task.name}")
    tokenizer = Tokenizer.load(locate_tokenizer(cfg.data, cfg.tokenizer))
    backbone, init_meta, init_tensors = load_backbone(cfg, tokenizer)
    names = output_names(task, meta)
    model = FinetuneModel(backbone, task, len(names), blank=cfg.missing == "blank",
                          freeze=cfg.freeze).to(rt.device)
    if init_meta is not None and load_task_modules(model, cfg.init, init_meta, init_tensors, names):
        print0(rt, f"task modules loaded from {cfg.init}")
    del init_tensors
    mcfg = backbone.config
    check_image_size(cfg.data, mcfg.image_size)
    train_set = TaskDataset(cfg.data, "train", tokenizer, mcfg.image_size, mcfg.max_text_len, train=True)
    if cfg.train_fraction < 1:
        strata = [repr(r[task.stratum]) if task.stratum else "" for r in train_set.records]
        train_set.keep(stratified_subset(strata, cfg.train_fraction, cfg.seed))
    if len(train_set) < cfg.batch_size:  # a small --train-fraction: the whole subset is one batch
        cfg = dataclasses.replace(cfg, batch_size=max(rt.world, len(train_set) // rt.world * rt.world))
    if cfg.batch_size % rt.world:
        raise SystemExit(f"--batch-size {cfg.batch_size} must be a multiple of the {rt.world} processes")
    micro = min(cfg.micro_batch or cfg.batch_size // rt.world, cfg.batch_size // rt.world)
    if (cfg.batch_size // rt.world) % micro:
        raise SystemExit(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch {micro} x "
                         f"{rt.world} processes")
    batches = len(train_set) // cfg.batch_size  # per epoch (the last partial batch is dropped)
    steps_per_epoch = min(batches, cfg.max_steps_per_epoch or batches)
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} training samples cannot fill one batch of {cfg.batch_size}")
    optimizer = make_optimizer(model, cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    state = new_state()
    if resume:
        state = resume_from(resume, cfg, model, optimizer, scaler, names)
    # unused parameters: the pool of the present modality, heads of other tasks
    runner = wrap_ddp(model, rt, find_unused_parameters=True)
    write_run_config(Path(cfg.out), rt, finetune=dataclasses.asdict(cfg), model=dataclasses.asdict(mcfg))
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print0(rt, f"{task.name}: {len(train_set)} training samples, {cfg.epochs} epochs x "
               f"{steps_per_epoch} steps, batch {cfg.batch_size} = {rt.world} x {micro} x "
               f"{cfg.batch_size // rt.world // micro} accumulation, lr backbone {cfg.lr_backbone:g} / "
               f"task {cfg.lr_task:g}" + f", {frozen / 1e6:.2f}M parameters frozen" * bool(frozen) +
               f", on {rt.device}")
    return FinetuneRun(cfg, rt, task, meta, model, runner, optimizer, scaler, train_set, steps_per_epoch, micro,
                       EvalContext(Path(cfg.data), tokenizer, names, rt, cfg), SkipTracker(len(train_set)),
                       SaveClock(cfg.save_every_minutes), state)


def resume_from(path: Path, cfg: FinetuneConfig, model: FinetuneModel, optimizer, scaler, names) -> dict:
    """Restore weights, task modules, optimizer and scaler from `path`; returns the loop state."""
    meta, tensors = read_checkpoint(path)
    check_resume(path, meta, model.backbone.config, cfg, RESUME_FIELDS)
    load_model_state(path, meta, tensors, model.backbone)
    load_task_modules(model, path, meta, tensors, names)
    load_optimizer_state(meta, tensors, optimizer, scaler)
    return meta["state"]


def save(run: FinetuneRun) -> None:
    """OUT/checkpoint.safetensors, from which the fine-tune can continue (rank 0 writes it)."""
    save_on_rank0(lambda: save_finetuned(Path(run.cfg.out) / "checkpoint.safetensors", run.model, run.ctx.names,
                                         run.cfg, run.state, optimizer=run.optimizer, scaler=run.scaler),
                  run.rt, run.clock)


def train_epoch(run: FinetuneRun, stop: StopSignal) -> bool:
    """The guarded steps of the current epoch from its saved position (runtime.guarded_step: a
    non-finite loss on any rank skips the step on every rank and leaves the model as it was), with
    a checkpoint every --save-every steps or --save-every-minutes; returns True when a signal stops
    the run (after the current step, on every rank; the caller saves)."""
    cfg, rt, state = run.cfg, run.rt, run.state
    if state["batch_in_epoch"] == run.steps_per_epoch:  # saved after its last step, before its end
        return False
    total, stopping, micro = cfg.epochs * run.steps_per_epoch, False, run.micro_batch
    stream = iter(make_train_stream(run.dataset, cfg.batch_size // rt.world, cfg.seed, state["epoch"],
                                    state["batch_in_epoch"], cfg.workers))
    run.model.train()
    bar = tqdm(total=run.steps_per_epoch, initial=state["batch_in_epoch"], desc=f"epoch {state['epoch']}",
               disable=not rt.master, dynamic_ncols=True)
    while state["batch_in_epoch"] < run.steps_per_epoch:
        batch = next(stream)
        state["batch_in_epoch"] += 1
        bar.update(1)
        run.skips.update(batch)
        if len(batch) == 0:  # every image of the batch was unreadable
            continue
        set_lr(run.optimizer, lr_factor(state["step"], total, cfg.warmup))
        seed_step(cfg.seed, rt.rank, state["step"])
        micro_batches = batch.split(micro) if micro < len(batch) else [batch]
        _, bad, (stopping, timed), means = guarded_step(
            run, (b.to(rt.device, non_blocking=True) for b in micro_batches), len(micro_batches),
            lambda runner, b: dict(loss=runner(b)), [stop.received is not None, run.clock.due()])
        state["step"] += 1
        if bad:
            state["skipped_steps"] += 1
            print0(rt, f"step {state['step'] - 1}: non-finite loss, step skipped ({state['skipped_steps']} so far)")
        else:
            state["epoch_losses"].append(means["loss"])
            bar.set_postfix(loss=f"{state['epoch_losses'][-1]:.4f}")
        if stopping:
            break
        if timed or state["step"] % cfg.save_every == 0:
            save(run)
    bar.close()
    return stopping


def end_epoch(run: FinetuneRun) -> None:
    """Save the epoch's last step (a crash in a long evaluation loses no training); rank 0
    evaluates val, records the epoch and, when it is the best so far, writes its weights to
    OUT/best.safetensors; then every rank moves to the next epoch and rank 0 saves again."""
    state, select = run.state, run.task.select
    save(run)
    if run.rt.master:  # the other ranks wait at the barrier (COLLECTIVE_TIMEOUT)
        val = evaluate_split(run.model, run.ctx, "val")
        losses = state["epoch_losses"]
        mean_loss = float(np.mean(losses)) if losses else float("nan")
        state["history"].append(dict(epoch=state["epoch"], train_loss=mean_loss, val=val))
        print(f"epoch {state['epoch']}: train loss {mean_loss:.4f}, val {select} {val[select]:.4f}", flush=True)
        if state["best"] is None or val[select] > state["best"][1]:
            state["best"] = [state["epoch"], val[select]]
            save_finetuned(Path(run.cfg.out) / "best.safetensors", run.model, run.ctx.names, run.cfg,
                           dict(epoch=state["epoch"]), val)
    state.update(epoch=state["epoch"] + 1, batch_in_epoch=0, epoch_losses=[])
    save(run)


def test_best(run: FinetuneRun, started: float) -> dict:
    """Load the best epoch's checkpoint, evaluate the test split once, write results.json."""
    out, task, cfg, (best_epoch, best_val) = Path(run.cfg.out), run.task, run.cfg, run.state["best"]
    best_meta, tensors = read_checkpoint(out / "best.safetensors")
    load_model_state(out / "best.safetensors", best_meta, tensors, run.model.backbone)
    load_task_modules(run.model, out / "best.safetensors", best_meta, tensors, run.ctx.names)
    test = evaluate_split(run.model, run.ctx, "test")
    generated = test.pop("generated", None)
    if generated is not None:
        (out / "test_generations.jsonl").write_text("".join(json.dumps(g) + "\n" for g in generated))
    counts = {s: run.meta.get("counts", {}).get(s) for s in ("train", "val", "test")}
    result = dict(task=task.name, data=cfg.data, init=cfg.init, select=task.select,
                  best_epoch=best_epoch, best_val=best_val, history=run.state["history"], test=test, n=counts,
                  train_examples=len(run.dataset),
                  skipped_steps=run.state["skipped_steps"], checkpoint=str(out / "best.safetensors"),
                  seconds=time.perf_counter() - started, config=dataclasses.asdict(cfg),
                  model_config=dataclasses.asdict(run.model.backbone.config))
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"test, best epoch {best_epoch} (val {task.select} {best_val:.4f}): " + ", ".join(
        f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float)), flush=True)
    return result


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune, select the best epoch on val, evaluate test once; returns results.json's dict,
    or {"stopped": True, "step": n} after a signal (continue with --resume)."""
    cfg = cfg.resolved()
    rt = setup_runtime(cfg.device)
    run = start_finetune(cfg, rt)
    stop, stopped, started = StopSignal(), False, time.perf_counter()
    try:
        while run.state["epoch"] <= run.cfg.epochs and not stopped:
            stopped = train_epoch(run, stop)
            if not stopped:
                end_epoch(run)
        if stopped:
            save(run)
            print0(rt, f"stopped by {stop.received or 'a signal on another rank'} at epoch {run.state['epoch']}, "
                       f"step {run.state['step']}; checkpoint saved; continue with --resume (or --resume auto)")
            result = dict(stopped=True, step=run.state["step"])
        else:
            result = test_best(run, started) if rt.master else {}
        run.runner = None  # the DDP wrapper goes before its process group (runtime.cleanup)
        cleanup(rt)
        return result
    finally:
        stop.restore()


def parse_args(argv=None) -> FinetuneConfig:
    return dataclass_cli(FinetuneConfig, argv, __doc__.split("\n")[0], {
        "task": f"one of {sorted(TASKS)}",
        "init": "pre-training (or fine-tuned) checkpoint; the model Config comes from it",
        "batch_size": "global batch per step (the recipe's); keep it and lower --micro-batch if you run out of memory",
        "micro_batch": "per-process rows per forward; gradients accumulate up to the global batch (same update "
                       "for per-sample-mean losses; retrieval's ITC negatives are then the micro-batch's)",
        "freeze": "'encoders': ViT and text encoder fixed; 'backbone': all of PTUnifier fixed, only the task "
                  "layers train (linear probing); frozen parts run in eval mode and get no optimizer state",
        "max_steps_per_epoch": "cap steps per epoch (quick checks; None: the whole split)",
        "itm_rerank": "retrieval: K > 0 re-ranks the top-K ITC candidates with ITM pair passes",
        "resume": "continue exactly from OUT/checkpoint.safetensors, which must exist; '--resume auto': "
                  "continue when it exists, else start fresh (one command for a first launch and every relaunch)",
    }, required=("task", "data"), bare={"resume": "strict"})


def main(argv=None) -> None:
    finetune(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
