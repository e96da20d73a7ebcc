"""Lab 7 reference answers: GlobalBatchNorm of model.py (one process) and the ratio it restores."""
import torch

from model import GlobalBatchNorm


def variance_ratio(embeddings: torch.Tensor) -> float:
    return (embeddings.var(dim=0, unbiased=False).sum() / embeddings.square().mean(dim=0).sum()).item()


def batch_normalise(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return GlobalBatchNorm(x.shape[1], eps=eps).train()(x)
