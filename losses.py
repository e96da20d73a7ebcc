"""PTUnifier pre-training objectives (paper section 3.3, Eq. 1, 5-10).

The model produces logits and embeddings; this file turns them into scalar losses. Nothing here
knows about the model, the optimiser or logging.

- `mlm_loss`  masked language modelling (Eq. 5-6): cross-entropy of the vocabulary logits at the
  masked text positions.
- `itm_loss`  image-text matching (Eq. 7-8): 2-way cross-entropy on the joint feature of
  positive (label 1) and negative (label 0) pairs.
- `itc_loss`  image-text contrastive (Eq. 9-10): symmetric InfoNCE between the image-only and
  the text-only pass embeddings, over the GLOBAL batch when a process group is initialised.
- `LossWeights`, `LossParts`, `total_loss`  the weighted sum (official config: MLM 1, ITM 0.5,
  ITC 0.1).
- `dist_info`  (rank, world size) of the process group, (0, 1) without one; the ITC gathers ask it.

Gradient scale of `itc_loss` under DDP (see the `itc_loss` docstring for the derivation): each
rank computes its LOCAL rows against ALL gathered columns, the gather's backward sums the
gradient over ranks, and DDP's mean over ranks then gives exactly the gradient of the plain
loss on the concatenated batch. The official code's gather keeps only the local slice of the
gradient instead, which scales it by 1/world_size (open_clip issue 616); we do not.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value of text positions that MLM does not score


def dist_info():
    """Return (rank, world_size); (0, 1) when torch.distributed is absent or not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _at_least_fp32(logits):
    """Half-precision logits are upcast so the softmax of the cross-entropy is computed in fp32."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


# ----------------------------------------------------------------------------------------------
# MLM and ITM (Eq. 5-8)


def mlm_loss(logits, labels):
    """Masked language modelling loss, paper Eq. 5-6.

    logits: [N, V] vocabulary logits, labels: [N] token ids. The caller usually runs the MLM head
    on the masked positions only; positions labelled IGNORE_INDEX (-100) are skipped as well, so
    the full flattened sequence [B*L, V] with -100 at unmasked tokens works too.
    Returns the mean cross-entropy over the scored positions. With no scored position (N = 0 or
    every label -100) it returns an exact 0 that is still attached to `logits`, so `backward()`
    runs and every parameter receives a zero gradient (no NaN, no DDP "unused parameter" error).
    """
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"losses.py mlm_loss: expected logits [N, V] and labels [N], got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    n_scored = (labels != IGNORE_INDEX).sum()
    summed = F.cross_entropy(_at_least_fp32(logits), labels, ignore_index=IGNORE_INDEX,
                             reduction="sum")
    return summed / n_scored.clamp(min=1)


def itm_loss(logits, labels):
    """Image-text matching loss, paper Eq. 7-8.

    logits: [B, 2] from the ITM head on the joint feature; labels: [B] with 1 = matched pair,
    0 = mismatched (negative) pair. Returns the mean 2-way cross-entropy over the B pairs.
    """
    if logits.dim() != 2 or logits.shape[1] != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"losses.py itm_loss: expected logits [B, 2] and labels [B], got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    return F.cross_entropy(_at_least_fp32(logits), labels)


# ----------------------------------------------------------------------------------------------
# ITC (Eq. 9-10) with a gather that keeps the full gradient


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's rows; backward hands each rank the FULL gradient of its rows.

    forward:  local [n_r, D] on rank r -> global [N, D], N = sum_r n_r (ranks in order).
    backward: the incoming [N, D] gradient is this rank's loss w.r.t. every row; summing it over
              ranks (all_reduce) gives d(sum_r loss_r)/d(row), and rank r keeps its own slice.
    """

    @staticmethod
    def forward(ctx, local, sizes, rank):
        padded = local.new_zeros(max(sizes), local.shape[1])  # [n_max, D]: equal shapes to gather
        padded[: local.shape[0]] = local
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded)
        ctx.start, ctx.size = sum(sizes[:rank]), sizes[rank]
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])  # [N, D]

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # [N, D]; all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start: ctx.start + ctx.size], None, None


def _gather_sizes(n_local, device, world_size):
    """Local batch size of every rank, as a list of ints (ranks may differ, e.g. a last batch)."""
    mine = torch.tensor([n_local], device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(sizes, mine)
    return [int(s) for s in sizes]


def gather_with_grad(local):
    """All ranks' rows of `local` [n_r, D] concatenated in rank order -> ([N, D], offset of this
    rank's first row, N). Without a process group: (local, 0, n). Every rank must call it."""
    rank, world_size = dist_info()
    if world_size == 1:
        return local, 0, local.shape[0]
    sizes = _gather_sizes(local.shape[0], local.device, world_size)
    return _GatherRows.apply(local, sizes, rank), sum(sizes[:rank]), sum(sizes)


def itc_loss(image_emb, text_emb, logit_scale):
    """Symmetric image-text contrastive loss (InfoNCE), paper Eq. 9-10.

    image_emb, text_emb: [b, E], row i of each is a matched pair (the model L2-normalises them;
    the loss itself does not). logit_scale: 1 / temperature, a scalar tensor (may be learnable)
    or a float. With s_ij = logit_scale * <image_i, text_j> over the global batch of N pairs:

        loss = 1/2 * ( 1/N sum_i CE(softmax_j s_ij, i) + 1/N sum_j CE(softmax_i s_ij, j) )

    Distributed (process group initialised, world size W, rank r holds n_r rows, N = sum n_r):
    every rank must call this. Rank r gathers all embeddings with `gather_with_grad`, scores its
    LOCAL rows against ALL N columns in both directions (image->text rows of s, text->image
    columns of s), labels = offset_r + arange(n_r), and returns

        loss_r = W / N * 1/2 * sum over its n_r rows of (CE_image->text + CE_text->image).

    Why this gives the single-process result on the concatenated batch (loss L above):
    - value: mean_r loss_r = 1/W * sum_r loss_r = 1/N * 1/2 * sum over all N rows = L.
      (With equal n_r = b: W/N = 1/b, so loss_r is just the mean over local rows.)
    - gradient: embeddings e_r of rank r enter every rank's loss (as columns). The gather's
      backward all-reduces (sums) the gradient, so rank r obtains d(sum_s loss_s)/d e_r and its
      parameter gradient is d(sum_s loss_s)/d e_r * d e_r/d theta. DDP averages over ranks:
      1/W * sum_r d(sum_s loss_s)/d e_r * d e_r/d theta = d(1/W sum_s loss_s)/d theta = dL/d theta.
      logit_scale appears in every loss_s directly, so DDP's mean of the per-rank gradients is
      d(1/W sum_s loss_s)/d logit_scale = dL/d logit_scale as well.
    A backward that kept only the local slice (no all_reduce) would drop the other ranks'
    contributions: with each rank scoring all N rows, as in the official code, that is dL/d theta
    scaled by 1/W.
    Without a process group (or W = 1) no torch.distributed call runs and this is the plain loss.
    """
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"losses.py itc_loss: expected image_emb and text_emb both [B, E], got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), device=image_emb.device)
    if logit_scale.numel() != 1:
        raise ValueError(f"losses.py itc_loss: logit_scale must be a scalar, got shape "
                         f"{tuple(logit_scale.shape)}")
    n_local, width = image_emb.shape
    both = torch.cat([image_emb, text_emb], dim=1)  # [b, 2E]: one gather for both modalities
    both_all, offset, n_global = gather_with_grad(both)  # [N, 2E]
    image_all, text_all = both_all[:, :width], both_all[:, width:]  # [N, E] each
    labels = offset + torch.arange(n_local, device=image_emb.device)  # [b] columns of the pairs
    logits_i2t = logit_scale.reshape(()) * image_emb @ text_all.t()  # [b, N]
    logits_t2i = logit_scale.reshape(()) * text_emb @ image_all.t()  # [b, N]
    summed = (F.cross_entropy(_at_least_fp32(logits_i2t), labels, reduction="sum")
              + F.cross_entropy(_at_least_fp32(logits_t2i), labels, reduction="sum"))
    _, world_size = dist_info()
    return summed * (world_size / (2 * n_global))


# ----------------------------------------------------------------------------------------------
# Weighted sum (paper Eq. 1; weights from the official pre-training config)


@dataclass
class LossWeights:
    mlm: float = 1.0  # masked language modelling
    itm: float = 0.5  # image-text matching
    itc: float = 0.1  # image-text contrastive


@dataclass
class LossParts:
    """Scalar losses of one step; None for an objective that did not run."""
    mlm: torch.Tensor | None = None
    itm: torch.Tensor | None = None
    itc: torch.Tensor | None = None


def total_loss(parts, weights):
    """Weighted sum of the objectives that ran: sum over present k of weights.k * parts.k."""
    terms = [getattr(weights, name) * getattr(parts, name) for name in ("mlm", "itm", "itc")
             if getattr(parts, name) is not None]
    if not terms:
        raise ValueError("losses.py total_loss: LossParts has no loss set (mlm, itm, itc all None)")
    return sum(terms)
