"""Lab 1 exercise: select prompts from a pool (paper Eq. 3-4) so that the pool learns.

Fill in the two functions; `LABS_IMPL=student python -m pytest -q labs/01-prompt-pools` checks them.
"""
import torch


def scores(query: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Eq. 3: s_i = w_i^T q for every pool row w_i and every query q: query [B, D], pool [S, D] ->
    scores [B, S]. The hard top-k that follows is not differentiable: compute the scores on
    detached tensors, so that no gradient flows through them."""
    raise NotImplementedError("lab 1: scores")


def select(query: torch.Tensor, pool: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4: the k best-scoring rows of `pool` for each query, best first: query [B, D], pool [S, D]
    -> (prompts [B, k, D], indices [B, k]). Take the prompts FROM `pool` (index it with the chosen
    indices) so that a loss on the prompts sends gradient to exactly the selected rows; the
    official code selected under torch.no_grad(), and its pools never learned."""
    raise NotImplementedError("lab 1: select")
