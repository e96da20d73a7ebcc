"""torch.compile of the pre-training step (train.py --compile): the whole step is one graph, its
numbers are eager's, a real run compiles a graph per text shape at most, and DDP agrees.

Inductor (the default backend) is exercised once, on the tiny step's numbers; the tests that count
graphs or run two processes use the aot_eager backend: the same TorchDynamo graph capture and
AOTAutograd forward/backward split without generating C++ code (minutes on 2 cores)."""
import argparse
import dataclasses
import functools
import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel

import bench
import train
from data import PretrainDataset, make_train_stream
from losses import LossWeights
from step import PretrainStep
from test_losses import free_port
from tokenizer import Tokenizer

# Losses and gradients of the compiled step against eager's: the compiled kernels sum in another
# order, and three AdamW steps carry the differences forward. Each tensor is compared at its own
# scale (SCALED x its largest entry), so that small gradients are checked too, above a FLOOR of
# the largest entry of all: gradients that are 0 but for rounding (biases before the ITC batch
# norm, whose shift it removes) have no scale of their own.
RTOL, SCALED, FLOOR = 1e-4, 1e-4, 1e-6


def assert_close_per_tensor(got: dict, want: dict, rtol: float = RTOL, scaled: float = SCALED,
                            floor: float = FLOOR, where=()) -> None:
    """Every tensor of `want` against `got`'s: |got - want| <= rtol |want| + scaled max|want| +
    floor x the largest entry of every tensor of `want`."""
    assert got.keys() == want.keys(), where
    largest = max(w.abs().max().item() for w in want.values())
    for name, w in want.items():
        atol = scaled * w.abs().max().item() + floor * largest
        torch.testing.assert_close(got[name], w, rtol=rtol, atol=atol, msg=lambda m: f"{where} {name}: {m}")


def tiny_setup(batch: int = 8, seed: int = 0) -> bench.Setup:
    """bench.build_setup for the tiny preset: a batch of `batch` texts of 64 tokens, 40% pads."""
    args = argparse.Namespace(device="cpu", dtype="fp32", preset="tiny", image_size=0, layers=0,
                              vocab_size=1000, batch=batch, text_len=64, pad_fraction=0.4)
    s = bench.build_setup(args)
    return dataclasses.replace(s, batch=bench.synthetic_batch(s.cfg, batch, 64, seed, 0.4))


def train_steps(s: bench.Setup, module, steps: int) -> list[tuple[dict, dict]]:
    """(losses, gradients) of `steps` optimisation steps of `module` on the setup's batch."""
    out = []
    for _ in range(steps):
        result = module(s.batch)
        result.total.backward()
        losses = {f.name: getattr(result.losses, f.name).detach() for f in dataclasses.fields(result.losses)}
        out.append((losses | {"total": result.total.detach()},
                    {n: p.grad.clone() for n, p in s.model.named_parameters() if p.grad is not None}))
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), 1.0)
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
    return out


def fresh_dynamo() -> None:
    """Forget every compiled graph and zero TorchDynamo's counters."""
    torch._dynamo.reset()
    counters.clear()


def test_the_tiny_step_compiles_whole_and_gives_eager_numbers():
    """fullgraph=True: any graph break would raise. Three steps of the compiled step (Inductor)
    from the same weights give eager's losses and gradients within RTOL / ATOL."""
    fresh_dynamo()
    eager, compiled = tiny_setup(), tiny_setup()
    step = torch.compile(PretrainStep(compiled.model, LossWeights()), fullgraph=True)
    expected = train_steps(eager, PretrainStep(eager.model, LossWeights()), 3)
    got = train_steps(compiled, step, 3)
    assert counters["stats"]["unique_graphs"] == 1
    for i, ((losses, grads), (want_losses, want_grads)) in enumerate(zip(got, expected)):
        assert_close_per_tensor(losses, want_losses, where=("step", i))
        assert_close_per_tensor(grads, want_grads, where=("step", i))
    assert expected[2][0]["total"] < expected[0][0]["total"]  # the steps did train


def test_a_compiled_run_makes_a_graph_per_text_shape_at_most(request, tmp_path, monkeypatch):
    """A real run with --compile (3 ITC-only steps, then full steps over batches of several text
    lengths and MLM widths) makes at most one graph per (kind of step, text shape) it meets: the
    data loader's buckets bound the recompiles (TorchDynamo's automatic dynamic shapes may make fewer)."""
    synthetic = request.getfixturevalue("bench")  # conftest's small benchmark (the name `bench` is the module here)
    fresh_dynamo()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    steps, batch = 10, 8
    cfg = train.TrainConfig(data=str(synthetic / "pretrain"), out=str(tmp_path), steps=steps, batch_size=batch,
                            workers=0, compile=True, itc_warmup=0.3, log_every=5, save_every=1000,
                            text_unit="sentence")
    result = train.train(cfg)
    assert result["step"] == steps
    tok = Tokenizer.load(synthetic / "tokenizer.json")
    ds = PretrainDataset(synthetic / "pretrain", "train", tok, 64, 64, train=True, seed=0, text_unit="sentence")
    stream = iter(make_train_stream(ds, batch, seed=0, num_workers=0))
    shapes = [(i < 3, b.input_ids.shape[1], b.mlm_positions.shape[1]) for i, b in zip(range(steps), stream)]
    itc_only = {(L,) for warm, L, _ in shapes if warm}  # the ITC-only step does not read P
    full = {(L, P) for warm, L, P in shapes if not warm}
    assert len(itc_only) + len(full) >= 3  # the run met several shapes
    assert 2 <= counters["stats"]["unique_graphs"] <= len(itc_only) + len(full)


def ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        results = {}
        for name in ("eager", "compiled"):
            s = tiny_setup(batch=4, seed=rank)  # the same weights on both ranks, each its own batch
            module = DistributedDataParallel(PretrainStep(s.model, LossWeights()))
            if name == "compiled":
                module = torch.compile(module, backend="aot_eager")
            results[name] = [losses for losses, _ in train_steps(s, module, 2)]
            del module
            gc.collect()  # DDP holds the process group in a reference cycle (runtime.cleanup)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_the_compiled_step_under_ddp_gives_the_eager_losses(tmp_path):
    """Two gloo processes, DDP around the step, the global ITC gather inside it: the compiled
    step's losses equal the eager step's over two optimisation steps, on both ranks."""
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for got, want in zip(results["compiled"], results["eager"], strict=True):
            assert_close_per_tensor(got, want, where=("rank", rank))
