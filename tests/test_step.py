"""The pre-training step (step.py): the MLM pass fused at its rows equals the full pass, and the
step never reads a value back from the device (its equality with the plain passes: test_train.py)."""
import argparse
import dataclasses

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import bench
import train
from data import mlm_positions
from losses import LossWeights
from model import PTUnifier, gather_rows
from recipes import RECIPES
from runtime import Runtime
from step import PretrainStep
from tokenizer import round_up

aten = torch.ops.aten


def test_round_up_buckets_and_caps():
    assert [round_up(n, 16, 48) for n in (1, 16, 17, 40, 48)] == [16, 16, 32, 48, 48]
    assert round_up(50, 16, 48) == 50  # never below n
    assert round_up(5, 1, 48) == 5


def test_mlm_positions_lists_the_masked_positions_then_zeros():
    labels = torch.full((3, 10), -100)
    labels[0, [2, 5, 7]] = torch.tensor([11, 12, 13])
    labels[1, 9] = 14
    positions = mlm_positions(labels, multiple=4)
    assert positions.tolist() == [[2, 5, 7, 0], [9, 0, 0, 0], [0, 0, 0, 0]]
    targets = labels.gather(1, positions)  # what the step scores: -100 at the fillers
    assert targets.tolist() == [[11, 12, 13, -100], [14, -100, -100, -100], [-100] * 4]
    assert mlm_positions(labels, multiple=16).shape == (3, 10)  # capped at L
    labels[2, 0] = 3
    with pytest.raises(ValueError, match="position 0"):
        mlm_positions(labels)


def test_fusing_only_the_mlm_positions_equals_the_full_pass():
    """Fusion's text_rows (the last layer fuses only the wanted text rows and skips the image
    stream and the poolers) equals the full fusion pass gathered at those positions, for 1 and 2
    fusion layers, with pads and with filler positions."""
    for layers in (1, 2):
        torch.manual_seed(layers)
        model = PTUnifier(dataclasses.replace(RECIPES["tiny"].model, fusion_layers=layers)).eval()
        ids = torch.randint(5, 4096, (3, 9))
        mask = torch.ones_like(ids)
        mask[2, 6:] = 0
        positions = torch.tensor([[1, 4, 8, 0], [3, 0, 0, 0], [2, 5, 0, 0]])  # [B, P]
        image, text = model.encode_image(torch.randn(3, 3, 64, 64)), model.encode_text(ids, mask)
        full = gather_rows(model.fuse_encoded(image, text).text, positions)
        assert full[0, 1].equal(model.fuse_encoded(image, text).text[0, 4])
        rows = model.fuse_encoded(image, text, text_rows=positions)
        assert rows.image is None and rows.joint is None
        torch.testing.assert_close(rows.text, full, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- device syncs

def forces_a_sync(func, args) -> bool:
    """Ops that must copy a value from the device to the host before they can return (on an
    accelerator the host then waits for every queued kernel) or whose output size depends on
    the data."""
    if func in (aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default,
                aten.equal.default, aten.nonzero.default, aten.masked_select.default,
                aten.bincount.default, aten.unique_consecutive.default, aten._unique2.default):
        return True
    if func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor):
        return "output_size" not in str(args) and len(args) < 3
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return any(t is not None and t.dtype == torch.bool for t in args[1])
    return False


class SyncCounter(TorchDispatchMode):
    """Counts, by name, the ops dispatched inside it that force a device-to-host copy, and the
    tensor methods that copy a tensor to the host (`tolist`, `cpu`, `numpy`: no aten op on a CPU
    tensor, a copy and a wait on an accelerator)."""

    def __init__(self):
        super().__init__()
        self.syncs = []
        counter = self

        class HostCopies(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in (torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy):
                    counter.syncs.append(func.__name__)
                return func(*args, **(kwargs or {}))
        self.host_copies = HostCopies()

    def __enter__(self):
        self.host_copies.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.host_copies.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if forces_a_sync(func, args):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def base_setup(pad_fraction: float) -> bench.Setup:
    """bench.build_setup at the paper's widths (768, 12 heads, pools of 1024), one layer per stack,
    64-px images, a batch of 4 texts of 48 tokens."""
    args = argparse.Namespace(device="cpu", dtype="fp32", preset="base", image_size=64, layers=1,
                              vocab_size=1000, batch=4, text_len=48, pad_fraction=pad_fraction)
    return bench.build_setup(args)


def test_the_sync_counter_sees_syncs():
    x = torch.tensor([0.0, 1.0, 2.0])
    with SyncCounter() as counter:
        x[x > 0], x.nonzero(), x.sum().item(), bool(x.any()), torch.bincount(x.long()), x.tolist()
    assert len(counter.syncs) == 6, counter.syncs


@pytest.mark.parametrize("pad_fraction", [0.0, 0.4], ids=["no pads", "pads"])
def test_one_step_reads_nothing_back_from_the_device(pad_fraction):
    """Forward, backward, gradient clipping and AdamW of one pre-training step at base widths:
    no op that forces a device-to-host copy, with or without pads."""
    s = base_setup(pad_fraction)
    assert (s.batch.attention_mask == 0).any() == (pad_fraction > 0)
    with SyncCounter() as counter:
        bench.step_fn(s, PretrainStep(s.model, LossWeights()))()
        bench.step_fn(s, PretrainStep(s.model, LossWeights()))()  # AdamW's state exists from here
    assert counter.syncs == []


def test_a_training_step_reads_the_device_once():
    """train.train_step around the step (schedule, seed, buffers, the step, the guard, the
    optimiser update, prompt usage) reads the device once, at its end (train.step_verdict)."""
    s = base_setup(0.4)
    cfg = train.TrainConfig(preset="base", steps=10, batch_size=4).resolved()
    rt = Runtime(torch.device("cpu"), 0, 1, 0, None)
    batches = iter([s.batch] * 3)
    run = train.Run(cfg, rt, None, s.model, PretrainStep(s.model, LossWeights()), s.optimizer,
                    torch.amp.GradScaler("cpu", enabled=False), batches, 1, 1.0,
                    dict(step=0, bad_steps=0, skipped_steps=0, itc_only_until=0, itc_average=1.0),
                    train.PromptUsage(s.cfg.pool_size, rt.device), train.SkipTracker(4), train.SaveClock(0))
    stop = train.StopSignal()
    try:
        train.train_step(run, stop)
        with SyncCounter() as counter:
            train.train_step(run, stop)
    finally:
        stop.restore()
    assert counter.syncs == ["tolist"]  # the verdict
    assert run.state["step"] == 2 and int(run.usage.textual.sum()) == 2 * 4 * s.cfg.k_textual
