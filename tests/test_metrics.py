"""Tests for metrics.py.

Independent references: scikit-learn's roc_auc_score (AUROC), pycocoevalcap 1.2 (BLEU, ROUGE-L,
CIDEr-D, METEOR; fed the same normalised text, so the comparison is metric against metric),
brute-force loops (Recall@K) and hand computation (accuracy, VQA, normalisation).
"""
import random

import numpy as np
import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

import metrics
from metrics import (accuracy, auroc, clinical_efficacy, macro_auroc, nlg_metrics, normalize_text,
                     recall_at_k, vqa_accuracy)

# ---- AUROC ------------------------------------------------------------------------------------


def _binary_cases():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    yield rng.normal(size=200), y                                   # continuous, no ties
    yield rng.integers(0, 4, 200).astype(float), y                  # 4 distinct values: many ties
    yield np.zeros(200), y                                          # all tied -> 0.5
    yield y + rng.uniform(0, 0.5, 200), y                           # perfect -> 1
    yield -(y + rng.uniform(0, 0.5, 200)), y                        # inverted -> 0
    yield np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])   # sklearn docstring: 0.75
    yield np.round(rng.normal(size=31), 1), rng.integers(0, 2, 31)  # small, rounded ties


@pytest.mark.parametrize("case", range(7))
def test_auroc_matches_sklearn(case):
    scores, labels = list(_binary_cases())[case]
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_known_values_and_torch_input():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0, 1, 1])) == pytest.approx(0.75)


def test_auroc_single_class_raises():
    with pytest.raises(ValueError, match="only one class"):
        auroc([0.1, 0.2], [1, 1])


def test_macro_auroc_matches_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (150, 5))
    scores = np.round(rng.normal(size=(150, 5)) + labels, 1)        # informative, with ties
    expected = roc_auc_score(labels, scores, average="macro")
    assert macro_auroc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert macro_auroc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(expected, abs=1e-12)


def test_macro_auroc_constant_class_raises():
    labels = np.array([[0, 1], [1, 1], [0, 1]])
    with pytest.raises(ValueError, match="class 1"):
        macro_auroc(np.random.rand(3, 2), labels)


@pytest.mark.parametrize("seed", range(4))
def test_clinical_efficacy_matches_sklearn(seed):
    """Micro P/R/F1, macro F1 and per-class F1 equal scikit-learn's (zero_division=0), including a
    class never predicted, a class never present and one neither predicted nor present."""
    rng = np.random.default_rng(seed)
    target, pred = rng.integers(0, 2, (60, 5)), rng.integers(0, 2, (60, 5))
    pred[:, 1] = 0
    target[:, 2] = 0
    pred[:, 4] = target[:, 4] = 0
    ce = clinical_efficacy(pred, target, list("abcde"))
    micro = precision_recall_fscore_support(target, pred, average="micro", zero_division=0)
    per_class = precision_recall_fscore_support(target, pred, average=None, zero_division=0)[2]
    assert (ce["ce_precision"], ce["ce_recall"], ce["ce_f1"]) == pytest.approx(micro[:3], abs=1e-12)
    assert ce["ce_macro_f1"] == pytest.approx(per_class.mean(), abs=1e-12)
    assert list(ce["ce_f1_per_class"].values()) == pytest.approx(list(per_class), abs=1e-12)


def test_clinical_efficacy_by_hand_and_shape_errors():
    ce = clinical_efficacy([[1, 0], [1, 1]], [[1, 1], [0, 1]], ["x", "y"])  # tp 2, fp 1, fn 1
    assert (ce["ce_precision"], ce["ce_recall"], ce["ce_f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert ce["ce_f1_per_class"] == pytest.approx({"x": 2 / 3, "y": 2 / 3})
    with pytest.raises(ValueError, match="one column per class"):
        clinical_efficacy([[1, 0]], [[1, 0]], ["x", "y", "z"])


# ---- accuracy and VQA ---------------------------------------------------------------------------


def test_accuracy_by_hand():
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    logits = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert accuracy(logits, torch.tensor([0, 0, 0])) == pytest.approx(2 / 3)


def test_vqa_accuracy_by_hand_with_out_of_vocab_gold():
    vocab = ["yes", "no", "left lung", "ct"]
    preds = ["Yes", "no", "left  lung", "ct", "yes", "ct"]
    golds = ["yes", "yes", "Left lung.", "mri", "yes", "ct"]
    types = ["closed", "closed", "open", "open", "closed", "open"]
    # closed: yes/yes ok, no/yes wrong, yes/yes ok -> 2/3; open: left lung ok, mri OOV wrong, ct ok -> 2/3
    scores = vqa_accuracy(preds, golds, types, vocabulary=vocab)
    assert scores.closed == pytest.approx(2 / 3) and scores.open == pytest.approx(2 / 3)
    assert scores.overall == pytest.approx(4 / 6)
    assert (scores.n_open, scores.n_closed, scores.n_gold_out_of_vocab) == (3, 3, 1)
    # an OOV gold is wrong even if the prediction string matches it
    oov = vqa_accuracy(["mri"], ["mri"], ["open"], vocabulary=vocab)
    assert oov.overall == 0.0 and oov.n_gold_out_of_vocab == 1 and oov.closed is None
    # without a vocabulary, plain exact match
    assert vqa_accuracy(["mri"], ["MRI"], ["open"]).overall == 1.0


def test_vqa_accuracy_rejects_bad_answer_type():
    with pytest.raises(ValueError, match="open' or 'closed"):
        vqa_accuracy(["a"], ["a"], ["yes/no"])


# ---- Recall@K -----------------------------------------------------------------------------------


def _brute_recall(sim, owner_of_text, ks):
    """Loop version: sort candidates, walk the ranking, wrong candidates tied with the best true
    one are placed before it (pessimistic)."""
    n_img, n_txt = sim.shape
    i2t = {k: 0 for k in ks}
    t2i = {k: 0 for k in ks}
    for i in range(n_img):
        true = [j for j in range(n_txt) if owner_of_text[j] == i]
        best = max(sim[i, j] for j in true)
        position = sum(1 for j in range(n_txt) if j not in true and sim[i, j] >= best)
        for k in ks:
            i2t[k] += position < k
    for j in range(n_txt):
        true_score = sim[owner_of_text[j], j]
        position = sum(1 for i in range(n_img) if i != owner_of_text[j] and sim[i, j] >= true_score)
        for k in ks:
            t2i[k] += position < k
    return {k: v / n_img for k, v in i2t.items()}, {k: v / n_txt for k, v in t2i.items()}


def test_recall_one_to_one_matches_brute_force_with_ties():
    rng = np.random.default_rng(2)
    sim = rng.integers(0, 5, (30, 30)).astype(float)               # heavy ties
    ks = (1, 5, 10)
    i2t, t2i = _brute_recall(sim, list(range(30)), ks)
    got = recall_at_k(torch.from_numpy(sim), ks=ks)
    assert got.i2t == pytest.approx(i2t) and got.t2i == pytest.approx(t2i)


def test_recall_several_captions_per_image_matches_brute_force():
    rng = np.random.default_rng(3)
    owner = [i for i in range(12) for _ in range(3)]                 # 12 images x 3 captions
    rng.shuffle(owner)
    gt = [[j for j, o in enumerate(owner) if o == i] for i in range(12)]
    sim = np.round(rng.normal(size=(12, 36)), 1)
    i2t, t2i = _brute_recall(sim, owner, (1, 2, 5))
    got = recall_at_k(sim, ks=(1, 2, 5), img_to_txt_gt=gt)
    assert got.i2t == pytest.approx(i2t) and got.t2i == pytest.approx(t2i)


def test_recall_tie_rule_by_hand():
    # collapsed model: every score equal -> a true match is behind all N-1 wrong ones
    flat = recall_at_k(np.ones((4, 4)), ks=(1, 3, 4))
    assert flat.i2t == {1: 0.0, 3: 0.0, 4: 1.0} and flat.t2i == {1: 0.0, 3: 0.0, 4: 1.0}
    sim = np.array([[0.9, 0.9, 0.1],      # image 0: true text 0 tied with text 1 -> rank 1
                    [0.0, 0.5, 0.4],      # image 1: true text 1 best -> rank 0
                    [0.2, 0.3, 0.1]])     # image 2: true text 2 behind 2 -> rank 2
    got = recall_at_k(sim, ks=(1, 2))
    assert got.i2t == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}
    # text 0: 0.9 best -> 0; text 1: 0.9 (img0) > 0.5 -> 1; text 2: 0.4 > 0.1 and 0.1 >= 0.1 -> 2
    assert got.t2i == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}


def test_recall_rejects_text_without_single_owner():
    with pytest.raises(ValueError, match="text 1 belongs to 0 images"):
        recall_at_k(np.zeros((2, 3)), img_to_txt_gt=[[0], [2]])


# ---- NLG ------------------------------------------------------------------------------------------


def test_normalize_text_by_hand():
    assert normalize_text("The X-ray shows a 1.5 cm nodule (left), no effusion.") == \
        ["the", "x-ray", "shows", "a", "1.5", "cm", "nodule", "left", "no", "effusion"]
    assert normalize_text("  ' -- ... |||  \"Hello\"  ") == ["hello"]
    assert normalize_text("") == []


def _coco_scores(hypotheses, references):
    """pycocoevalcap on the same normalised text (its PTBTokenizer needs CoreNLP; not the point)."""
    res = {i: [" ".join(normalize_text(h))] for i, h in hypotheses.items()}
    gts = {i: [" ".join(normalize_text(r)) for r in rs] for i, rs in references.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return bleu, rouge, cider, gts, res


def _random_corpus(seed, n, vocab_size):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(vocab_size)]
    hyps, refs = {}, {}
    for i in range(n):
        base = [rng.choice(vocab) for _ in range(rng.randint(1, 15))]
        refs[str(i)] = [" ".join(base)] + [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12)))
                                           for _ in range(rng.randint(0, 3))]
        hyp = [w for w in base if rng.random() < 0.7] + [rng.choice(vocab) for _ in range(rng.randint(0, 4))]
        hyps[str(i)] = " ".join(hyp)                                  # may be empty
    return hyps, refs


CORPORA = {
    "handmade": (
        {"a": "The heart is normal in size. No pleural effusion.",
         "b": "",                                                   # empty hypothesis
         "c": "effusion",                                           # single word
         "d": "the the the the the the",                            # repeated n-grams
         "e": "no acute cardiopulmonary process"},
        {"a": ["Heart size is normal. There is no pleural effusion.", "Normal heart; no effusion."],
         "b": ["Lungs are clear."],
         "c": ["Small left effusion.", "effusion", "effusion is present on the left side"],
         "d": ["the cat is on the mat", "there is a cat on the mat"],
         "e": ["No acute cardiopulmonary process."]}),
    "ties_in_closest_length": (                                    # refs 2 shorter / 2 longer than hyp
        {"1": "a b c d e", "2": "x y"},
        {"1": ["a b c", "a b c d e f g", "b c d"], "2": ["x", "x y z", "q"]}),
    "random_small_vocab": _random_corpus(0, 40, 8),                # many repeated n-grams
    "random_large_vocab": _random_corpus(1, 60, 40),
    "identical": ({"1": "left lower lobe opacity", "2": "no pneumothorax"},
                  {"1": ["left lower lobe opacity"], "2": ["no pneumothorax"]}),
}


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_nlg_matches_pycocoevalcap(name):
    hypotheses, references = CORPORA[name]
    bleu, rouge, cider, _, _ = _coco_scores(hypotheses, references)
    got = nlg_metrics(hypotheses, references, with_meteor=False)
    assert [got.bleu_1, got.bleu_2, got.bleu_3, got.bleu_4] == pytest.approx(bleu, abs=1e-6)
    assert got.rouge_l == pytest.approx(rouge, abs=1e-6)
    assert got.cider == pytest.approx(cider, abs=1e-6)
    assert got.meteor is None and "with_meteor=False" in got.meteor_error


def test_nlg_rejects_mismatched_ids_and_empty_references():
    with pytest.raises(ValueError, match="different ids"):
        nlg_metrics({"a": "x"}, {"b": ["x"]}, with_meteor=False)
    with pytest.raises(ValueError, match="empty text after normalisation"):
        nlg_metrics({"a": "x"}, {"a": ["..."]}, with_meteor=False)


def test_meteor_equals_reference_jar():
    hypotheses, references = CORPORA["handmade"]
    _, _, _, gts, res = _coco_scores(hypotheses, references)
    expected, _ = Meteor().compute_score(gts, res)
    got = nlg_metrics(hypotheses, references)
    assert got.meteor_error is None
    assert 0.0 <= got.meteor <= 1.0
    assert got.meteor == pytest.approx(expected, abs=1e-9)


def test_meteor_unavailable_without_java(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    got = nlg_metrics({"a": "no effusion"}, {"a": ["no pleural effusion"]})
    assert got.meteor is None and "java not found" in got.meteor_error
    assert got.bleu_1 > 0                                          # the other metrics still run


def test_meteor_unavailable_without_jar_or_with_broken_jar(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "_meteor_jar", lambda: None)
    assert metrics.meteor(["a"], [["a"]]) == (
        None, "METEOR unavailable: pycocoevalcap (which ships meteor-1.5.jar) is not installed")
    monkeypatch.setattr(metrics, "_meteor_jar", lambda: str(tmp_path / "missing.jar"))
    score, reason = metrics.meteor(["a"], [["a"]])
    assert score is None and "the jar failed" in reason
