"""Fine-tuning PTUnifier on the six downstream tasks of the paper (section 5.2, Table 2).

    python finetune.py --task ic --data data/synth/ic --init runs/pretrain/checkpoint.safetensors
    torchrun --nproc_per_node=8 finetune.py --task vqa --data data/vqa-rad --init ckpt.safetensors

One backbone serves every task; a missing modality is filled by prompts (paper 3.2, Eq. 3-4):

| task      | input of the fusion pass          | head on top                  | loss         | metric (selection)  |
|-----------|-----------------------------------|------------------------------|--------------|---------------------|
| ic        | image + textual prompts           | ClassifierHead(2H, classes)  | BCE          | macro AUROC         |
| tc        | text pair + visual prompts        | ClassifierHead(2H, classes)  | CE           | accuracy            |
| vqa       | image + question                  | ClassifierHead(2H, answers)  | BCE x A      | accuracy (overall)  |
| ts        | source text + visual prompts      | TextDecoder on fused streams | token CE     | ROUGE-L             |
| itg       | image + textual prompts           | TextDecoder on fused streams | token CE     | BLEU-4              |
| retrieval | image-only and text-only passes   | ITC projections (+ ITM)      | ITC (Eq. 9-10) | mean R@1/5/10     |

Each task is one `Task` record below (input kind, head, loss, selection key); the loop, the
optimiser and the checkpointing are shared. The recipe (paper 5.3; the defaults per preset and
task are in recipes.py, taken from the preset the --init checkpoint was pre-trained with): AdamW
betas (0.9, 0.98), weight decay 0.01 except biases/norms/embeddings/pools, the backbone at 5e-6 and
the task layers (classifier heads, the whole generation decoder; for retrieval the ITC/ITM heads)
at 2.5e-4, linear warm-up over 10% of the steps then linear decay, gradient clipping, mixed
precision and DDP as in train.py (runtime.py). Every epoch ends with an evaluation on val; the
best epoch by the task's selection metric is written to OUT/best.safetensors (a later, worse epoch
never touches it); the test split is evaluated once, at the end, on that checkpoint, and never
used for selection. OUT/results.json holds the outcome.

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
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoint import (CheckpointError, check_resume, load_model_state, load_optimizer_state,
                        load_pretrained, read_checkpoint, read_metadata, save_checkpoint)
from data import SkipTracker, TaskDataset, check_image_size, make_loader, make_train_stream, read_meta, stratified_subset
from generation import TextDecoder, generate, generation_memory
from losses import itc_loss
from metrics import accuracy, class_aurocs, nlg_metrics, recall_at_k, vqa_accuracy
from model import ClassifierHead, Encoded, PTUnifier, param_groups
from recipes import build_model, recipe, with_defaults
from runtime import (Runtime, SaveClock, StopSignal, adamw, any_rank, barrier, check_resume_mode, cleanup,
                     dataclass_cli, finish_step, lr_factor, print0, resume_point, seed_everything, seed_step, set_lr,
                     setup_runtime, snapshot_buffers)
from tokenizer import Tokenizer, locate_tokenizer
from zeroshot import embed_retrieval

# ----------------------------------------------------------------------------- the tasks


def classification_loss(logits, batch):
    """Multi-label / binary IC: mean BCE with logits over [B, C]."""
    return F.binary_cross_entropy_with_logits(logits.float(), batch.labels)


def softmax_loss(logits, batch):
    """Single-label TC: cross-entropy of logits [B, C] against class ids [B]."""
    return F.cross_entropy(logits.float(), batch.labels)


def vqa_loss(logits, batch):
    """VQA: BCE with logits on soft answer targets [B, A], summed over answers, mean over the
    batch (METER / the official code multiply the mean by A, which is the same thing)."""
    return F.binary_cross_entropy_with_logits(logits.float(), batch.labels) * batch.labels.shape[1]


def caption_loss(logits, batch):
    """Teacher forcing: logits [B, T-1, V] predict target_ids[:, 1:]; padding is ignored."""
    target = batch.target_ids[:, 1:].masked_fill(batch.target_mask[:, 1:] == 0, -100)  # [B, T-1]
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100)


def contrastive_loss(outputs, batch):
    """ITC (Eq. 9-10) between the image-only and the text-only pass embeddings."""
    image_emb, text_emb, scale = outputs
    return itc_loss(image_emb, text_emb, scale)


@dataclass(frozen=True)
class Task:
    """What distinguishes one downstream task from another."""
    name: str
    inputs: str          # "image" (+ textual prompts), "text" (+ visual prompts), "pair", "dual"
    head: str            # "classifier" (ClassifierHead on the joint 2H feature), "decoder", "itc"
    loss: Callable       # (head outputs, Batch) -> scalar
    select: str          # key of the val metrics that picks the best epoch (higher is better)
    outputs: str = ""    # meta.json key whose length is the classifier's output size
    stratum: str = ""    # record field whose value stratifies a --train-fraction subset ("": none)


TASKS = {
    "ic": Task("ic", "image", "classifier", classification_loss, "macro_auroc", "classes", "labels"),
    "tc": Task("tc", "text", "classifier", softmax_loss, "accuracy", "classes", "label"),
    "vqa": Task("vqa", "pair", "classifier", vqa_loss, "overall", "answers", "answer"),
    "ts": Task("ts", "text", "decoder", caption_loss, "rouge_l"),
    "itg": Task("itg", "image", "decoder", caption_loss, "bleu_4"),
    "retrieval": Task("retrieval", "dual", "itc", contrastive_loss, "mean_recall"),
}

# Fusion-pass arguments per input kind (the model prompts whatever is missing).
INPUTS = {
    "image": lambda b: dict(pixel_values=b.pixel_values),
    "text": lambda b: dict(input_ids=b.input_ids, attention_mask=b.attention_mask),
    "pair": lambda b: dict(pixel_values=b.pixel_values, input_ids=b.input_ids,
                           attention_mask=b.attention_mask),
}

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
    batch_size: int | None = None   # global batch
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


class FinetuneModel(nn.Module):
    """The PTUnifier backbone plus the task's new modules; forward(batch) -> loss, so that DDP wraps
    a single forward."""

    def __init__(self, backbone: PTUnifier, task: Task, n_outputs: int = 0, blank: bool = False):
        super().__init__()
        self.backbone, self.task, self.blank = backbone, task, blank
        self.head = ClassifierHead(2 * backbone.config.hidden_size, n_outputs) \
            if task.head == "classifier" else None
        self.decoder = TextDecoder.from_encoder(backbone) if task.head == "decoder" else None

    def task_modules(self) -> dict[str, nn.Module]:
        """The new modules saved under "task/" (the backbone is saved under "model/")."""
        return {name: m for name, m in (("head", self.head), ("decoder", self.decoder))
                if m is not None}

    def new_parameters(self) -> set[int]:
        """ids of the parameters trained at lr_task: the task modules (the classifier head; the
        whole decoder: its copies of the text encoder must learn to write, not to fill masks,
        and do not at the backbone rate, docs/NOTES.md), and for retrieval the
        pre-trained ITC/ITM heads."""
        if self.task_modules():
            return {id(p) for m in self.task_modules().values() for p in m.parameters()}
        b = self.backbone
        return {id(p) for m in (b.itc_image, b.itc_text, b.itm_head) for p in m.parameters()}

    def fusion_inputs(self, batch) -> dict:
        """The fusion pass's inputs: the task's modalities, the missing one prompted; with `blank`
        the missing one is a blank input instead: the empty text [<s>, </s>], or a constant image
        (zeros after the CLIP normalisation: the mean colour)."""
        inputs = INPUTS[self.task.inputs](batch)
        if self.blank and "input_ids" not in inputs:
            cfg = self.backbone.config
            ends = torch.tensor([[cfg.bos_token_id, cfg.eos_token_id]], device=batch.pixel_values.device)
            inputs["input_ids"] = ends.expand(len(batch), 2)  # [B, 2]
        if self.blank and "pixel_values" not in inputs:
            size = self.backbone.config.image_size
            inputs["pixel_values"] = batch.input_ids.new_zeros(len(batch), 3, size, size, dtype=torch.float)
        return inputs

    def outputs(self, batch):
        """The head's outputs: classifier logits [B, n]; decoder logits [B, T-1, V] under teacher
        forcing; retrieval (image emb [B, E], text emb [B, E], logit scale)."""
        b = self.backbone
        if self.task.inputs == "dual":
            image_only = b(pixel_values=batch.pixel_values)
            text_only = b(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            return b.itc_image(image_only.joint), b.itc_text(text_only.joint), b.logit_scale()
        fused = b(**self.fusion_inputs(batch))
        if self.head is not None:
            return self.head(fused.joint)
        memory, memory_mask = generation_memory(fused)
        return self.decoder(batch.target_ids[:, :-1], memory, memory_mask)

    def forward(self, batch):
        return self.task.loss(self.outputs(batch), batch)


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


def vocabulary_mismatch(path, mcfg, tokenizer: Tokenizer, tokenizer_path) -> str | None:
    """Why the checkpoint `path` (model Config `mcfg`) cannot read the tokenizer's ids, or None."""
    if mcfg.vocab_size == tokenizer.vocab_size and mcfg.pad_token_id == tokenizer.pad_id:
        return None
    return (f"{path}: the checkpoint's vocab_size={mcfg.vocab_size} (pad id {mcfg.pad_token_id}) does "
            f"not match the tokenizer {tokenizer_path} (vocab_size={tokenizer.vocab_size}, pad id "
            f"{tokenizer.pad_id}); pass the tokenizer the checkpoint was pre-trained with (--tokenizer)")


def load_task_modules(model: FinetuneModel, path, meta: dict, tensors: dict, names: list[str]) -> bool:
    """Fill the task modules from a fine-tuned checkpoint of the same task (strict). Returns False
    when the checkpoint has none for this task. A head of another size is a CheckpointError naming
    both sizes."""
    saved = meta.get("finetune") or {}
    if saved.get("task") != model.task.name:
        return False
    if len(saved.get("outputs", [])) != len(names):
        raise CheckpointError(
            f"{path}: the checkpoint's {model.task.name} head has {len(saved['outputs'])} outputs "
            f"({model.task.outputs}: {saved['outputs'][:8]}...), the data's meta.json has "
            f"{len(names)} {model.task.outputs}; fine-tune from the pre-training checkpoint instead")
    for name, module in model.task_modules().items():
        prefix = f"task/{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
    return True


def save_finetuned(path: Path, model: FinetuneModel, names: list[str], cfg: FinetuneConfig, state: dict,
                   val: dict | None = None, optimizer=None, scaler=None) -> None:
    """Atomic safetensors: backbone under "model/" (a valid --init), task modules under "task/";
    `state` (the epoch; for a resumable checkpoint the whole loop state, with the optimizer and
    scaler) and the epoch's `val` metrics in the metadata."""
    save_checkpoint(path, model.backbone, optimizer, scaler, state, model.backbone.config, cfg,
                    task_modules=model.task_modules(),
                    finetune=dict(task=model.task.name, outputs=names, epoch=state["epoch"], val=val,
                                  config=dataclasses.asdict(cfg)))


def load_finetuned(path, backbone: PTUnifier, meta: dict, tensors: dict) -> FinetuneModel:
    """The model of a fine-tuned checkpoint (OUT/best.safetensors), given what load_pretrained read
    from it: its backbone plus the task modules, the head's outputs named in its metadata."""
    saved = meta.get("finetune")
    if not saved:
        raise CheckpointError(f"{path} is not a fine-tuned checkpoint (no task head inside)")
    model = FinetuneModel(backbone, TASKS[saved["task"]], len(saved["outputs"]),
                          saved["config"].get("missing") == "blank")
    load_task_modules(model, path, meta, tensors, saved["outputs"])
    return model


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


def generate_texts(model: FinetuneModel, batch, tokenizer: Tokenizer, cfg: FinetuneConfig) -> list[str]:
    """The decoder's text for each input of a batch (ts: its source text, itg: its image), searched
    with the run's settings (beams, max_gen_len, length_penalty, no_repeat_ngram)."""
    memory, mask = generation_memory(model.backbone(**model.fusion_inputs(batch)))
    out = generate(model.decoder, memory, mask, tokenizer.bos_id, tokenizer.eos_id,
                   max_len=cfg.max_gen_len or model.backbone.config.max_text_len, beams=cfg.beams,
                   length_penalty=cfg.length_penalty, no_repeat_ngram=cfg.no_repeat_ngram)
    return [tokenizer.decode(ids) for ids in out]


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
                 "missing", "seed")


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
    model = FinetuneModel(backbone, task, len(names), blank=cfg.missing == "blank").to(rt.device)
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
    batches = len(train_set) // cfg.batch_size  # per epoch (the last partial batch is dropped)
    steps_per_epoch = min(batches, cfg.max_steps_per_epoch or batches)
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} training samples cannot fill one batch of {cfg.batch_size}")
    optimizer = make_optimizer(model, cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    state = new_state()
    if resume:
        state = resume_from(resume, cfg, model, optimizer, scaler, names)
    runner = model
    if rt.world > 1:  # unused parameters: the pool of the present modality, heads of other tasks
        runner = DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda"
                                         else None, find_unused_parameters=True)
    if rt.master:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "config.json").write_text(json.dumps(
            dict(finetune=dataclasses.asdict(cfg), model=dataclasses.asdict(mcfg)), indent=2))
    print0(rt, f"{task.name}: {len(train_set)} training samples, {cfg.epochs} epochs x "
               f"{steps_per_epoch} steps, batch {cfg.batch_size}, lr backbone {cfg.lr_backbone:g} / "
               f"task {cfg.lr_task:g}, on {rt.device}")
    return FinetuneRun(cfg, rt, task, meta, model, runner, optimizer, scaler, train_set, steps_per_epoch,
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
    if run.rt.master:
        save_finetuned(Path(run.cfg.out) / "checkpoint.safetensors", run.model, run.ctx.names, run.cfg,
                       run.state, optimizer=run.optimizer, scaler=run.scaler)
    barrier(run.rt)
    run.clock.restart()


def train_epoch(run: FinetuneRun, stop: StopSignal) -> bool:
    """The guarded steps of the current epoch from its saved position (a non-finite loss on any
    rank skips the step on every rank and leaves the model as it was), with a checkpoint every
    --save-every steps or --save-every-minutes; returns True when a signal stops the run (after
    the current step, on every rank; the caller saves)."""
    cfg, rt, state = run.cfg, run.rt, run.state
    if state["batch_in_epoch"] == run.steps_per_epoch:  # saved after its last step, before its end
        return False
    total, stopping = cfg.epochs * run.steps_per_epoch, False
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
        buffers = snapshot_buffers(run.model)
        with rt.autocast():
            loss = run.runner(batch.to(rt.device, non_blocking=True))
        bad, stopping, timed = any_rank([not torch.isfinite(loss).item(), stop.received is not None,
                                         run.clock.due()], rt)
        if not bad:
            run.scaler.scale(loss).backward()
        finish_step(run.model, run.optimizer, run.scaler, cfg.clip_grad, buffers, finite=not bad)
        state["step"] += 1
        if bad:
            state["skipped_steps"] += 1
            print0(rt, f"step {state['step'] - 1}: non-finite loss, step skipped ({state['skipped_steps']} so far)")
        else:
            state["epoch_losses"].append(loss.item())
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
        "batch_size": "global batch; lower it (32, 16) if you run out of memory",
        "max_steps_per_epoch": "cap steps per epoch (quick checks; None: the whole split)",
        "itm_rerank": "retrieval: K > 0 re-ranks the top-K ITC candidates with ITM pair passes",
        "resume": "continue exactly from OUT/checkpoint.safetensors, which must exist; '--resume auto': "
                  "continue when it exists, else start fresh (one command for a first launch and every relaunch)",
    }, required=("task", "data"), bare={"resume": "strict"})


def main(argv=None) -> None:
    finetune(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
