"""Lab 1 checks: Eq. 3 scores, Eq. 4 top-k order, and gradients that reach exactly the selected rows."""
import torch

import common

impl = common.exercise(__file__)


def example():
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(10, 4, generator=g).requires_grad_()
    query = torch.randn(3, 4, generator=g).requires_grad_()
    return query, pool


def test_scores_are_dot_products_without_gradient():
    query, pool = example()
    s = impl.scores(query, pool)
    torch.testing.assert_close(s, query.detach() @ pool.detach().T)
    assert not s.requires_grad


def test_selection_takes_the_best_rows_in_order():
    query, pool = example()
    prompts, indices = impl.select(query, pool, 4)
    assert prompts.shape == (3, 4, 4) and indices.shape == (3, 4)
    w, q = pool.detach(), query.detach()
    by_hand = [sorted(range(10), key=lambda i: -float(w[i] @ q[b]))[:4] for b in range(3)]
    assert indices.tolist() == by_hand
    torch.testing.assert_close(prompts, pool.detach()[indices])


def test_gradients_reach_exactly_the_selected_rows():
    query, pool = example()
    prompts, indices = impl.select(query, pool, 2)
    (prompts * torch.arange(1.0, 5.0)).sum().backward()
    touched = set(pool.grad.abs().sum(dim=1).nonzero().flatten().tolist())
    assert touched == set(indices.flatten().tolist())
    assert query.grad is None  # the hard top-k sends nothing back to the query
    counts = torch.bincount(indices.flatten(), minlength=10).float()  # a row chosen twice: twice the gradient
    torch.testing.assert_close(pool.grad, counts[:, None] * torch.arange(1.0, 5.0))
