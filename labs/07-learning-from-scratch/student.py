"""Lab 7 exercise: measure the collapse of the pooled features, and remove its common part.

Fill in the two functions; `LABS_IMPL=student python -m pytest -q labs/07-learning-from-scratch`
checks them.
"""
import torch


def variance_ratio(embeddings: torch.Tensor) -> float:
    """How much a batch of embeddings [B, E] differs from one input to the next: the summed
    across-batch variance of the E dimensions (biased, over the B rows) divided by the summed mean
    square. 1 when the batch mean is zero, 0 when every row is the same vector (the collapse)."""
    raise NotImplementedError("lab 7: variance_ratio")


def batch_normalise(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each of the E dimensions of x [B, E] minus its batch mean, over its batch standard deviation
    (biased), with eps added to the variance: the training-mode nn.BatchNorm1d(E, affine=False)."""
    raise NotImplementedError("lab 7: batch_normalise")
