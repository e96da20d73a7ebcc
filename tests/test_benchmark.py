"""The benchmark report: trivial baselines by hand, the Table-2 layout, and the driver end to end
with one short fine-tuning run per task."""
import json
from collections import Counter

import pytest
import torch

import evaluate
import synth
import train
from data import read_manifest
from metrics import normalize_text


def coco_bleu_rouge(constant: str, references: list[str]) -> tuple[float, float]:
    """pycocoevalcap's corpus BLEU-4 and ROUGE-L of answering `constant` to every reference, on the
    normalised tokens that the benchmark scores (its PTBTokenizer needs CoreNLP)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge
    hyp = " ".join(normalize_text(constant))
    res = {i: [hyp] for i in range(len(references))}
    gts = {i: [" ".join(normalize_text(r))] for i, r in enumerate(references)}
    return Bleu(4).compute_score(gts, res, verbose=0)[0][3], Rouge().compute_score(gts, res)[0]


def test_trivial_baselines_by_hand(bench):
    base = evaluate.trivial_baselines(bench)
    tc_train, _ = read_manifest(bench / "tc", "train")
    tc_test, _ = read_manifest(bench / "tc", "test")
    majority = Counter(r["label"] for r in tc_train).most_common(1)[0][0]
    assert base["tc"]["accuracy"] == sum(r["label"] == majority for r in tc_test) / len(tc_test)
    vqa_train, _ = read_manifest(bench / "vqa", "train")
    vqa_test, _ = read_manifest(bench / "vqa", "test")
    answer = Counter(r["answer"] for r in vqa_train).most_common(1)[0][0]
    assert base["vqa"]["overall"] == pytest.approx(sum(r["answer"] == answer for r in vqa_test) / len(vqa_test))
    assert base["retrieval"] == {"i2t_r1": 1 / 16, "t2i_r1": 1 / 16}
    assert base["ic"] == {"macro_auroc": 0.5}
    for task, field in (("ts", "target"), ("itg", "report")):  # the most frequent train text, for all
        constant = Counter(r[field] for r in read_manifest(bench / task, "train")[0]).most_common(1)[0][0]
        test = read_manifest(bench / task, "test")[0]
        bleu, rouge = coco_bleu_rouge(constant, [r[field] for r in test])
        assert base[task]["rouge_l"] == pytest.approx(rouge, abs=1e-9)
        assert base[task]["bleu_4"] == pytest.approx(bleu, abs=1e-9)
    assert base["itg"]["rouge_l"] > 0 and base["itg"]["bleu_4"] > 0  # values with something to compare
    itg_train, _ = read_manifest(bench / "itg", "train")
    constant = Counter(r["report"] for r in itg_train).most_common(1)[0][0]
    stated = synth.label_report(constant)
    truth = [r["labels"] for r in read_manifest(bench / "ic", "test")[0]]
    tp = sum(s and t for row in truth for s, t in zip(stated, row))
    wrong = sum(s != t for row in truth for s, t in zip(stated, row))  # fp + fn
    assert base["itg"]["ce_f1"] == pytest.approx(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)


def test_benchmark_refuses_another_synth_version(bench, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    summary = json.loads((bench / "summary.json").read_text())
    (old / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "version"}))
    with pytest.raises(SystemExit, match="version 1, this synth.py writes version 2.*python synth.py --out"):
        evaluate.run_benchmark("unused.safetensors", old, tmp_path / "out", "cpu")
    synth.check_version(bench)  # the current version passes


def test_table_follows_table_2_layout():
    rows = {"a": {"ic": {"macro_auroc": 0.9}, "vqa": {"overall": 0.5}}, "b": {}}
    lines = evaluate.table_markdown(rows).splitlines()
    titles = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert titles[:2] == ["method", "Uni-modal: IC AUROC"] and titles[-1] == "Multi-modal: VQA Acc"
    assert sum(t.startswith("Cross-modal") for t in titles) == 5
    assert lines[1] == "|---" * 10 + "|"
    assert lines[2] == "| a | 90.0 | - | - | - | - | - | - | - | 50.0 |"
    assert lines[3].count("-") == 9


def test_benchmark_driver_end_to_end(bench, tmp_path, monkeypatch):
    """Pre-train a few steps, then the driver fine-tunes every task (one short epoch each) and
    writes the table, its JSON and the example sheet."""
    run = tmp_path / "pre"
    train.main(["--data", str(bench / "pretrain"), "--out", str(run), "--steps", "2", "--batch-size", "8",
                "--workers", "0"])
    import finetune
    real = finetune.FinetuneConfig

    def short(**kw):
        return real(**kw, epochs=1, max_steps_per_epoch=2, batch_size=8, workers=0, eval_batch=16)
    monkeypatch.setattr(finetune, "FinetuneConfig", short)
    rows = evaluate.run_benchmark(run / "checkpoint.safetensors", bench, tmp_path / "bench", "cpu")
    assert set(rows) == {"trivial baseline", "pixel logistic regression", "PTUnifier zero-shot",
                         "PTUnifier fine-tuned"}
    assert set(rows["PTUnifier fine-tuned"]) == {"ic", "tc", "ts", "retrieval", "itg", "vqa"}
    saved = json.loads((tmp_path / "bench" / "table.json").read_text())
    assert saved["rows"]["PTUnifier fine-tuned"]["vqa"]["overall"] == rows["PTUnifier fine-tuned"]["vqa"]["overall"]
    assert (tmp_path / "bench" / "table.md").read_text().count("\n") == 6
    assert 0 <= rows["pixel logistic regression"]["ic"]["macro_auroc"] <= 1
    generated = (tmp_path / "bench" / "itg" / "test_generations.jsonl").read_text().splitlines()
    assert len(generated) == 16 and 0 <= rows["PTUnifier fine-tuned"]["itg"]["ce_f1"] <= 1
    assert (tmp_path / "bench" / "examples.png").stat().st_size > 1000

    # Run again: every task folder holds a finished run of the same configuration and is kept;
    # a task whose configuration changed (tc: 2 steps per epoch -> 1) is fine-tuned again.
    ran, original = [], finetune.finetune
    monkeypatch.setattr(finetune, "finetune", lambda cfg: ran.append(cfg.task) or original(cfg))
    assert evaluate.run_benchmark(run / "checkpoint.safetensors", bench, tmp_path / "bench", "cpu") == rows
    assert ran == []
    monkeypatch.setattr(finetune, "FinetuneConfig", lambda **kw: short(**kw) if kw["task"] != "tc" else
                        real(**kw, epochs=1, max_steps_per_epoch=1, batch_size=8, workers=0, eval_batch=16))
    again = evaluate.run_benchmark(run / "checkpoint.safetensors", bench, tmp_path / "bench", "cpu")
    assert ran == ["tc"] and again["PTUnifier fine-tuned"]["vqa"] == rows["PTUnifier fine-tuned"]["vqa"]


def test_pixel_baseline_fits_the_logistic_regression_of_scikit_learn():
    """fit_logistic minimises the mean BCE over the N x K cells + p |W|^2, i.e. for each of the K
    columns sum(log-loss) / (N K) + p |w|^2; scikit-learn's LogisticRegression minimises
    C sum(log-loss) + |w|^2 / 2: the same optimum for C = 1 / (2 p N K), equal probabilities."""
    from sklearn.linear_model import LogisticRegression
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    y = (x @ torch.randn(6, 2, generator=g) + 0.5 * torch.randn(200, 2, generator=g) > 0).float()
    linear = evaluate.fit_logistic(x, y, penalty=0.01)
    ours = torch.sigmoid(linear(x)).detach().numpy()
    for c in range(2):
        reference = LogisticRegression(C=1 / (2 * 0.01 * 200 * 2), tol=1e-10, max_iter=1000).fit(x.numpy(), y[:, c].numpy())
        assert abs(ours[:, c] - reference.predict_proba(x.numpy())[:, 1]).max() < 1e-3
