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
| retrieval | image-only and text-only passes   | ITC projections (+ ITM)      | ITC (Eq. 9)  | mean R@1/5/10       |

Each task is one `Task` record below (input kind, head, loss, selection key); the loop, the
optimiser and the checkpointing are shared. The recipe (paper 5.3): AdamW betas (0.9, 0.98),
weight decay 0.01 except biases/norms/embeddings/pools, the backbone at 5e-6 and the task
layers (classifier heads, the whole generation decoder; for retrieval the ITC/ITM heads) at 2.5e-4,
linear warm-up over 10% of the steps then linear decay, gradient clipping, mixed precision and
DDP as in train.py. Every epoch ends with an evaluation on val; the best epoch by the task's
selection metric is written to OUT/best.safetensors; the test split is evaluated once, at the
end, on that checkpoint, and never used for selection. OUT/results.json holds the outcome.

Checkpoint layout (OUT/best.safetensors): the PTUnifier weights under "model/" exactly as in a
pre-training checkpoint (so it can be an --init again) and the task modules under "task/"; the
metadata records the task and its label names, and loading a head with a different number of
outputs than the data's meta.json is an error naming both numbers.
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
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoint import FORMAT, CheckpointError, atomic_save, dedupe_shared, load_model_state, load_pretrained, \
    read_checkpoint
from data import SkipTracker, TaskDataset, Tokenizer, locate_tokenizer, make_loader, read_meta
from evaluate import accuracy, auroc, embed_retrieval, nlg_metrics, recall_at_k, vqa_accuracy
from losses import itc_loss
from model import ClassifierHead, PTUnifier, TextDecoder, generate, generation_memory, \
    restore_running_statistics, save_running_statistics, split_decay
from train import Runtime, TrainConfig, any_rank, apply_update, build_model, cleanup, dataclass_cli, lr_factor, print0, \
    seed_everything, seed_step, setup_runtime

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


TASKS = {
    "ic": Task("ic", "image", "classifier", classification_loss, "macro_auroc", "classes"),
    "tc": Task("tc", "text", "classifier", softmax_loss, "accuracy", "classes"),
    "vqa": Task("vqa", "pair", "classifier", vqa_loss, "overall", "answers"),
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

# Per-task defaults. "base": the paper's learning rates for a pre-trained base model (epochs and
# batch sizes of the official configs). "tiny": the synthetic benchmark on 2 CPU cores from a
# tiny pre-training checkpoint (README "Fine-tuning and evaluation": the benchmark's minutes); the
# tiny backbone is barely pre-trained, so it needs a far higher backbone rate than 5e-6 to move in
# a few epochs; itg's decoder needs 15 epochs to write the findings it reads (val BLEU-4 peaked at 11).
PAPER_LR = dict(lr_backbone=5e-6, lr_task=2.5e-4)
TINY_LR = dict(lr_backbone=2e-4, lr_task=5e-4)
FT_DEFAULTS = {
    "base": {"ic": dict(epochs=10, batch_size=64, **PAPER_LR),
             "tc": dict(epochs=10, batch_size=32, **PAPER_LR),
             "vqa": dict(epochs=50, batch_size=32, **PAPER_LR),
             "ts": dict(epochs=10, batch_size=32, **PAPER_LR),
             "itg": dict(epochs=10, batch_size=32, **PAPER_LR),
             "retrieval": dict(epochs=10, batch_size=128, **PAPER_LR)},
    "tiny": {"ic": dict(epochs=6, batch_size=64, **TINY_LR),
             "tc": dict(epochs=6, batch_size=64, **TINY_LR),
             "vqa": dict(epochs=6, batch_size=64, **TINY_LR),
             "ts": dict(epochs=6, batch_size=64, no_repeat_ngram=3, **TINY_LR),
             "itg": dict(epochs=15, batch_size=64, **TINY_LR),
             "retrieval": dict(epochs=6, batch_size=64, **TINY_LR)},
}


@dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run besides the architecture (saved in results.json)."""
    task: str = ""                  # ic | tc | ts | itg | retrieval | vqa
    data: str = ""                  # task folder (manifest.jsonl + meta.json)
    init: str = ""                  # checkpoint to start from (pre-training or fine-tuned); empty: scratch
    out: str = ""                   # run folder (default runs/ft-TASK)
    preset: str = "tiny"            # model preset without --init; the defaults table of the run
    tokenizer: str = ""             # tokenizer.json / folder; default: tokenizer.json beside the data
    epochs: int = 0                 # 0: the task's default
    batch_size: int = 0             # global batch (0: the task's default)
    lr_backbone: float = 0.0        # the pre-trained PTUnifier (0: task default; paper 5e-6)
    lr_task: float = 0.0            # new task layers (0: task default; paper 2.5e-4)
    weight_decay: float = 0.01
    warmup: float = 0.1             # fraction of the steps with linear warm-up
    clip_grad: float = 1.0          # max global gradient norm (0: off)
    max_steps_per_epoch: int = 0    # cap on optimisation steps per epoch (0: the whole split)
    itm_rerank: int = 0             # retrieval: re-rank the top K ITC candidates with the ITM head
    beams: int = 1                  # generation: beam width (1: greedy)
    max_gen_len: int = 0            # generation: most tokens generated (0: Config.max_text_len)
    length_penalty: float = 1.0     # generation: beam score / length ** penalty
    no_repeat_ngram: int = -1       # generation: no n-gram of generated tokens twice (0: off;
                                    # -1: the task default: tiny ts/itg 3, otherwise off)
    eval_batch: int = 128
    workers: int = 2                # DataLoader workers per process; 0 loads in the main process
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda

    def resolved(self, recipe: str) -> "FinetuneConfig":
        """Fill zeros from FT_DEFAULTS[recipe][task] and the default run folder."""
        d = FT_DEFAULTS.get(recipe, FT_DEFAULTS["base"])[self.task]
        pick = lambda key: getattr(self, key) or d[key]  # noqa: E731
        return dataclasses.replace(self, epochs=pick("epochs"), batch_size=pick("batch_size"),
                                   lr_backbone=pick("lr_backbone"), lr_task=pick("lr_task"),
                                   no_repeat_ngram=self.no_repeat_ngram if self.no_repeat_ngram >= 0
                                   else d.get("no_repeat_ngram", 0),
                                   out=self.out or f"runs/ft-{self.task}")


# ----------------------------------------------------------------------------- the model


class FinetuneModel(nn.Module):
    """The PTUnifier backbone plus the task's new modules; forward(batch) -> loss, so that DDP wraps
    a single forward."""

    def __init__(self, backbone: PTUnifier, task: Task, n_outputs: int = 0):
        super().__init__()
        self.backbone, self.task = backbone, task
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
        and do not at the backbone rate, README "Fine-tuning"), and for retrieval the
        pre-trained ITC/ITM heads."""
        if self.task_modules():
            return {id(p) for m in self.task_modules().values() for p in m.parameters()}
        b = self.backbone
        return {id(p) for m in (b.itc_image, b.itc_text, b.itm_head) for p in m.parameters()}

    def outputs(self, batch):
        """The head's outputs: classifier logits [B, n]; decoder logits [B, T-1, V] under teacher
        forcing; retrieval (image emb [B, E], text emb [B, E], logit scale)."""
        b = self.backbone
        if self.task.inputs == "dual":
            image_only = b(pixel_values=batch.pixel_values)
            text_only = b(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            return b.itc_image(image_only.joint), b.itc_text(text_only.joint), b.logit_scale()
        fused = b(**INPUTS[self.task.inputs](batch))
        if self.head is not None:
            return self.head(fused.joint)
        memory, memory_mask = generation_memory(fused)
        return self.decoder(batch.target_ids[:, :-1], memory, memory_mask)

    def forward(self, batch):
        return self.task.loss(self.outputs(batch), batch)


def param_groups(model: FinetuneModel, cfg: FinetuneConfig) -> list[dict]:
    """AdamW groups: {backbone, task} x {decay, no decay} (no decay as in model.split_decay)."""
    new = model.new_parameters()
    decay, free = split_decay(model)
    groups = []
    for kind, params, wd in (("decay", decay, cfg.weight_decay), ("no_decay", free, 0.0)):
        for part, lr, is_new in (("backbone", cfg.lr_backbone, False), ("task", cfg.lr_task, True)):
            chosen = [p for p in params if (id(p) in new) == is_new]
            if chosen:
                groups.append(dict(name=f"{part}_{kind}", params=chosen, lr=lr, base_lr=lr,
                                   weight_decay=wd))
    return groups


# ----------------------------------------------------------------------------- building a run


def output_names(task: Task, meta: dict) -> list[str]:
    """The classifier's output names (meta classes or answers); [] for heads without labels."""
    return list(meta[task.outputs]) if task.outputs else []


def load_backbone(cfg: FinetuneConfig, tokenizer: Tokenizer) -> tuple[PTUnifier, dict | None, dict]:
    """(backbone, checkpoint metadata or None, checkpoint tensors) from --init, else a fresh preset
    model. The model Config comes from the checkpoint; its vocabulary must be the tokenizer's."""
    if not cfg.init:
        return build_model(TrainConfig(preset=cfg.preset), tokenizer), None, {}
    backbone, meta, tensors = load_pretrained(cfg.init)
    mcfg = backbone.config
    if mcfg.vocab_size != tokenizer.vocab_size or mcfg.pad_token_id != tokenizer.pad_id:
        raise SystemExit(f"{cfg.init}: the checkpoint's vocab_size={mcfg.vocab_size} (pad id "
                         f"{mcfg.pad_token_id}) does not match the tokenizer {locate_tokenizer(cfg.data, cfg.tokenizer)} "
                         f"(vocab_size={tokenizer.vocab_size}, pad id {tokenizer.pad_id}); pass the "
                         "tokenizer the checkpoint was pre-trained with (--tokenizer)")
    return backbone, meta, tensors


def recipe_of(cfg: FinetuneConfig, meta: dict | None) -> str:
    """The defaults table: the preset the --init checkpoint was pre-trained with, else --preset."""
    if meta is not None and meta.get("train_config"):
        return meta["train_config"].get("preset", "base")
    return cfg.preset


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


def save_finetuned(path: Path, model: FinetuneModel, names: list[str], epoch: int,
                   metrics: dict, cfg: FinetuneConfig, recipe: str = "base") -> None:
    """Atomic safetensors: backbone under "model/" (a valid --init), task modules under "task/"."""
    tensors = {f"model/{k}": v for k, v in model.backbone.state_dict().items()}
    for name, module in model.task_modules().items():
        tensors.update({f"task/{name}.{k}": v for k, v in module.state_dict().items()})
    tensors, aliases = dedupe_shared(tensors)
    meta = dict(format=FORMAT, model_config=dataclasses.asdict(model.backbone.config),
                train_config=dict(preset=recipe), state=dict(epoch=epoch), optimizer_groups=[], scaler=None,
                aliases=aliases, finetune=dict(task=model.task.name, outputs=names, epoch=epoch,
                                               val=metrics, config=dataclasses.asdict(cfg)))
    atomic_save(path, tensors, {"ptunifier": json.dumps(meta)})


def load_finetuned(path, folder, tokenizer: Tokenizer, device) -> FinetuneModel:
    """A fine-tuned checkpoint (OUT/best.safetensors) as an eval-mode model for a task folder."""
    backbone, meta, tensors = load_pretrained(path)
    if not meta.get("finetune"):
        raise CheckpointError(f"{path} is not a fine-tuned checkpoint (no task head inside)")
    task = TASKS[meta["finetune"]["task"]]
    names = output_names(task, read_meta(folder))
    model = FinetuneModel(backbone, task, len(names))
    load_task_modules(model, path, meta, tensors, names)
    return model.to(device).eval()


@torch.no_grad()
def predict_answers(path, folder, tokenizer: Tokenizer, device, n: int) -> list[str]:
    """The fine-tuned VQA model's answers to the first n test questions of `folder`."""
    model = load_finetuned(path, folder, tokenizer, device)
    cfg = model.backbone.config
    dataset = TaskDataset(folder, "test", tokenizer, cfg.image_size, cfg.max_text_len, train=False)
    batch = dataset.collate([dataset[i] for i in range(min(n, len(dataset)))]).to(device)
    names = output_names(model.task, read_meta(folder))
    return [names[i] for i in model.outputs(batch).argmax(dim=1).tolist()]


# ----------------------------------------------------------------------------- evaluation


@dataclass
class EvalContext:
    """What an evaluation needs besides the model."""
    folder: Path
    tokenizer: Tokenizer
    names: list[str]        # classifier output names (classes / answers)
    rt: Runtime
    cfg: FinetuneConfig


def autocast(rt: Runtime):
    return torch.autocast(rt.device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None)


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
        with autocast(ctx.rt):
            scores.append(torch.sigmoid(model.outputs(batch).float()).cpu())
        labels.append(batch.labels.cpu())
    s, y = torch.cat(scores).numpy(), torch.cat(labels).numpy()  # [N, C]
    per_class, excluded = {}, []
    for c, name in enumerate(ctx.names):
        if len(np.unique(y[:, c])) < 2:
            excluded.append(name)
        else:
            per_class[name] = auroc(s[:, c], y[:, c])
    if not per_class:
        raise ValueError(f"{ctx.folder} split {split!r}: no class has both label values")
    return dict(macro_auroc=float(np.mean(list(per_class.values()))), per_class=per_class,
                excluded=excluded)


def score_tc(model, ctx, split) -> dict:
    logits, labels = [], []
    for batch in eval_batches(model, ctx, split):
        with autocast(ctx.rt):
            logits.append(model.outputs(batch).float().cpu())
        labels.append(batch.labels.cpu())
    return dict(accuracy=accuracy(torch.cat(logits), torch.cat(labels)))


def score_vqa(model, ctx, split) -> dict:
    """Accuracy open / closed / overall; gold answers outside the vocabulary count as wrong and
    their number is reported (n_gold_out_of_vocab)."""
    preds, golds, kinds = [], [], []
    for batch in eval_batches(model, ctx, split):
        with autocast(ctx.rt):
            best = model.outputs(batch).argmax(dim=1).tolist()
        preds += [ctx.names[i] for i in best]
        golds += batch.answers
        kinds += batch.answer_types
    return dataclasses.asdict(vqa_accuracy(preds, golds, kinds, vocabulary=ctx.names))


def score_generation(model, ctx, split, final: bool) -> dict:
    """Generate from the fused streams, then BLEU-1..4, ROUGE-L, CIDEr-D (+ METEOR when final)."""
    tok, cfg = ctx.tokenizer, ctx.cfg
    hyps, refs = {}, {}
    for batch in eval_batches(model, ctx, split):
        with autocast(ctx.rt):
            memory, mask = generation_memory(model.backbone(**INPUTS[model.task.inputs](batch)))
            out = generate(model.decoder, memory, mask, tok.bos_id, tok.eos_id,
                           max_len=cfg.max_gen_len or model.backbone.config.max_text_len,
                           beams=cfg.beams, length_penalty=cfg.length_penalty,
                           no_repeat_ngram=cfg.no_repeat_ngram)
        for rid, ids, ref in zip(batch.ids, out, batch.references):
            hyps[rid], refs[rid] = tok.decode(ids), [ref]
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
        states.append(b.encode_image(batch.pixel_values))
        ids += list(batch.input_ids)
        masks += list(batch.attention_mask)
    states = torch.cat(states)  # [N, 1 + N_patch, Dv]

    def match(image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        probs = []
        for start in range(0, len(image_rows), ctx.cfg.eval_batch):
            i, t = image_rows[start:start + ctx.cfg.eval_batch], text_rows[start:start + ctx.cfg.eval_batch]
            text_ids = nn.utils.rnn.pad_sequence([ids[j] for j in t], batch_first=True,
                                                 padding_value=ctx.tokenizer.pad_id)
            text_mask = nn.utils.rnn.pad_sequence([masks[j] for j in t], batch_first=True)
            with autocast(ctx.rt):
                joint = b(image_states=states[i], input_ids=text_ids, attention_mask=text_mask).joint
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


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune, select the best epoch on val, evaluate test once; returns results.json's dict."""
    if cfg.task not in TASKS:
        raise SystemExit(f"--task {cfg.task!r}: expected one of {sorted(TASKS)}")
    task = TASKS[cfg.task]
    rt = setup_runtime(cfg.device)
    seed_everything(cfg.seed)  # the same initial head on every rank
    meta = read_meta(cfg.data)
    if meta["task"] != task.name:
        raise SystemExit(f"{cfg.data}/meta.json: task {meta['task']!r}, but --task {task.name}")
    tokenizer = Tokenizer.load(locate_tokenizer(cfg.data, cfg.tokenizer))
    backbone, init_meta, init_tensors = load_backbone(cfg, tokenizer)
    recipe = recipe_of(cfg, init_meta)
    cfg = cfg.resolved(recipe)
    names = output_names(task, meta)
    model = FinetuneModel(backbone, task, len(names)).to(rt.device)
    if init_meta is not None and load_task_modules(model, cfg.init, init_meta, init_tensors, names):
        print0(rt, f"task modules loaded from {cfg.init}")
    del init_tensors
    out = Path(cfg.out)
    ctx = EvalContext(Path(cfg.data), tokenizer, names, rt, cfg)

    mcfg = backbone.config
    train_set = TaskDataset(cfg.data, "train", tokenizer, mcfg.image_size, mcfg.max_text_len, train=True)
    loader = make_loader(train_set, cfg.batch_size // rt.world, train=True, seed=cfg.seed,
                         num_workers=cfg.workers)
    steps_per_epoch = len(loader) if not cfg.max_steps_per_epoch else min(len(loader), cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} training samples cannot fill one batch of {cfg.batch_size}")
    total = cfg.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.98), eps=1e-8,
                                  fused=rt.device.type == "cuda")
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    runner = model
    if rt.world > 1:  # unused parameters: the pool of the present modality, heads of other tasks
        runner = DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda"
                                         else None, find_unused_parameters=True)
    if rt.master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dict(finetune=dataclasses.asdict(cfg),
                                                         model=dataclasses.asdict(mcfg)), indent=2))
    print0(rt, f"{task.name}: {len(train_set)} training samples, {cfg.epochs} epochs x "
               f"{steps_per_epoch} steps, batch {cfg.batch_size}, lr backbone {cfg.lr_backbone:g} / "
               f"task {cfg.lr_task:g}, on {rt.device}")

    skips = SkipTracker(len(train_set))
    history, best, step, skipped_steps, started = [], None, 0, 0, time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
            loader.sampler.set_epoch(epoch)
        model.train()
        losses = []
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", disable=not rt.master, dynamic_ncols=True)
        for i, batch in enumerate(loader):
            if i == steps_per_epoch:
                break
            skips.update(batch)
            if len(batch) == 0:  # every image of the batch was unreadable
                continue
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, total, cfg.warmup)
            seed_step(cfg.seed, rt.rank, step)
            statistics = save_running_statistics(model)
            with autocast(rt):
                loss = runner(batch.to(rt.device, non_blocking=True))
            if any_rank([not torch.isfinite(loss).item()], rt)[0]:  # every rank skips together
                restore_running_statistics(model, statistics)  # the step leaves the model as it was
                skipped_steps += 1
                print0(rt, f"step {step}: non-finite loss, step skipped ({skipped_steps} so far)")
                step += 1
                continue
            scaler.scale(loss).backward()
            apply_update(model, optimizer, scaler, cfg.clip_grad)
            step += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        if rt.master:
            val = evaluate_split(model, ctx, "val")
            mean_loss = float(np.mean(losses)) if losses else float("nan")
            history.append(dict(epoch=epoch, train_loss=mean_loss, val=val))
            print0(rt, f"epoch {epoch}: train loss {mean_loss:.4f}, val {task.select} "
                       f"{val[task.select]:.4f}")
            if best is None or val[task.select] > best[1]:
                best = (epoch, val[task.select])
                save_finetuned(out / "best.safetensors", model, names, epoch, val, cfg, recipe)
        if rt.world > 1:
            dist.barrier()

    result = {}
    if rt.master:
        best_meta, tensors = read_checkpoint(out / "best.safetensors")
        load_model_state(out / "best.safetensors", best_meta, tensors, model.backbone)
        load_task_modules(model, out / "best.safetensors", best_meta, tensors, names)
        test = evaluate_split(model, ctx, "test")
        generated = test.pop("generated", None)
        if generated is not None:
            (out / "test_generations.jsonl").write_text("".join(json.dumps(g) + "\n" for g in generated))
        counts = {s: meta.get("counts", {}).get(s) for s in ("train", "val", "test")}
        result = dict(task=task.name, data=cfg.data, init=cfg.init, select=task.select,
                      best_epoch=best[0], best_val=best[1], history=history, test=test, n=counts,
                      skipped_steps=skipped_steps,
                      checkpoint=str(out / "best.safetensors"), seconds=time.perf_counter() - started,
                      config=dataclasses.asdict(cfg), model_config=dataclasses.asdict(mcfg))
        (out / "results.json").write_text(json.dumps(result, indent=2))
        print0(rt, f"test, best epoch {best[0]} (val {task.select} {best[1]:.4f}): " + ", ".join(
            f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float)))
    cleanup(rt)
    return result


def parse_args(argv=None) -> FinetuneConfig:
    return dataclass_cli(FinetuneConfig, argv, __doc__.split("\n")[0], {
        "task": f"one of {sorted(TASKS)}",
        "init": "pre-training (or fine-tuned) checkpoint; the model Config comes from it",
        "batch_size": "global batch; lower it (32, 16) if you run out of memory",
        "max_steps_per_epoch": "cap steps per epoch (quick checks); 0 uses the whole split",
        "itm_rerank": "retrieval: K > 0 re-ranks the top-K ITC candidates with ITM pair passes",
    }, required=("task", "data"))


def main(argv=None) -> None:
    finetune(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
