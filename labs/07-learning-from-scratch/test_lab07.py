"""Lab 7 checks: the variance ratio by hand, and batch normalisation against torch's BatchNorm1d."""
import pytest
import torch

import common

impl = common.exercise(__file__)


def test_variance_ratio_by_hand():
    assert impl.variance_ratio(torch.tensor([[1.0, 2.0]] * 4)) == pytest.approx(0.0)  # collapsed
    assert impl.variance_ratio(torch.tensor([[1.0, -1.0], [-1.0, 1.0]])) == pytest.approx(1.0)  # zero mean
    # rows (3, 0) and (1, 0): variance 1, mean square (9 + 1) / 2 = 5 -> 0.2
    assert impl.variance_ratio(torch.tensor([[3.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.2)


def test_batch_normalise_is_batchnorm_without_affine():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=g) * 3 + 7
    torch.testing.assert_close(impl.batch_normalise(x), torch.nn.BatchNorm1d(5, affine=False).train()(x))
    assert impl.variance_ratio(impl.batch_normalise(x)) == pytest.approx(1.0, abs=1e-4)


def test_normalising_removes_the_common_part():
    g = torch.Generator().manual_seed(1)
    common_part = torch.randn(1, 8, generator=g) * 10
    collapsed = common_part + 0.01 * torch.randn(32, 8, generator=g)
    assert impl.variance_ratio(collapsed) < 1e-4
    spread = torch.nn.functional.normalize(impl.batch_normalise(collapsed), dim=-1)
    cosines = spread @ spread.T
    assert cosines[~torch.eye(32, dtype=torch.bool)].mean().abs() < 0.1  # no longer one direction
