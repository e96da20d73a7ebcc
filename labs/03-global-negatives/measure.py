"""Lab 3 measurements: ITC over two gloo processes against one process on the whole batch.

A small dual encoder (two linear maps to unit-norm embeddings, float64) sees 2 x 16 pairs. Each of
the two ranks holds 16 of them and computes the contrastive loss of its rows against the gathered
rows; the parameter gradients are then averaged over the ranks, as DistributedDataParallel does.
Three gathers:
- correct: losses.gather_with_grad (backward: all_reduce the gradient, keep this rank's slice);
- no_grad: torch.distributed.all_gather without gradient, this rank's own rows put back in place
  (the other ranks' rows are constants: their losses' gradient never reaches these rows);
- scaled: the official code's recipe, every rank scoring all N rows with a gather whose backward
  keeps only the local slice: the gradient is 1/W of the true one.
The reference is one process computing the plain loss over the 32 pairs.
"""
import math
import os
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import common
from losses import itc_loss

PICTURE = "gradients.png"
WORLD, LOCAL, FEATURES, EMBED = 2, 16, 24, 8
VARIANTS = ("correct", "no_grad", "scaled")
FLOORS = {**{f"{v}_{m}": f for v in VARIANTS for m, f in (("rel_error", 0.01), ("norm_ratio", 0.01),
                                                           ("cosine", 0.01))},
          "loss_difference": 1e-9}


def encoder(seed: int) -> torch.nn.ModuleDict:
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({"image": torch.nn.Linear(FEATURES, EMBED), "text": torch.nn.Linear(FEATURES, EMBED)}).double()


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    images = torch.randn(WORLD * LOCAL, FEATURES, generator=g, dtype=torch.float64)
    return images, images @ torch.randn(FEATURES, FEATURES, generator=g, dtype=torch.float64) * 0.5 \
        + torch.randn(WORLD * LOCAL, FEATURES, generator=g, dtype=torch.float64)


def embed(model, images, texts):
    return F.normalize(model["image"](images), dim=-1), F.normalize(model["text"](texts), dim=-1)


def symmetric_ce(logits: torch.Tensor, labels: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits_t, labels)) / 2


class KeepLocalSlice(torch.autograd.Function):
    """The official gather: all_gather forward, backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, local):
        pieces = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, local)
        ctx.rank, ctx.size = dist.get_rank(), local.shape[0]
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def rank_loss(variant: str, image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    rank, n = dist.get_rank(), image.shape[0]
    if variant == "correct":
        return itc_loss(image, text, scale)
    if variant == "no_grad":
        both = torch.cat([image, text], dim=1)
        pieces = [torch.empty_like(both) for _ in range(WORLD)]
        dist.all_gather(pieces, both.detach())
        pieces[rank] = both  # only this rank's own rows keep their graph
        gathered = torch.cat(pieces)
        image_all, text_all = gathered[:, :EMBED], gathered[:, EMBED:]
        labels = rank * n + torch.arange(n)
        return symmetric_ce(scale * image @ text_all.T, labels, scale * text @ image_all.T)
    image_all, text_all = KeepLocalSlice.apply(image), KeepLocalSlice.apply(text)  # "scaled"
    labels = torch.arange(WORLD * n)
    return symmetric_ce(scale * image_all @ text_all.T, labels, scale * text_all @ image_all.T)


def worker(rank: int, port: int, seed: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        images, texts = batch(seed)
        mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
        results = {}
        for variant in VARIANTS:
            model = encoder(seed)
            loss = rank_loss(variant, *embed(model, images[mine], texts[mine]), 1 / 0.1)
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            dist.all_reduce(grads)  # what DDP does: the mean over ranks
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results[variant] = (grads / WORLD, mean_loss / WORLD)
        if rank == 0:
            torch.save(results, Path(out) / "ranks.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(seed: int, out: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(free_port(), seed, tmp), nprocs=WORLD, start_method="fork")
        ranks = torch.load(Path(tmp) / "ranks.pt", weights_only=True)
    model = encoder(seed)
    images, texts = batch(seed)
    reference_loss = itc_loss(*embed(model, images, texts), 1 / 0.1)
    reference_loss.backward()
    reference = torch.cat([p.grad.flatten() for p in model.parameters()])
    values, rows = {}, []
    for variant in VARIANTS:
        grad, loss = ranks[variant]
        values[f"{variant}_rel_error"] = ((grad - reference).norm() / reference.norm()).item()
        values[f"{variant}_norm_ratio"] = (grad.norm() / reference.norm()).item()
        values[f"{variant}_cosine"] = F.cosine_similarity(grad, reference, dim=0).item()
        rows.append(dict(gather=variant, rel_error=values[f"{variant}_rel_error"],
                         norm_ratio=values[f"{variant}_norm_ratio"], cosine=values[f"{variant}_cosine"],
                         mean_loss=loss.item()))
    values["loss_difference"] = abs(ranks["correct"][1].item() - reference_loss.item())
    print(f"one process on {WORLD * LOCAL} pairs: loss {reference_loss.item():.6f}, |grad| {reference.norm():.4g}")
    common.print_table(rows, ["gather", "rel_error", "norm_ratio", "cosine", "mean_loss"])
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, metric in zip(axes, ("norm_ratio", "rel_error")):
        ax.bar(VARIANTS, [values[f"{v}_{metric}"] for v in VARIANTS], color=["tab:green", "tab:red", "tab:orange"])
        ax.axhline(1.0 if metric == "norm_ratio" else 0.0, color="black", lw=0.8, ls="--")
        ax.set_title(f"{metric.replace('_', ' ')} vs one process")
    fig.suptitle(f"ITC gradient over {WORLD} processes (seed {seed})")
    common.save_figure(fig, out / PICTURE)
    assert math.isfinite(values["correct_rel_error"])
    return values
