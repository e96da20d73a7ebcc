"""Lab 3 exercise: gather embeddings from every process WITH the right gradient.

Fill in the two functions below; `python -m pytest -q labs/03-global-negatives` with
LABS_IMPL=student checks them against a single process on the concatenated batch.
"""
import torch


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `local` [b, D] concatenated in rank order -> [W * b, D] (equal b on every
    rank), differentiable: the backward must hand this rank the FULL gradient of its own rows,
    i.e. the sum over ranks of the incoming gradient's slice for these rows (all_reduce, then
    slice), not just this rank's slice. Hint: a torch.autograd.Function whose forward calls
    torch.distributed.all_gather and whose backward calls torch.distributed.all_reduce.
    Without an initialised process group, return `local` unchanged."""
    raise NotImplementedError("lab 3: all_gather_rows")


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows against ALL gathered rows (Eq. 9-10): image, text
    [b, E] unit-norm; logits = scale * local @ gathered.T [b, W * b]; the true column of local row
    i is rank * b + i; the mean cross-entropy of both directions, (i2t + t2i) / 2. Under DDP (which
    averages gradients over ranks) this must give the gradient of one process on the whole batch."""
    raise NotImplementedError("lab 3: contrastive_loss")
