"""The downstream tasks (paper section 5.2): what each one feeds the fusion pass, its head and loss,
the fine-tuning model, its checkpoints and text generation. finetune.py trains them; predict.py
uses them.

| task      | input of the fusion pass          | head on top                  | loss         | metric (selection)  |
|-----------|-----------------------------------|------------------------------|--------------|---------------------|
| ic        | image + textual prompts           | ClassifierHead(2H, classes)  | BCE          | macro AUROC         |
| tc        | text pair + visual prompts        | ClassifierHead(2H, classes)  | CE           | accuracy            |
| vqa       | image + question                  | ClassifierHead(2H, answers)  | BCE x A      | accuracy (overall)  |
| ts        | source text + visual prompts      | TextDecoder on fused streams | token CE     | ROUGE-L             |
| itg       | image + textual prompts           | TextDecoder on fused streams | token CE     | BLEU-4              |
| retrieval | image-only and text-only passes   | ITC projections (+ ITM)      | ITC (Eq. 9-10) | mean R@1/5/10     |

A fine-tuned checkpoint holds the PTUnifier weights under "model/" (a valid --init again) and the
task modules under "task/"; its metadata names the task and the head's outputs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import CheckpointError
from generation import TextDecoder, generate, generation_memory
from losses import itc_loss
from model import ClassifierHead, PTUnifier
from tokenizer import Tokenizer

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

FREEZE = ("none", "encoders", "backbone")  # --freeze: what keeps its loaded weights


# ----------------------------------------------------------------------------- the model


class FinetuneModel(nn.Module):
    """The PTUnifier backbone plus the task's new modules; forward(batch) -> loss, so that DDP wraps
    a single forward."""

    def __init__(self, backbone: PTUnifier, task: Task, n_outputs: int = 0, blank: bool = False,
                 freeze: str = "none"):
        super().__init__()
        self.backbone, self.task, self.blank = backbone, task, blank
        self.head = ClassifierHead(2 * backbone.config.hidden_size, n_outputs) \
            if task.head == "classifier" else None
        self.decoder = TextDecoder.from_encoder(backbone) if task.head == "decoder" else None
        self.frozen = self.frozen_modules(freeze)
        new = self.new_parameters()
        for p in backbone.parameters() if freeze == "backbone" else []:
            p.requires_grad_(id(p) in new)
        for module in self.frozen:
            module.requires_grad_(False)

    def frozen_modules(self, freeze: str) -> list[nn.Module]:
        """The modules --freeze keeps as loaded (and in eval mode): none, the two encoders, or every
        part of the backbone but the task layers that live in it (retrieval's ITC and ITM heads)."""
        b = self.backbone
        if freeze == "encoders":
            return [b.vision, b.text]
        if freeze == "backbone":
            new = self.new_parameters()
            return [m for m in b.children() if not any(id(p) in new for p in m.parameters())]
        return []

    def train(self, mode: bool = True) -> "FinetuneModel":
        """Frozen modules stay in eval mode (no dropout, running statistics kept): fixed features."""
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

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


# ----------------------------------------------------------------------------- checkpoints and generation


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


@dataclass(frozen=True)
class Decoding:
    """How a decoder searches its text (FinetuneConfig's generation fields, as a fine-tune saved them)."""
    beams: int = 1
    max_gen_len: int | None = None
    length_penalty: float = 1.0
    no_repeat_ngram: int = 0

    @classmethod
    def of(cls, config: dict) -> "Decoding":
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})


def generate_texts(model: FinetuneModel, batch, tokenizer: Tokenizer, cfg: Decoding) -> list[str]:
    """The decoder's text for each input of a batch (ts: its source text, itg: its image), searched
    with the run's settings (a FinetuneConfig or a Decoding: beams, max_gen_len, length_penalty,
    no_repeat_ngram)."""
    memory, mask = generation_memory(model.backbone(**model.fusion_inputs(batch)))
    out = generate(model.decoder, memory, mask, tokenizer.bos_id, tokenizer.eos_id,
                   max_len=cfg.max_gen_len or model.backbone.config.max_text_len, beams=cfg.beams,
                   length_penalty=cfg.length_penalty, no_repeat_ngram=cfg.no_repeat_ngram)
    return [tokenizer.decode(ids) for ids in out]
