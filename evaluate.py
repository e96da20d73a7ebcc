"""The Table-2 benchmark: zero-shot evaluation and fine-tuning of one pre-trained checkpoint on
every task of a benchmark, reported as one table (paper section 5.2, Table 2).

    python evaluate.py --benchmark synth --checkpoint runs/pretrain/checkpoint.safetensors

Writes table.md, table.json and examples.png (retrieval and VQA examples) under --out, beside one
fine-tuning run folder per task. Rows: a trivial baseline per task (input-blind answers scored
with the same metric code), logistic regression on the raw pixels for image classification (the
bar a learned image encoder has to clear), PTUnifier zero-shot (retrieval and classification by
ITC similarity, zeroshot.py) and PTUnifier fine-tuned (finetune.py with the checkpoint's recipe).
A task folder that already holds a finished run of the same configuration is kept, so an
interrupted benchmark, or one whose recipe changed for some tasks, re-runs only what differs.
"""
import argparse
import dataclasses
import json
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import finetune
import synth
from checkpoint import load_pretrained
from data import TaskDataset, load_image, read_manifest, resolve_image
from metrics import class_aurocs, clinical_efficacy, nlg_metrics, vqa_accuracy
from predict import Predictor
from tokenizer import Tokenizer
from zeroshot import embed_retrieval, zero_shot_classification, zero_shot_retrieval


# Table 2's layout: (group, column, task, key of the task's test metrics). Scores print as 100 x.
TABLE = [("Uni-modal", "IC AUROC", "ic", "macro_auroc"),
         ("Uni-modal", "TC Acc", "tc", "accuracy"),
         ("Uni-modal", "TS ROUGE-L", "ts", "rouge_l"),
         ("Cross-modal", "ITR R@1", "retrieval", "i2t_r1"),
         ("Cross-modal", "TIR R@1", "retrieval", "t2i_r1"),
         ("Cross-modal", "ITG BLEU-4", "itg", "bleu_4"),
         ("Cross-modal", "ITG ROUGE-L", "itg", "rouge_l"),
         ("Cross-modal", "ITG CE F1", "itg", "ce_f1"),
         ("Multi-modal", "VQA Acc", "vqa", "overall")]


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def report_efficacy(root, generated: dict[str, str]) -> dict:
    """Clinical efficacy of generated findings {case id: text} on the synthetic benchmark in
    `root`: the classes each text states, read back by synth.label_report, against the ground
    truth of the same cases (the ic task's labels)."""
    truth = {r["id"]: r["labels"] for r in read_manifest(Path(root) / "ic", "test")[0]}
    ids = list(generated)
    return clinical_efficacy([synth.label_report(generated[i]) for i in ids], [truth[i] for i in ids],
                             synth.IC_CLASSES)


def trivial_baselines(root) -> dict[str, dict]:
    """Test metrics of answers that ignore the input, computed with the same metric code: a
    constant score (AUROC 0.5), the training split's most frequent class / answer / text (its
    clinical efficacy too, for the report), and chance-level recall (K / N)."""
    root = Path(root)
    split = lambda task, s: read_manifest(root / task, s)[0]  # noqa: E731
    out = {"ic": {"macro_auroc": 0.5}}
    majority = _most_common(r["label"] for r in split("tc", "train"))
    out["tc"] = {"accuracy": float(np.mean([r["label"] == majority for r in split("tc", "test")]))}
    for task, field in (("ts", "target"), ("itg", "report")):
        constant = _most_common(r[field] for r in split(task, "train"))
        test = split(task, "test")
        scores = nlg_metrics({r["id"]: constant for r in test}, {r["id"]: [r[field]] for r in test},
                             with_meteor=False)
        out[task] = {"rouge_l": scores.rouge_l, "bleu_4": scores.bleu_4, "cider": scores.cider}
        if task == "itg":
            out[task].update(report_efficacy(root, {r["id"]: constant for r in test}))
    n = len(split("retrieval", "test"))
    out["retrieval"] = {"i2t_r1": 1 / n, "t2i_r1": 1 / n}
    answer = _most_common(r["answer"] for r in split("vqa", "train"))
    test = split("vqa", "test")
    out["vqa"] = {"overall": vqa_accuracy([answer] * len(test), [r["answer"] for r in test],
                                          [r["answer_type"] for r in test]).overall}
    return out


def pixel_features(folder, split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grey values [N, S * S], labels [N, C]) of an `ic` task split: the model's evaluation
    input (resize, centre crop, CLIP normalisation) averaged over the colour channels (radiographs
    are grey: the three channels carry one image)."""
    dataset = TaskDataset(folder, split, None, image_size, 0, train=False)
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    return batch.pixel_values.mean(dim=1).flatten(1), batch.labels


def fit_logistic(x: torch.Tensor, y: torch.Tensor, penalty: float) -> torch.nn.Linear:
    """One logistic regression per column of y [N, C] on features x [N, F]: a linear layer fitted by
    L-BFGS (at most 100 iterations) to the mean BCE over the N x C cells + penalty x |W|^2 (the
    bias is not penalised)."""
    linear = torch.nn.Linear(x.shape[1], y.shape[1])
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(linear(x), y) + penalty * linear.weight.square().sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    return linear


def pixel_logistic_regression(root, image_size: int, penalties=(1e-4, 1e-3, 1e-2, 1e-1)) -> dict:
    """Image classification from raw pixels (`fit_logistic` on the standardised image_size-px grey
    values of the train split); the penalty with the best validation macro AUROC is tested once.
    Returns {"macro_auroc", "per_class", "penalty"} on the test split (classes with one label
    value in a split have no AUROC there and are left out)."""
    folder = Path(root) / "ic"
    classes = read_manifest(folder, "test")[1]["classes"]
    (x, y), (xv, yv), (xt, yt) = (pixel_features(folder, s, image_size) for s in ("train", "val", "test"))
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    x, xv, xt = ((v - mean) / std for v in (x, xv, xt))

    def scores(linear, features, labels) -> dict[str, float]:
        with torch.no_grad():
            return class_aurocs(linear(features).numpy(), labels.numpy(), classes)[0]
    fitted = {p: fit_logistic(x, y, p) for p in penalties}
    best = max(penalties, key=lambda p: np.mean(list(scores(fitted[p], xv, yv).values())))
    per_class = scores(fitted[best], xt, yt)
    return {"macro_auroc": float(np.mean(list(per_class.values()))), "per_class": per_class, "penalty": best}


def table_markdown(rows: dict[str, dict[str, dict]]) -> str:
    """Rows {name: {task: test metrics}} as a Markdown table with Table 2's column groups
    (uni-modal, cross-modal, multi-modal) named in each column title."""
    lines = ["| method | " + " | ".join(f"{group}: {col}" for group, col, _, _ in TABLE) + " |",
             "|---" * (len(TABLE) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [metrics.get(task, {}).get(key) for _, _, task, key in TABLE]
        lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{100 * c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width))


def example_sheet(model, tokenizer, root, vqa_checkpoint, device, path, n: int = 4) -> None:
    """A PNG for a human: n test images with their report and the zero-shot top-1 retrieved
    report, and n VQA questions with the fine-tuned model's answer next to the gold one."""
    root = Path(root)
    records, meta = read_manifest(root / "retrieval", "test")
    image_emb, text_emb, _, _ = embed_retrieval(model, root / "retrieval", "test", tokenizer, device, 128)
    top1 = (image_emb[:n] @ text_emb.T).argmax(dim=1).tolist()
    vqa_records, vqa_meta = read_manifest(root / "vqa", "test")
    vqa_records = vqa_records[:n]
    vqa = Predictor.load(vqa_checkpoint, root / "tokenizer.json", device.type, progress=False)
    predicted = [row["answer"] for row in vqa.answer(
        [resolve_image(root / "vqa", vqa_meta, r["image"]) for r in vqa_records], [r["question"] for r in vqa_records])]

    size, width = 160, 760
    sheet = Image.new("RGB", (width, 2 * n * (size + 10) + 40), "white")
    draw = ImageDraw.Draw(sheet)
    y = 10
    for i, j in enumerate(top1):
        im = load_image(resolve_image(root / "retrieval", meta, records[i]["image"])).resize((size, size))
        sheet.paste(im, (10, y))
        mark = "HIT" if j == i else "miss"
        draw.text((size + 20, y), f"retrieval ({mark}) - true report:\n{_wrap(records[i]['text'], 95)}\n"
                                  f"top-1 retrieved (zero-shot ITC):\n{_wrap(records[j]['text'], 95)}",
                  fill="black")
        y += size + 10
    for r, answer in zip(vqa_records, predicted):
        im = load_image(resolve_image(root / "vqa", vqa_meta, r["image"])).resize((size, size))
        sheet.paste(im, (10, y))
        mark = "correct" if answer == r["answer"] else "wrong"
        draw.text((size + 20, y), f"VQA ({r['answer_type']}, {mark})\nQ: {r['question']}\n"
                                  f"predicted: {answer}\ngold: {r['answer']}", fill="black")
        y += size + 10
    sheet.save(path)


def finished_run(cfg: finetune.FinetuneConfig) -> dict | None:
    """The results.json in cfg.out of an earlier fine-tune with exactly this configuration (an
    interrupted or partly changed benchmark re-runs only what differs), else None."""
    path = Path(cfg.out) / "results.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg.resolved())))
    if result.get("config") != wanted:
        return None
    print(f"{cfg.task}: kept the finished run in {cfg.out} (same configuration)", flush=True)
    return result


def run_benchmark(checkpoint, root, out, device="auto") -> dict:
    """Zero-shot evaluation of `checkpoint`, then fine-tune and test it on every task of the
    benchmark in `root`; writes table.md, table.json and examples.png under `out`."""
    root, out = Path(root), Path(out)
    synth.check_version(root)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    tokenizer = Tokenizer.load(root / "tokenizer.json")
    model = load_pretrained(checkpoint)[0].to(device)

    zs_ret = zero_shot_retrieval(model, root / "retrieval", "test", tokenizer, device)
    zs_ic = zero_shot_classification(model, root / "ic", "test", tokenizer, device)
    results = {}
    for task in ("ic", "tc", "ts", "retrieval", "itg", "vqa"):
        cfg = finetune.FinetuneConfig(task=task, data=str(root / task), init=str(checkpoint),
                                      out=str(out / task), device=device.type)
        results[task] = finished_run(cfg) or finetune.finetune(cfg)
    generated = [json.loads(line) for line in (out / "itg" / "test_generations.jsonl").open()]
    results["itg"]["test"].update(report_efficacy(root, {g["id"]: g["generated"] for g in generated}))
    rows = {"trivial baseline": trivial_baselines(root),
            "pixel logistic regression": {"ic": pixel_logistic_regression(root, model.config.image_size)},
            "PTUnifier zero-shot": {"ic": {"macro_auroc": zs_ic["macro_auroc"]},
                                    "retrieval": {k: zs_ret[k] for k in ("i2t_r1", "t2i_r1")}},
            "PTUnifier fine-tuned": {task: r["test"] for task, r in results.items()}}
    table = table_markdown(rows)
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps(dict(
        checkpoint=str(checkpoint), rows=rows, zero_shot=dict(retrieval=zs_ret, ic=zs_ic),
        finetune={t: {k: r[k] for k in ("best_epoch", "best_val", "seconds", "test")}
                  for t, r in results.items()}), indent=2, default=float))
    example_sheet(model, tokenizer, root, out / "vqa" / "best.safetensors", device, out / "examples.png")
    print(table)
    print(f"written: {out / 'table.md'}, {out / 'table.json'}, {out / 'examples.png'}")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Zero-shot and fine-tuned evaluation of a PTUnifier "
                                            "checkpoint on a benchmark, as one Table-2-style report.")
    p.add_argument("--benchmark", choices=["synth"], default="synth",
                   help="the benchmark to run (the built-in synthetic one)")
    p.add_argument("--data", default="data/synth", help="benchmark root (task folders + tokenizer.json)")
    p.add_argument("--checkpoint", required=True, help="pre-training checkpoint (checkpoint.safetensors)")
    p.add_argument("--out", default="runs/benchmark", help="where fine-tuning runs and the table go")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    a = p.parse_args(argv)
    run_benchmark(a.checkpoint, a.data, a.out, a.device)


if __name__ == "__main__":
    main()
