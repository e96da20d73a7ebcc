"""Tests for zeroshot.py (ITC retrieval and zero-shot classification).

Independent references: embeddings recomputed here one pair at a time by calling the model
directly, a brute-force Recall@K loop, scikit-learn's roc_auc_score, and two hand-built ITC heads
whose embeddings are perfect (one-hot by row) or perfectly wrong (shifted by one row).
"""
import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import synth
from data import UnreadableImage, image_to_tensor, load_image, read_manifest, write_manifest
from tokenizer import Tokenizer
from zeroshot import (default_label_sentences, embed_retrieval, zero_shot_class_scores,
                      zero_shot_classification, zero_shot_retrieval)
from model import PTUnifier
from recipes import RECIPES

N_TEST = 48
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synth.main(["--out", str(root), "--train", "40", "--val", "4", "--test", str(N_TEST),
                "--image-size", "64", "--vocab-size", "600", "--workers", "1"])
    return root, Tokenizer.load(root / "tokenizer.json")


def tiny_model(tokenizer, **overrides) -> PTUnifier:
    torch.manual_seed(0)
    cfg = dataclasses.replace(RECIPES["tiny"].model, vocab_size=tokenizer.vocab_size,
                              pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id,
                              eos_token_id=tokenizer.eos_id, **overrides)
    return PTUnifier(cfg).eval()


@pytest.fixture(scope="module")
def model(bench):
    return tiny_model(bench[1])


def pixels(root, folder, record, size):
    meta = json.loads((root / folder / "meta.json").read_text())
    return image_to_tensor(load_image(root / folder / meta["image_root"] / record["image"]), size,
                           train=False)[None]  # (1, 3, S, S)


@pytest.fixture(scope="module")
def one_by_one(bench, model):
    """Per retrieval test pair, unbatched and unpadded, straight through the model: image-only
    and text-only passes -> {image file: (emb [E], textual idx [k_t])} and the stacked
    (image emb [N, E], text emb [N, E], textual idx [N, k_t], visual idx [N, k_v])."""
    root, tok = bench
    records, _ = read_manifest(root / "retrieval", "test")
    by_image, txt, v_idx = {}, [], []
    with torch.no_grad():
        for r in records:
            out = model(pixel_values=pixels(root, "retrieval", r, model.config.image_size))
            by_image[r["image"]] = (model.itc_image(out.joint)[0], out.text_prompt_indices[0])
            ids, mask = tok.encode([r["text"]], model.config.max_text_len)
            out = model(input_ids=ids, attention_mask=mask)
            txt.append(model.itc_text(out.joint))
            v_idx.append(out.image_prompt_indices)
    img = torch.stack([by_image[r["image"]][0] for r in records])
    t_idx = torch.stack([by_image[r["image"]][1] for r in records])
    return by_image, [img, torch.cat(txt), t_idx, torch.cat(v_idx)]


def brute_force_recall(sim: torch.Tensor, k: int) -> float:
    """Fraction of rows whose diagonal entry has fewer than k off-diagonal entries >= it."""
    sim, hits = sim.tolist(), 0
    for i in range(len(sim)):
        better = sum(1 for j in range(len(sim)) if j != i and sim[i][j] >= sim[i][i])
        hits += better < k
    return hits / len(sim)


def test_retrieval_matches_unbatched_embeddings_and_brute_force(bench, model, one_by_one):
    root, tok = bench
    mine = one_by_one[1]
    theirs = embed_retrieval(model, root / "retrieval", "test", tok, CPU, 20, num_workers=0)
    assert [tuple(t.shape) for t in theirs] == [
        (N_TEST, model.config.embed_dim), (N_TEST, model.config.embed_dim),
        (N_TEST, model.config.k_textual), (N_TEST, model.config.k_visual)]
    for a, b in zip(mine[:2], theirs[:2]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(b.norm(dim=1), torch.ones(N_TEST))  # L2-normalised
    assert torch.equal(mine[2], theirs[2]) and torch.equal(mine[3], theirs[3])

    res = zero_shot_retrieval(model, root / "retrieval", "test", tok, CPU, 20, num_workers=0)
    sim = mine[0] @ mine[1].T
    assert res["n"] == N_TEST
    for k in (1, 5, 10):
        assert res[f"i2t_r{k}"] == pytest.approx(brute_force_recall(sim, k))
        assert res[f"t2i_r{k}"] == pytest.approx(brute_force_recall(sim.T, k))
    assert res["textual_prompts_used"] == len(torch.unique(mine[2]))
    assert res["visual_prompts_used"] == len(torch.unique(mine[3]))
    assert 1 <= res["textual_prompts_used"] <= model.config.pool_size
    # An untrained model is near chance (R@1 chance = 1/48, R@10 chance = 10/48).
    assert res["i2t_r1"] <= 0.15 and res["t2i_r1"] <= 0.15
    assert res["i2t_r10"] <= 0.5 and res["t2i_r10"] <= 0.5


class OneHotByRow(torch.nn.Module):
    """An ITC head that ignores its input: the j-th row it ever sees gets one-hot (j + shift) % n."""

    def __init__(self, n: int, shift: int = 0):
        super().__init__()
        self.n, self.shift, self.seen = n, shift, 0

    def forward(self, joint):
        rows = torch.arange(self.seen, self.seen + len(joint)) + self.shift
        self.seen += len(joint)
        return torch.nn.functional.one_hot(rows % self.n, self.n).float()


@pytest.mark.parametrize("shift, expected_r1", [(0, 1.0), (1, 0.0)])
def test_retrieval_uses_the_pairing(bench, shift, expected_r1):
    root, tok = bench
    model = tiny_model(tok)  # its own model: the shared fixture keeps its real ITC heads
    model.itc_image = OneHotByRow(N_TEST)
    model.itc_text = OneHotByRow(N_TEST, shift)
    res = zero_shot_retrieval(model, root / "retrieval", "test", tok, CPU, 20, num_workers=0)
    assert res["i2t_r1"] == res["t2i_r1"] == expected_r1
    if shift == 0:
        assert all(res[f"{d}_r{k}"] == 1.0 for d in ("i2t", "t2i") for k in (5, 10))


def test_static_prompts_count_k(bench):
    root, tok = bench
    static = tiny_model(tok, prompt_mode="static")
    res = zero_shot_retrieval(static, root / "retrieval", "val", tok, CPU, 64, num_workers=0)
    assert res["textual_prompts_used"] == static.config.k_textual
    assert res["visual_prompts_used"] == static.config.k_visual


def test_training_flags_restored_and_dropout_off(bench):
    root, tok = bench
    m = tiny_model(tok, text_dropout=0.5, fusion_dropout=0.5).train()
    m.vision.eval()  # a partly frozen model must come back exactly as it was
    before = [mod.training for mod in m.modules()]
    first = zero_shot_retrieval(m, root / "retrieval", "val", tok, CPU, 32, num_workers=0)
    second = zero_shot_retrieval(m, root / "retrieval", "val", tok, CPU, 32, num_workers=0)
    assert first == second  # dropout 0.5 would change the embeddings between runs
    assert [mod.training for mod in m.modules()] == before
    assert torch.is_grad_enabled()


def test_unreadable_image_raises(bench, model, tmp_path):
    root, tok = bench
    records, meta = read_manifest(root / "retrieval", "test")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    bad = {**records[0], "image": "broken.png"}
    write_manifest(tmp_path / "retrieval", [bad] + records[1:3],
                   {**meta, "image_root": str(tmp_path / "images")})
    with pytest.raises(UnreadableImage):
        zero_shot_retrieval(model, tmp_path / "retrieval", "test", tok, CPU, 8, num_workers=0)


def reference_scores(model, root, tok, sentences, image_emb):
    """softmax(scale * (v.p, v.n))[0] per image and class, from unbatched embeddings."""
    records, meta = read_manifest(root / "ic", "test")
    with torch.no_grad():
        def text(s):
            ids, mask = tok.encode([s], model.config.max_text_len)
            return model.itc_text(model(input_ids=ids, attention_mask=mask).joint)[0]
        pos = torch.stack([text(sentences[c][0]) for c in meta["classes"]])  # (C, E)
        neg = torch.stack([text(sentences[c][1]) for c in meta["classes"]])
        scores = []
        for r in records:
            v = image_emb[r["image"]][0]
            logits = model.logit_scale() * torch.stack([pos @ v, neg @ v], dim=1)  # (C, 2)
            scores.append(torch.softmax(logits, dim=1)[:, 0])
    return torch.stack(scores).numpy(), np.array([r["labels"] for r in records]), meta["classes"]


def test_zero_shot_classification_matches_sklearn(bench, model, one_by_one):
    root, tok = bench
    sentences = default_label_sentences(synth.IC_CLASSES)
    assert sentences["effusion"] == ("There is effusion.", "There is no effusion.")
    assert default_label_sentences(["pleural_effusion"])["pleural_effusion"][1] == \
        "There is no pleural effusion."
    ref, labels, classes = reference_scores(model, root, tok, sentences, one_by_one[0])
    scores, got_labels, got_classes = zero_shot_class_scores(
        model, root / "ic", "test", tok, CPU, 20, num_workers=0)
    np.testing.assert_allclose(scores, ref, atol=1e-5)
    assert got_classes == classes and np.array_equal(got_labels, labels)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every synthetic test class has both label values
        res = zero_shot_classification(model, root / "ic", "test", tok, CPU, 20, num_workers=0)
    assert res["n"] == N_TEST and res["excluded"] == {}
    expected = {c: roc_auc_score(labels[:, i], scores[:, i]) for i, c in enumerate(classes)}
    assert res["per_class"] == pytest.approx(expected)
    assert res["macro_auroc"] == pytest.approx(np.mean(list(expected.values())))


def test_zero_shot_classification_prompts_and_exclusion(bench, model, one_by_one, tmp_path):
    root, tok = bench
    custom = {c: (f"Findings show {c}.", f"No {c} is seen.") for c in synth.IC_CLASSES}
    ref, labels, classes = reference_scores(model, root, tok, custom, one_by_one[0])
    scores, _, _ = zero_shot_class_scores(model, root / "ic", "test", tok, CPU, 20,
                                          prompts=custom, num_workers=0)
    np.testing.assert_allclose(scores, ref, atol=1e-5)
    with pytest.raises(ValueError, match="missing"):
        zero_shot_classification(model, root / "ic", "test", tok, CPU, prompts={"opacity": ("a", "b")})

    # Class 2 set to all-negative: reported as excluded with a warning, macro over the rest.
    records, meta = read_manifest(root / "ic", "test")
    for r in records:
        r["labels"][2] = 0
    write_manifest(tmp_path / "ic", records, {**meta, "image_root": str(root / "images")})
    with pytest.warns(UserWarning, match=classes[2]):
        res = zero_shot_classification(model, tmp_path / "ic", "test", tok, CPU, 20, num_workers=0)
    scores, labels, _ = zero_shot_class_scores(model, tmp_path / "ic", "test", tok, CPU, 20,
                                               num_workers=0)
    kept = [i for i in range(len(classes)) if i != 2]
    assert res["per_class"][classes[2]] is None and set(res["excluded"]) == {classes[2]}
    assert res["macro_auroc"] == pytest.approx(
        np.mean([roc_auc_score(labels[:, i], scores[:, i]) for i in kept]))
