"""Lab 3 checks: over two gloo processes, the gathered contrastive loss and its gradient (averaged
over ranks, as DDP does) equal one process on the concatenated batch."""
import os
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import common

impl = common.exercise(__file__)
B, D = 3, 4


def data():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2 * B, D, generator=g, dtype=torch.float64),
            torch.randn(2 * B, D, generator=g, dtype=torch.float64))


def reference():
    """One process, all 2B pairs: the plain symmetric InfoNCE and its gradient."""
    image, text = (x.clone().requires_grad_() for x in data())
    i, t = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = 5.0 * i @ t.T
    labels = torch.arange(2 * B)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    return loss.detach(), image.grad, text.grad


def worker(rank, port, out):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        image, text = (x[rank * B:(rank + 1) * B].clone().requires_grad_() for x in data())
        gathered = impl.all_gather_rows(image)
        loss = impl.contrastive_loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1), 5.0)
        loss.backward()
        # the gather's backward summed every rank's loss into these rows; DDP then divides by 2
        grads = torch.cat([image.grad, text.grad])
        total = loss.detach().clone()
        dist.all_reduce(total)
        torch.save(dict(gathered=gathered.detach(), grads=grads / 2, loss=total / 2), Path(out) / f"{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(port, tmp), nprocs=2, start_method="fork")
        return [torch.load(Path(tmp) / f"{r}.pt", weights_only=True) for r in range(2)]


def test_the_gather_concatenates_every_rank_in_order(ranks):
    image, _ = data()
    for r in range(2):
        torch.testing.assert_close(ranks[r]["gathered"], image)


def test_loss_and_gradient_equal_one_process(ranks):
    loss, image_grad, text_grad = reference()
    torch.testing.assert_close(ranks[0]["loss"], loss)
    for r in range(2):  # rank r's rows: the gradient the single process gives them
        torch.testing.assert_close(ranks[r]["grads"][:B], image_grad[r * B:(r + 1) * B])
        torch.testing.assert_close(ranks[r]["grads"][B:], text_grad[r * B:(r + 1) * B])


def test_without_a_process_group_nothing_is_gathered():
    local = torch.randn(3, 2)
    assert impl.all_gather_rows(local) is local
    loss, _, _ = reference()
    image, text = (F.normalize(x, dim=-1) for x in data())
    torch.testing.assert_close(impl.contrastive_loss(image, text, 5.0), loss)
