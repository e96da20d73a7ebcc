"""Zero-shot evaluation of a pre-trained PTUnifier as a dual encoder (paper 3.3, ITC, Eq. 9-10;
Table 2's zero-shot retrieval).

An image-only pass (image + textual prompts, Eq. 3-4) and a text-only pass (text + visual prompts)
each give an L2-normalised ITC embedding; their cosine similarity ranks candidates (retrieval) or
compares an image with "finding present" / "finding absent" sentences (zero-shot multi-label
classification).
"""
import contextlib
import warnings
from collections import Counter
from typing import Sequence

import numpy as np
import torch

from data import TaskDataset, make_loader, read_manifest
from metrics import auroc, recall_at_k



@contextlib.contextmanager
def _evaluating(model: torch.nn.Module):
    """model.eval() and torch.no_grad() inside the block; afterwards every submodule gets back
    its own previous training flag (so a partly frozen model stays as it was)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def _eval_loader(model, folder, split, tokenizer, task: str, batch_size: int, num_workers: int):
    """Eval-mode TaskDataset of `task` (unreadable images raise) and its in-order loader,
    with the model's image size and text length."""
    cfg = model.config
    dataset = TaskDataset(folder, split, tokenizer, cfg.image_size, cfg.max_text_len, train=False)
    if dataset.task != task:
        raise ValueError(f"zeroshot.py: {folder}/meta.json has task {dataset.task!r}, expected {task!r}")
    if len(dataset) == 0:
        raise ValueError(f"zeroshot.py: {folder}/manifest.jsonl has no records in split {split!r}")
    loader = make_loader(dataset, batch_size, train=False, seed=0, distributed=False,
                         num_workers=num_workers)
    return dataset, loader


def image_embeddings(model, pixel_values):
    """Image-only pass (textual prompts fill the text side) -> (emb [B, E], textual idx [B, k_t])."""
    out = model(pixel_values=pixel_values)
    return model.itc_image(out.joint), out.text_prompt_indices


def text_embeddings(model, input_ids, attention_mask):
    """Text-only pass (visual prompts fill the image side) -> (emb [B, E], visual idx [B, k_v])."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return model.itc_text(out.joint), out.image_prompt_indices


def embed_retrieval(model, folder, split, tokenizer, device, batch_size, num_workers: int = 2):
    """ITC embeddings of every pair of a retrieval task folder, in manifest order.

    Returns (image_emb [N, E], text_emb [N, E], textual_idx [N, k_t], visual_idx [N, k_v]) on
    the CPU: unit-norm embeddings from the image-only and the text-only pass, and the prompt-pool
    rows each pass selected. Runs under model.eval() and torch.no_grad(); the training flags are
    restored afterwards. An unreadable image raises (eval mode of data.TaskDataset).
    """
    _, loader = _eval_loader(model, folder, split, tokenizer, "retrieval", batch_size, num_workers)
    parts = ([], [], [], [])
    with _evaluating(model):
        for batch in loader:
            batch = batch.to(device)
            image_emb, textual_idx = image_embeddings(model, batch.pixel_values)
            text_emb, visual_idx = text_embeddings(model, batch.input_ids, batch.attention_mask)
            for store, value in zip(parts, (image_emb, text_emb, textual_idx, visual_idx)):
                store.append(value.float().cpu() if value.is_floating_point() else value.cpu())
    return tuple(torch.cat(store) for store in parts)


def zero_shot_retrieval(model, folder, split, tokenizer, device, batch_size=128,
                        num_workers: int = 2) -> dict:
    """Zero-shot image->text and text->image retrieval by ITC cosine similarity (Table 2 ITR/TIR).

    sim = image_emb @ text_emb.T [N, N]; text i belongs to image i; Recall@1/5/10 from
    `recall_at_k` (fractions, pessimistic ties). Keys: n, i2t_r1, i2t_r5, i2t_r10, t2i_r1,
    t2i_r5, t2i_r10, textual_prompts_used and visual_prompts_used (distinct pool rows selected
    over the split; k for static prompts), and n_duplicate_texts: pairs whose text occurs more
    than once in the split. Identical texts get identical embeddings, so with pessimistic ties
    such a pair can never be a hit at rank 1 in i2t; the count says how much that caps R@1.
    """
    image_emb, text_emb, textual_idx, visual_idx = embed_retrieval(
        model, folder, split, tokenizer, device, batch_size, num_workers)
    recall = recall_at_k(image_emb @ text_emb.T, ks=(1, 5, 10))  # sim [N_img, N_txt]
    texts = Counter(r["text"] for r in read_manifest(folder, split)[0])
    result = {"n": len(image_emb)}
    for direction, scores in (("i2t", recall.i2t), ("t2i", recall.t2i)):
        result.update({f"{direction}_r{k}": scores[k] for k in (1, 5, 10)})
    result["textual_prompts_used"] = int(textual_idx.unique().numel())
    result["visual_prompts_used"] = int(visual_idx.unique().numel())
    result["n_duplicate_texts"] = sum(n for n in texts.values() if n > 1)
    return result


def default_label_sentences(classes: Sequence[str]) -> dict[str, tuple[str, str]]:
    """class -> (positive, negative) sentence: "There is {name}." / "There is no {name}.",
    name = the class with underscores as spaces ("pleural_effusion" -> "pleural effusion")."""
    sentences = {}
    for c in classes:
        name = c.replace("_", " ")
        sentences[c] = (f"There is {name}.", f"There is no {name}.")
    return sentences


def _check_sentences(sentences: dict, classes: list[str], where) -> None:
    if set(sentences) != set(classes):
        raise ValueError(f"zeroshot.py zero-shot classification: prompts for {where} must have "
                         f"exactly the keys {classes}; missing {sorted(set(classes) - set(sentences))}, "
                         f"unknown {sorted(set(sentences) - set(classes))}")
    for c, pair in sentences.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise ValueError(f"zeroshot.py zero-shot classification: prompts[{c!r}] must be "
                             f"(positive sentence, negative sentence), got {pair!r}")


def sentence_embeddings(model, tokenizer, sentences: list[str], device, batch_size) -> torch.Tensor:
    """Text-only ITC embeddings of a list of sentences -> [S, E] (call inside _evaluating)."""
    chunks = []
    for start in range(0, len(sentences), batch_size):
        ids, mask = tokenizer.encode(sentences[start:start + batch_size], model.config.max_text_len)
        chunks.append(text_embeddings(model, ids.to(device), mask.to(device))[0].float().cpu())
    return torch.cat(chunks)


def zero_shot_class_scores(model, folder, split, tokenizer, device, batch_size=128, prompts=None,
                           num_workers: int = 2):
    """Zero-shot probabilities of every class for every image of an `ic` task folder.

    For class c with positive / negative sentence embeddings p_c, n_c (text-only pass) and image
    embedding v (image-only pass), all unit-norm:
        score[i, c] = softmax(logit_scale * (v_i . p_c, v_i . n_c))[0]
    Returns (scores [N, C] float64, labels [N, C] int, classes). `prompts` maps every class of
    meta["classes"] to (positive, negative); None uses `default_label_sentences`.
    """
    dataset, loader = _eval_loader(model, folder, split, tokenizer, "ic", batch_size, num_workers)
    classes = list(dataset.classes)
    sentences = default_label_sentences(classes) if prompts is None else prompts
    _check_sentences(sentences, classes, folder)
    texts = [sentences[c][0] for c in classes] + [sentences[c][1] for c in classes]
    images, labels = [], []
    with _evaluating(model):
        label_emb = sentence_embeddings(model, tokenizer, texts, device, batch_size)  # [2C, E]
        for batch in loader:
            images.append(image_embeddings(model, batch.pixel_values.to(device))[0].float().cpu())
            labels.append(batch.labels)
        scale = float(model.logit_scale())
    scores = present_probabilities(torch.cat(images), label_emb, scale)
    return scores.numpy(), torch.cat(labels).long().numpy(), classes


def present_probabilities(image_emb: torch.Tensor, label_emb: torch.Tensor, scale: float) -> torch.Tensor:
    """P(class present) of every image: image_emb [N, E] against label_emb [2C, E] (the C
    positive sentences, then the C negative ones, all unit-norm) ->
    softmax(scale * (v . p_c, v . n_c))[0] as float64 [N, C]."""
    sim = image_emb @ label_emb.T                                    # [N, 2C]
    pos_neg = torch.stack(sim.split(len(label_emb) // 2, dim=1), -1)  # [N, C, 2]
    return torch.softmax(scale * pos_neg.double(), dim=-1)[..., 0]


def zero_shot_classification(model, folder, split, tokenizer, device, batch_size=128, prompts=None,
                             num_workers: int = 2) -> dict:
    """Zero-shot multi-label image classification AUROC (CheXpert / RSNA style) from ITC embeddings.

    Scores from `zero_shot_class_scores`. Returns {"n", "classes", "per_class": {class: AUROC or
    None}, "excluded": {class: reason}, "macro_auroc"}: the macro AUROC is the mean over the
    classes whose labels in this split take both values; a class with a single label value has no
    AUROC, is listed in "excluded" and raises a warning (never dropped silently). Raises
    ValueError when no class can be scored.
    """
    scores, labels, classes = zero_shot_class_scores(
        model, folder, split, tokenizer, device, batch_size, prompts, num_workers)
    per_class, excluded = {}, {}
    for c, name in enumerate(classes):
        values = np.unique(labels[:, c])
        if values.size < 2:
            per_class[name] = None
            excluded[name] = f"every {split} label is {int(values[0])}"
            continue
        per_class[name] = auroc(scores[:, c], labels[:, c])
    if excluded:
        warnings.warn(f"zeroshot.py zero_shot_classification: {folder} split {split!r}: no AUROC "
                      f"for {excluded}; macro AUROC is over the other classes")
    valid = [v for v in per_class.values() if v is not None]
    if not valid:
        raise ValueError(f"zeroshot.py zero_shot_classification: {folder} split {split!r}: "
                         f"no class has both label values ({excluded})")
    return {"n": len(scores), "classes": classes, "per_class": per_class, "excluded": excluded,
            "macro_auroc": float(np.mean(valid))}
