"""Lab 3 reference answers: the project's own code (losses.gather_with_grad, losses.itc_loss)."""
import torch

from losses import gather_with_grad, itc_loss


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    return gather_with_grad(local)[0]


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    return itc_loss(image, text, scale)
