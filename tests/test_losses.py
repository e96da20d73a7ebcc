"""Tests for losses.py: each objective (paper Eq. 5-10) against a hand computation on tiny
tensors, the no-process-group path, and a 2-process gloo DDP run that must reproduce the
single-process ITC loss and parameter gradients on the concatenated batch (with and without
model.GlobalBatchNorm on the embeddings, whose running statistics must match too)."""
import gc
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from losses import (LossParts, LossWeights, dist_info, gather_with_grad, itc_loss, itm_loss,
                    mlm_loss, total_loss)
from model import GlobalBatchNorm


def neg_log_softmax(row, target):
    """-log( exp(row[target]) / sum_k exp(row[k]) ), written out with math on python floats."""
    return -math.log(math.exp(row[target]) / sum(math.exp(v) for v in row))


# ----------------------------------------------------------------------------------------------
# MLM (Eq. 5-6)

MLM_LOGITS = [[1.0, 2.0, 0.5], [3.0, -1.0, 0.0], [0.2, 0.1, -0.3], [-2.0, 4.0, 1.0]]
MLM_LABELS = [2, -100, 0, -100]  # positions 0 and 2 are masked, 1 and 3 are not scored


def test_mlm_is_mean_cross_entropy_over_masked_positions():
    expected = (neg_log_softmax(MLM_LOGITS[0], 2) + neg_log_softmax(MLM_LOGITS[2], 0)) / 2
    loss = mlm_loss(torch.tensor(MLM_LOGITS, dtype=torch.float64), torch.tensor(MLM_LABELS))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # The caller may also run the head on the masked positions only: same value.
    only_masked = torch.tensor([MLM_LOGITS[0], MLM_LOGITS[2]], dtype=torch.float64)
    assert mlm_loss(only_masked, torch.tensor([2, 0])).item() == pytest.approx(expected, abs=1e-12)


def test_mlm_ignores_unmasked_positions():
    labels = torch.tensor(MLM_LABELS)
    logits = torch.tensor(MLM_LOGITS, dtype=torch.float64, requires_grad=True)
    changed = logits.detach().clone()
    changed[[1, 3]] = torch.tensor([[9.0, -9.0, 5.0], [0.0, 0.0, 7.0]], dtype=torch.float64)
    loss = mlm_loss(logits, labels)
    loss.backward()
    assert mlm_loss(changed, labels).item() == loss.item()
    assert logits.grad[[1, 3]].abs().max().item() == 0.0
    assert logits.grad[[0, 2]].abs().max().item() > 0.0


@pytest.mark.parametrize("n_rows", [0, 3])
def test_mlm_without_masked_positions_is_zero_with_a_graph(n_rows):
    logits = torch.randn(n_rows, 5, requires_grad=True)
    loss = mlm_loss(logits, torch.full((n_rows,), -100))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()  # must not raise, and must give zero (not NaN) gradients
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ----------------------------------------------------------------------------------------------
# ITM (Eq. 7-8)


def test_itm_is_two_way_cross_entropy():
    logits = [[2.0, -1.0], [0.5, 0.5], [-1.0, 3.0]]
    labels = [1, 0, 1]  # 1 = matched pair, 0 = negative pair
    expected = sum(neg_log_softmax(row, y) for row, y in zip(logits, labels)) / 3
    loss = itm_loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(labels))
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_shape_errors_name_the_file():
    with pytest.raises(ValueError, match="losses.py itm_loss"):
        itm_loss(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="losses.py mlm_loss"):
        mlm_loss(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="losses.py itc_loss"):
        itc_loss(torch.zeros(3, 4), torch.zeros(2, 4), 10.0)


# ----------------------------------------------------------------------------------------------
# ITC (Eq. 9-10), one process

ITC_IMAGE = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]  # unit-norm rows, row i pairs with text i
ITC_TEXT = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
TEMPERATURE = 0.5


def hand_itc():
    """Loss and d loss / d logit_scale for ITC_IMAGE, ITC_TEXT at TEMPERATURE, by hand."""
    n = len(ITC_IMAGE)
    cos = [[sum(a * b for a, b in zip(ITC_IMAGE[i], ITC_TEXT[j])) for j in range(n)]
           for i in range(n)]
    s = [[cos[i][j] / TEMPERATURE for j in range(n)] for i in range(n)]
    rows = [s[i] for i in range(n)]  # image i against every text
    cols = [[s[i][j] for i in range(n)] for j in range(n)]  # text j against every image
    image_to_text = sum(neg_log_softmax(rows[i], i) for i in range(n)) / n
    text_to_image = sum(neg_log_softmax(cols[j], j) for j in range(n)) / n
    loss = (image_to_text + text_to_image) / 2

    def softmax(v):
        return [math.exp(x) / sum(math.exp(y) for y in v) for x in v]
    # d/d scale of -log softmax(scale * c)[t] = sum_k p_k c_k - c_t
    grad_rows = sum(sum(p * c for p, c in zip(softmax(rows[i]), cos[i])) - cos[i][i]
                    for i in range(n)) / n
    grad_cols = sum(sum(q * cos[i][j] for i, q in enumerate(softmax(cols[j]))) - cos[j][j]
                    for j in range(n)) / n
    return loss, (grad_rows + grad_cols) / 2


def test_itc_is_symmetric_infonce_with_temperature():
    expected_loss, expected_scale_grad = hand_itc()
    logit_scale = torch.tensor(1 / TEMPERATURE, dtype=torch.float64, requires_grad=True)
    image = torch.tensor(ITC_IMAGE, dtype=torch.float64)
    text = torch.tensor(ITC_TEXT, dtype=torch.float64)
    loss = itc_loss(image, text, logit_scale)
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    assert logit_scale.grad.item() == pytest.approx(expected_scale_grad, abs=1e-12)
    assert itc_loss(text, image, 1 / TEMPERATURE).item() == pytest.approx(expected_loss, abs=1e-12)


def test_no_process_group_makes_no_distributed_call(monkeypatch):
    assert not dist.is_initialized()

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed was called without a process group")
    for name in ("all_gather", "all_reduce", "all_gather_into_tensor", "reduce_scatter",
                 "broadcast", "barrier", "get_rank", "get_world_size"):
        monkeypatch.setattr(dist, name, forbidden)
    assert dist_info() == (0, 1)
    local = torch.randn(3, 4)
    assert gather_with_grad(local) == (local, 0, 3)
    image = torch.tensor(ITC_IMAGE, dtype=torch.float64, requires_grad=True)
    loss = itc_loss(image, torch.tensor(ITC_TEXT, dtype=torch.float64), 1 / TEMPERATURE)
    loss.backward()
    assert loss.item() == pytest.approx(hand_itc()[0], abs=1e-12)


# ----------------------------------------------------------------------------------------------
# ITC across 2 processes (gloo, CPU) under DistributedDataParallel

SPLITS = {"equal": [4, 4], "unequal": [3, 2]}  # local batch of rank 0, rank 1


class TinyDualEncoder(torch.nn.Module):
    """Image and text features -> L2-normalised embeddings, plus a learnable logit scale; with
    `batch_norm`, each projection is batch-normalised over the global batch first."""

    def __init__(self, batch_norm: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.image_proj = torch.nn.Linear(6, 4)
        self.text_proj = torch.nn.Linear(5, 4)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.3)))
        self.image_norm = GlobalBatchNorm(4) if batch_norm else torch.nn.Identity()
        self.text_norm = GlobalBatchNorm(4) if batch_norm else torch.nn.Identity()

    def forward(self, images, texts):
        image_emb = F.normalize(self.image_norm(self.image_proj(images)).to(images.dtype), dim=-1)
        text_emb = F.normalize(self.text_norm(self.text_proj(texts)).to(texts.dtype), dim=-1)
        return image_emb, text_emb, self.log_scale.exp()  # embeddings [b, 4]


def full_batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    texts = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    return images, texts


def loss_and_grads(model, images, texts):
    """ITC loss, parameter gradients and buffers (GlobalBatchNorm's running statistics)."""
    model.zero_grad(set_to_none=True)
    loss = itc_loss(*model(images, texts))
    loss.backward()
    unwrapped = getattr(model, "module", model)  # DDP prefixes names with "module."
    grads = {name: p.grad.clone() for name, p in unwrapped.named_parameters()}
    return loss.detach(), grads, {name: b.clone() for name, b in unwrapped.named_buffers()}


def ddp_results(rank):
    """This rank's loss, gradients and buffers for every case, each under a fresh DDP model."""
    images, texts = full_batch()
    results = {}
    for batch_norm in (False, True):
        model = DistributedDataParallel(TinyDualEncoder(batch_norm).double())
        for split, sizes in SPLITS.items():
            start = sum(sizes[:rank])
            local = slice(start, start + sizes[rank])
            loss, grads, buffers = loss_and_grads(model, images[local], texts[local])
            key = f"{split}/bn={batch_norm}"
            results[f"{key}/loss"] = loss
            results.update({f"{key}/grad/{name}": g for name, g in grads.items()})
            results.update({f"{key}/buffer/{name}": b for name, b in buffers.items()})
    return results


def ddp_worker(rank, world_size, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        torch.save(ddp_results(rank), os.path.join(out_dir, f"rank{rank}.pt"))
        # The DDP models are garbage now, but reference cycles that hold the process group: left
        # to the interpreter's shutdown, tearing down gloo's threads there aborted rank 1 once in
        # CI (SIGABRT, "terminate called without an active exception"). runtime.cleanup, which
        # the training scripts call, frees them the same way.
        gc.collect()
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_itc_equals_single_process_on_concatenated_batch(tmp_path):
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    images, texts = full_batch()
    for batch_norm in (False, True):
        reference_model = TinyDualEncoder(batch_norm).double()
        for split, sizes in SPLITS.items():
            n, key = sum(sizes), f"{split}/bn={batch_norm}"
            loss, grads, buffers = loss_and_grads(reference_model, images[:n], texts[:n])
            mean_loss = (ranks[0][f"{key}/loss"] + ranks[1][f"{key}/loss"]) / 2
            assert torch.allclose(mean_loss, loss, rtol=0, atol=1e-6), key
            for name, expected in grads.items():  # includes log_scale (learnable temperature)
                for r in range(2):  # DDP averaged the gradient: every rank must hold the reference
                    got = ranks[r][f"{key}/grad/{name}"]
                    assert torch.allclose(got, expected, rtol=0, atol=1e-6), (key, name, r)
                if batch_norm and name.endswith("proj.bias"):  # the norm removes any shift
                    assert expected.abs().max() < 1e-12, (key, name)
                else:
                    assert expected.abs().max() > 1e-3, (key, name)  # the check is not vacuous
            assert len(buffers) == (4 if batch_norm else 0)
            for name, expected in buffers.items():  # running mean/var: after 1 and 2 batches
                for r in range(2):
                    got = ranks[r][f"{key}/buffer/{name}"]
                    assert torch.allclose(got, expected, rtol=0, atol=1e-6), (key, name, r)


# ----------------------------------------------------------------------------------------------
# Weighted sum (Eq. 1)


def test_loss_weights_and_total():
    assert LossWeights() == LossWeights(mlm=1.0, itm=0.5, itc=0.1)
    parts = LossParts(mlm=torch.tensor(1.0), itm=torch.tensor(2.0), itc=torch.tensor(3.0))
    assert total_loss(parts, LossWeights()).item() == pytest.approx(1.0 + 1.0 + 0.3)
    assert total_loss(LossParts(mlm=torch.tensor(2.0)), LossWeights()).item() == 2.0
    with pytest.raises(ValueError, match="losses.py total_loss"):
        total_loss(LossParts(), LossWeights())
