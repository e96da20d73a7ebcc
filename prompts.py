"""Prompt pools that stand in for a missing modality (PTUnifier paper, section 3.2, Eq. 3-4).

When an input has only one modality, PTUnifier fills the other modality's place with soft
prompts. Two variants are implemented:

- `PromptPool` (section 3.2.2, the paper's default): a pool P = {w_1..w_S} of learnable vectors in
  the missing modality's input space. The present modality is pooled into a query q and every
  entry is scored by the raw dot product s_i = w_i^T q (Eq. 3); the k highest-scoring entries,
  in descending score order, become the prompts (Eq. 4).
- `PromptPool(frozen=True)` (prompt mode "pool_frozen"): what the official code does; the pool
  keeps its initial values (no gradient reaches it, no optimizer holds it).
- `StaticPrompts` (section 3.2.1): k fixed learnable prompts shared by every input; the query is
  ignored.
- `NoPrompts` (Table 4's "without prompt pools"; the paper does not say what then fills a missing
  modality): zero prompts, so a missing text is <s> alone and a missing image the class token
  [CLS] alone, each through its encoder (what the official code does with 0 prompts).

All expose `select(query[B, D]) -> (prompts[B, k, D], indices[B, k])`.

Unlike the official code, which scores and gathers under `torch.no_grad()` so the pools never
learn, the selected rows are gathered from the pool parameter with gradients: a loss reaches
exactly the selected rows. The hard top-k itself is not differentiable, so the scores are
computed on detached tensors.
"""

import torch
from torch import nn


def pool_scores(query: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Eq. 3, s_i = w_i^T q, on detached tensors (the top-k that follows has no gradient):
    query [B, D], pool [S, D] -> scores [B, S]."""
    return query.detach() @ pool.detach().t()


def select_top_k(query: torch.Tensor, pool: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4: the k best-scoring pool rows for each query, best first: query [B, D], pool [S, D]
    -> (prompts [B, k, D], indices [B, k]). The rows are gathered from `pool` itself (an embedding
    lookup), so a loss on the prompts reaches exactly the selected rows."""
    indices = pool_scores(query, pool).topk(k, dim=1, sorted=True).indices  # [B, k]
    return nn.functional.embedding(indices, pool), indices  # [B, k, D]


class PromptPool(nn.Module):
    """A pool of `size` learnable prompt vectors of width `dim`; `select` returns the top `k`.

    Eq. 3: score_i = w_i^T q. Eq. 4: prompts = [w_(1), ..., w_(k)] sorted by descending score.

    With `frozen` (the official code, which selects under torch.no_grad), the pool never learns:
    the weight takes no gradient, so no optimizer receives it.
    """

    def __init__(self, size: int, dim: int, k: int, frozen: bool = False):
        super().__init__()
        if not 0 < k <= size:
            raise ValueError(f"PromptPool: need 0 < k <= size, got k={k}, size={size}")
        self.k = k
        weight = torch.randn(size, dim) * 0.02  # [S, D], normal std 0.02
        self.weight = nn.Parameter(weight, requires_grad=not frozen)

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """Eq. 3: query [B, D] -> scores [B, S] (`pool_scores`)."""
        return pool_scores(query, self.weight)

    def select(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 4: query [B, D] -> (prompts [B, k, D], indices [B, k]), best score first (`select_top_k`)."""
        return select_top_k(query, self.weight, self.k)


class StaticPrompts(nn.Module):
    """Section 3.2.1: k learnable prompts used for every input; the query is ignored."""

    def __init__(self, k: int, dim: int):
        super().__init__()
        if k <= 0:
            raise ValueError(f"StaticPrompts: need k > 0, got k={k}")
        self.k = k
        self.weight = nn.Parameter(torch.randn(k, dim) * 0.02)  # [k, D], normal std 0.02

    def select(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [B, D] (only its batch size is used) -> (prompts [B, k, D], indices [B, k])."""
        batch = query.shape[0]
        prompts = self.weight.unsqueeze(0).expand(batch, -1, -1)  # [B, k, D]
        indices = torch.arange(self.k, device=query.device).expand(batch, -1)  # [B, k]
        return prompts, indices


class NoPrompts(nn.Module):
    """No prompts at all: select returns k = 0 of them (the missing modality keeps only its [CLS]
    or <s> tokens)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim, self.k = dim, 0

    def select(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [B, D] -> (prompts [B, 0, D], indices [B, 0])."""
        batch = query.shape[0]
        return (query.new_zeros(batch, 0, self.dim),
                torch.zeros(batch, 0, dtype=torch.long, device=query.device))


PROMPT_MODES = ("pool", "pool_frozen", "static", "none")


def build_prompts(mode: str, size: int, dim: int, k: int) -> PromptPool | StaticPrompts | NoPrompts:
    """Prompt source for one modality: mode "pool" (Eq. 3-4), "pool_frozen" (the official code's
    pool that never learns), "static" (section 3.2.1) or "none"."""
    if mode in ("pool", "pool_frozen"):
        return PromptPool(size, dim, k, frozen=mode == "pool_frozen")
    if mode == "static":
        return StaticPrompts(k, dim)
    if mode == "none":
        return NoPrompts(dim)
    raise ValueError(f"prompt mode must be one of {PROMPT_MODES}, got {mode!r}")
