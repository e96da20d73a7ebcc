"""Lab 2 exercise: the three pre-training objectives as plain functions (paper Eq. 5-10).

Fill in the functions; `LABS_IMPL=student python -m pytest -q labs/02-objectives` checks them.
"""
import torch


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MLM (Eq. 5-6): logits [N, V] at masked positions, labels [N] the original token ids;
    positions labelled -100 are not scored. The mean cross-entropy over the scored positions
    (an exact 0 when none is scored)."""
    raise NotImplementedError("lab 2: mlm_loss")


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ITM (Eq. 7-8): logits [B, 2] of the ITM head, labels [B] (1 matched, 0 not): the mean 2-way
    cross-entropy."""
    raise NotImplementedError("lab 2: itm_loss")


def itc_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """ITC (Eq. 9-10), one process: image, text [B, E] unit-norm, row i of each a matched pair;
    logits = scale * image @ text.T; the mean of the image->text and text->image cross-entropies
    with the diagonal as the targets."""
    raise NotImplementedError("lab 2: itc_loss")


def chance(vocab_size: int, batch: int) -> dict[str, float]:
    """The loss of a model that knows nothing: {"mlm": ..., "itm": ..., "itc": ...} for a
    vocabulary of `vocab_size` tokens and an ITC batch of `batch` pairs."""
    raise NotImplementedError("lab 2: chance")
