"""Lab 2 checks: each objective against a hand computation, and the chance levels."""
import math

import pytest
import torch
import torch.nn.functional as F

import common

impl = common.exercise(__file__)


def test_mlm_scores_only_the_masked_positions():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    labels = torch.tensor([0, 2, -100])
    by_hand = (-math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(1 / (2 + math.e))) / 2
    assert impl.mlm_loss(logits, labels).item() == pytest.approx(by_hand, rel=1e-6)
    nothing = impl.mlm_loss(logits, torch.full((3,), -100))
    assert nothing.item() == 0.0


def test_itm_is_a_two_way_cross_entropy():
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    by_hand = (math.log(2) + math.log(1 + math.exp(-2))) / 2
    assert impl.itm_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(by_hand, rel=1e-6)


def test_itc_is_symmetric_infonce_over_the_batch():
    g = torch.Generator().manual_seed(0)
    image, text = (F.normalize(torch.randn(5, 4, generator=g), dim=-1) for _ in range(2))
    logits = 7.0 * image @ text.T
    rows = [-(logits[i, i] - logits[i].logsumexp(0)) for i in range(5)]
    cols = [-(logits[i, i] - logits[:, i].logsumexp(0)) for i in range(5)]
    by_hand = (sum(rows) + sum(cols)) / 10
    assert impl.itc_loss(image, text, 7.0).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_a_model_that_knows_nothing_scores_chance():
    levels = impl.chance(1000, 64)
    assert levels == pytest.approx({"mlm": math.log(1000), "itm": math.log(2), "itc": math.log(64)})
    same = F.normalize(torch.ones(8, 4), dim=-1)  # every embedding equal: uniform logits
    assert impl.itc_loss(same, same, 10.0).item() == pytest.approx(math.log(8), rel=1e-6)
    assert impl.itm_loss(torch.zeros(3, 2), torch.tensor([0, 1, 1])).item() == pytest.approx(math.log(2))
    assert impl.mlm_loss(torch.zeros(4, 1000), torch.arange(4)).item() == pytest.approx(math.log(1000), rel=1e-6)
