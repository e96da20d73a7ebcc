"""Tests for synth.py: determinism (same seed -> same bytes), schema validity of all seven task
folders, splits disjoint by case, reported duplicate rate, rendered findings."""
import dataclasses
import json
from collections import Counter

import numpy as np
import pytest

import data
import synth
from metrics import normalize_text
from tokenizer import Tokenizer

TASKS = ("pretrain", "ic", "tc", "ts", "retrieval", "itg", "vqa")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    outs = [tmp_path_factory.mktemp(f"run{i}") for i in range(2)]
    for i, out in enumerate(outs):  # one in-process, one with a worker pool: same bytes
        synth.generate(out, 20, 5, 5, seed=3, image_size=64, vocab_size=500, workers=1 + i)
    return outs


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(two_runs, tmp_path):
    a, b = (_files(o) for o in two_runs)
    assert a.keys() == b.keys() and len([k for k in a if k.startswith("images/")]) == 30
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    synth.generate(tmp_path, 20, 5, 5, seed=4, image_size=64, vocab_size=500, workers=1)
    other = _files(tmp_path)
    assert other["ic/manifest.jsonl"] != a["ic/manifest.jsonl"]
    assert other["images/case00000.png"] != a["images/case00000.png"]


def test_task_folders_valid_and_splits_disjoint(two_runs):
    out = two_runs[0]
    for task in TASKS:
        records, meta = data.read_manifest(out / task)
        assert meta["task"] == task
        by_split = {}
        for r in records:
            case = r["id"].split("-")[0]
            by_split.setdefault(r["split"], set()).add(case)
            if "image" in r:
                assert data.resolve_image(out / task, meta, r["image"]).is_file()
        assert set(by_split) == {"train", "val", "test"}
        assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
        assert not (by_split["val"] & by_split["test"])
    _, vqa_meta = data.read_manifest(out / "vqa")
    train_val = {r["answer"] for r in data.read_manifest(out / "vqa")[0] if r["split"] != "test"}
    assert set(vqa_meta["answers"]) == train_val
    tok = Tokenizer.load(out / "tokenizer.json")
    assert tok.kind == "bpe" and tok.mask_id == 4


def test_summary_reports_duplicates_and_chance(two_runs, tmp_path):
    """The summary's duplicate rates and constant-text ROUGE-L, recounted from the task folders of
    a benchmark with 60 test cases: the share of test texts that occur more than once among them,
    and pycocoevalcap's ROUGE-L of the most frequent train text answered to every test case."""
    from pycocoevalcap.rouge.rouge import Rouge
    out = tmp_path
    synth.generate(out, 20, 5, 60, seed=3, image_size=16, vocab_size=300, workers=1)
    s = json.loads((out / "summary.json").read_text())

    def texts(task, field, split="test"):
        return [r[field] for r in data.read_manifest(out / task, split)[0]]

    for key, (task, field) in {"reports": ("retrieval", "text"), "findings": ("itg", "report"),
                               "impression": ("ts", "target")}.items():
        counts = Counter(texts(task, field))
        repeated = sum(n for n in counts.values() if n > 1)
        assert s[f"duplicate_rate_test_{key}"] == repeated / sum(counts.values()), key
    assert s["duplicate_rate_test_impression"] > 0  # short impressions repeat: the count has teeth
    for chance, task, field in ((s["chance"]["ts"]["rouge_l"], "ts", "target"),
                                (s["chance"]["itg"]["constant_report_rouge_l"], "itg", "report")):
        constant = Counter(texts(task, field, "train")).most_common(1)[0][0]
        refs = texts(task, field)
        gts = {i: [" ".join(normalize_text(r))] for i, r in enumerate(refs)}
        res = {i: [" ".join(normalize_text(constant))] for i in range(len(refs))}
        assert chance == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-9), task
    s = json.loads((two_runs[0] / "summary.json").read_text())  # 5 test cases
    assert s["chance"]["retrieval"]["R@1"] == pytest.approx(1 / 5)
    assert s["chance"]["ic"]["macro_auroc"] == 0.5
    assert "not unique within test" in (two_runs[0] / "README.md").read_text()
    assert synth.duplicate_rate(["a", "b", "a", "c"]) == 0.5


def test_reports_are_mostly_unique_and_state_the_attributes():
    findings = []
    for i in range(300):
        item = synth.make_case(0, i, 16)
        c, text = item["case"], item["findings"].lower()
        findings.append(item["findings"])  # the itg target: unique without the header too
        assert ("pneumothorax" in text) and ("effusion" in text or "costophrenic" in text)
        if c.cardiomegaly:
            assert "enlarge" in text or "cardiomegaly" in text
        if c.device:
            assert c.device.lower() in text
        assert all(len(t.split()) >= 3 for t in (item["findings"], item["impression"]))
    assert synth.duplicate_rate(findings) < 0.05


def test_itg_findings_are_the_report_without_its_header():
    for i in range(50):
        item = synth.make_case(0, i, 16)
        header = item["report"][: len(item["report"]) - len(item["findings"])]
        assert item["report"].endswith(" " + item["findings"]) and header.strip()
        assert synth.label_report(header) == [0] * 6  # view and comparison lines state no finding


def test_label_report_reads_back_every_generated_report():
    """The labeler recovers the ground truth exactly from the findings and from the full report."""
    for i in range(400):
        item = synth.make_case(1, i, 16)
        truth = synth._labels(item["case"])
        assert synth.label_report(item["findings"]) == truth, item["findings"]
        assert synth.label_report(item["report"]) == truth


def test_label_report_by_hand():
    read = lambda text: dict(zip(synth.IC_CLASSES, synth.label_report(text)))  # noqa: E731
    assert read("No pneumothorax or pleural effusion is seen. Lungs are clear bilaterally.") == \
        dict.fromkeys(synth.IC_CLASSES, 0)
    state = read("Multiple (two) nodular opacities up to 18 mm. The heart is not enlarged. "
                 "There is no pneumothorax. A small left effusion blunts the costophrenic angle.")
    assert state == dict(opacity=0, effusion=1, cardiomegaly=0, pneumothorax=0, nodule=1, device=0)
    state = read("Both lungs are clear without focal consolidation. Moderate enlargement of the "
                 "cardiac silhouette. Left PICC line in good position. Hazy opacity in the lingula.")
    assert state == dict(opacity=1, effusion=0, cardiomegaly=1, pneumothorax=0, nodule=0, device=1)
    assert read("") == dict.fromkeys(synth.IC_CLASSES, 0)


def test_findings_change_the_pixels():
    """The same anatomy draw with and without each finding differs inside the lungs."""
    base = synth.sample_case(np.random.default_rng(0))
    base = dataclasses.replace(base, opacity=None, effusion=None, cardiomegaly=False,
                               pneumothorax=None, nodules=0, nodule_mm=[], device=None)
    clean = synth.render(base, 64, np.random.default_rng(1)).astype(float)
    for change in ({"opacity": "right lower", "opacity_size": "small"},
                   {"effusion": "left", "effusion_size": "small"}, {"cardiomegaly": True},
                   {"pneumothorax": "right", "ptx_size": "small"},
                   {"device": "endotracheal tube"}):
        img = synth.render(dataclasses.replace(base, **change), 64, np.random.default_rng(1))
        assert np.abs(img.astype(float) - clean).sum() > 64 * 64 * 0.5, change


def test_constant_rouge_l_hand_computed():
    assert synth.constant_rouge_l("the heart is big", ["the heart is normal"]) == pytest.approx(0.75)
    assert synth.constant_rouge_l("a b c", ["x y"]) == 0.0
