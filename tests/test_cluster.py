"""Runs as a cluster runs them: torchrun on the CPU with gloo, two processes, tiny runs.

- two "nodes" (two torchrun agents on localhost, c10d rendezvous) train exactly what one node
  with two processes trains;
- a worker killed with SIGKILL between two checkpoints: `torchrun --max-restarts=1` relaunches the
  group, `--resume auto` continues from the last checkpoint, and the run ends bit-identical to an
  uninterrupted one (pre-training and fine-tuning; the relaunch is the round whose process group
  would read the failed round's keys without runtime.launch_store);
- SIGTERM to one rank: every rank stops after the same step, rank 0 saves, and a relaunch with
  `--resume auto` ends bit-identical (pre-training and fine-tuning);
- SIGTERM to every process of the job, DataLoader workers included, as SLURM signals a job step
  (preemption, `scancel`, `--signal`): the workers ignore it (data.ignore_stop_signals), the ranks
  stop after the current step, rank 0 saves it, and a relaunch ends bit-identical (both programs);
- a NaN loss on one rank of two skips the step on both.
Faults are injected on one rank by tests/ddp_fault_worker.py. Bit-identical holds at a fixed thread
count (one thread per process here).
"""
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from checkpoint import read_checkpoint
from runtime import launch_store
from test_train import assert_same_checkpoints

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ddp_fault_worker.py"
N = 4  # pre-training steps


def pretrain_args(bench, out, *extra):
    return ["--data", str(bench / "pretrain"), "--tokenizer", str(bench / "tokenizer.json"), "--out", str(out),
            "--batch-size", "8", "--workers", "0", "--log-every", "1", "--save-every", "1000", "--steps", str(N),
            *extra]


def finetune_args(bench, init, out, *extra):
    """IC for 2 epochs of 4 steps of 8 images."""
    return ["--task", "ic", "--data", str(bench / "ic"), "--init", str(init), "--out", str(out), "--epochs", "2",
            "--batch-size", "8", "--max-steps-per-epoch", "4", "--eval-batch", "16", "--workers", "0",
            "--save-every", "1000", *extra]


def torchrun(program: str, args, results: Path, *launcher, fault: str = "",
             check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 [launcher] ddp_fault_worker.py program args` (standalone unless
    the launcher names a rendezvous), FAULT as tests/ddp_fault_worker.py reads it; check: it exits 0."""
    results.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESULTS": str(results), "FAULT": fault}
    launch = list(launcher) or ["--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *launch, str(WORKER), program, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 or not check, proc.stdout + proc.stderr
    return proc


def returned(results: Path) -> dict:
    """What each rank's program returned, by (rank, round of workers)."""
    return {tuple(int(part[len(word):]) for part, word in zip(p.stem.split("-"), ("rank", "round"))):
            json.loads(p.read_text()) for p in results.glob("rank*-round*.json")}


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_each_launch_of_the_workers_gets_a_key_space_of_its_own():
    """runtime.launch_store on one store kept across three launches of 3 ranks (as torchrun keeps
    its store across restarts), the ranks started in reverse order, and before the third launch a
    stale ticket, drawn by a rank 1 that died before rank 0 answered it. Every rank of a launch
    shares one key space, and no launch sees the keys of an earlier one."""
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=60))
    for launch in range(3):
        if launch == 2:  # a worker of a failed launch drew a ticket and died
            dist.PrefixStore("ptunifier", store).add("rank1/tickets", 1)
        with ThreadPoolExecutor(3) as pool:
            joined = {rank: pool.submit(launch_store, store, rank, 3) for rank in (2, 1, 0)}
            ranks = [joined[rank].result(timeout=60) for rank in range(3)]
        assert not ranks[0].check(["the group's key"])  # nothing left by an earlier launch
        ranks[0].set("the group's key", f"launch {launch}")
        assert [r.get("the group's key") for r in ranks] == [f"launch {launch}".encode()] * 3


# ----------------------------------------------------------------------------- pre-training

@pytest.fixture(scope="module")
def straight(bench, tmp_path_factory):
    """The reference: N pre-training steps on one node with two processes, uninterrupted."""
    out = tmp_path_factory.mktemp("straight")
    torchrun("train", pretrain_args(bench, out / "run"), out / "results")
    return out / "run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_what_one_node_with_two_processes_does(bench, straight, tmp_path):
    """Two torchrun agents (--nnodes=2, one process each) meet through a c10d rendezvous on
    localhost, as two machines would; the parameters end identical to --nproc_per_node=2."""
    out, port = tmp_path / "run", free_port()
    launcher = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=two-nodes"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESULTS": str(tmp_path), "FAULT": ""}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, str(WORKER), "train",
                               *pretrain_args(bench, out)], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert_same_checkpoints(out / "checkpoint.safetensors", straight / "checkpoint.safetensors")


def test_sigkill_of_a_worker_is_relaunched_and_resumes_exactly(bench, straight, tmp_path):
    """Checkpoints every 2 steps; rank 1 is SIGKILLed as step 3 begins (step 2 is saved, step 3's
    work is lost); torchrun relaunches both workers and --resume auto continues from step 2."""
    out, results = tmp_path / "run", tmp_path / "results"
    proc = torchrun("train", pretrain_args(bench, out, "--save-every", "2", "--resume", "auto"), results,
                    "--standalone", "--nproc_per_node=2", "--max-restarts=1", fault="kill:1:3")
    assert f"no checkpoint at {out / 'checkpoint.safetensors'}: starting fresh" in proc.stdout
    assert f"resuming from {out / 'checkpoint.safetensors'} at step 2" in proc.stdout
    assert returned(results) == {(0, 1): dict(stopped=False, step=N), (1, 1): dict(stopped=False, step=N)}
    assert_same_checkpoints(out / "checkpoint.safetensors", straight / "checkpoint.safetensors")
    assert metric_steps(out) == list(range(1, N + 1))  # the lost step 3 is logged once


def test_sigterm_to_one_rank_stops_every_rank_and_resume_auto_is_exact(bench, straight, tmp_path):
    """SIGTERM to rank 1 alone as step 1 begins: both ranks finish step 1 and stop (rank 0 learns of
    the signal from the all-reduced flag), rank 0 saves step 2; the same command relaunched ends
    with the parameters of the uninterrupted run."""
    out, results = tmp_path / "run", tmp_path / "results"
    args = pretrain_args(bench, out, "--resume", "auto")
    proc = torchrun("train", args, results / "1", fault="term:1:1")
    assert "stopped by a signal on another rank at step 2" in proc.stdout  # rank 0 prints; it got none
    assert returned(results / "1") == {(0, 0): dict(stopped=True, step=2), (1, 0): dict(stopped=True, step=2)}
    torchrun("train", args, results / "2")
    assert returned(results / "2") == {(0, 0): dict(stopped=False, step=N), (1, 0): dict(stopped=False, step=N)}
    assert_same_checkpoints(out / "checkpoint.safetensors", straight / "checkpoint.safetensors")
    assert metric_steps(out) == list(range(1, N + 1))


def test_sigterm_to_every_process_of_the_job_saves_the_step_and_resume_auto_is_exact(bench, straight, tmp_path):
    """As SLURM signals a job step: SIGTERM to torchrun, both ranks and their DataLoader workers
    (--workers 1) as step 1 begins. The workers live on, both ranks finish step 1 and stop, rank 0
    saves step 2 (a worker killed by the signal would fail the rank); the relaunch ends identical."""
    out, results = tmp_path / "run", tmp_path / "results"
    args = pretrain_args(bench, out, "--workers", "1", "--resume", "auto")
    proc = torchrun("train", args, results / "1", fault="termjob:1:1", check=False)
    assert "stopped by SIGTERM at step 2" in proc.stdout, proc.stdout + proc.stderr
    assert "DataLoader worker" not in proc.stdout + proc.stderr
    assert returned(results / "1") == {(0, 0): dict(stopped=True, step=2), (1, 0): dict(stopped=True, step=2)}
    assert read_checkpoint(out / "checkpoint.safetensors")[0]["state"]["step"] == 2
    torchrun("train", args, results / "2")
    assert returned(results / "2") == {(0, 0): dict(stopped=False, step=N), (1, 0): dict(stopped=False, step=N)}
    assert_same_checkpoints(out / "checkpoint.safetensors", straight / "checkpoint.safetensors")
    assert metric_steps(out) == list(range(1, N + 1))


def test_a_nan_loss_on_one_rank_skips_the_step_on_both(bench, tmp_path):
    """Rank 1's loss is NaN in step 1. DDP has already averaged its NaN gradients into rank 0's, so
    a rank that stepped would hold NaN parameters and keep a NaN loss from then on: one skipped
    step in all, and finite parameters at the end, show that both ranks skipped it."""
    out = tmp_path / "run"
    torchrun("train", pretrain_args(bench, out), tmp_path / "results", fault="nan:1:1")
    meta, tensors = read_checkpoint(out / "checkpoint.safetensors")
    assert meta["state"]["step"] == N and meta["state"]["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for name, t in tensors.items() if t.is_floating_point())
    assert [json.loads(line)["skipped_steps"] for line in (out / "metrics.jsonl").read_text().splitlines()] == \
        [0, 1, 1, 1]


# ----------------------------------------------------------------------------- fine-tuning

@pytest.fixture(scope="module")
def ft_straight(bench, straight, tmp_path_factory):
    """The reference fine-tune (2 processes, uninterrupted) from the pre-training checkpoint."""
    out = tmp_path_factory.mktemp("ft_straight")
    torchrun("finetune", finetune_args(bench, straight / "checkpoint.safetensors", out / "run"), out / "results")
    return out / "run"


def assert_same_finetune(run: Path, reference: Path) -> None:
    """The same weights and optimizer to the bit, the same best epoch (and its file), the same
    history and test scores."""
    assert_same_checkpoints(run / "checkpoint.safetensors", reference / "checkpoint.safetensors")
    assert_same_checkpoints(run / "best.safetensors", reference / "best.safetensors")
    ours, theirs = (json.loads((r / "results.json").read_text()) for r in (run, reference))
    for key in ("best_epoch", "best_val", "history", "test", "skipped_steps"):
        assert ours[key] == theirs[key], key


def test_finetune_sigkill_between_saves_is_relaunched_and_resumes_exactly(bench, straight, ft_straight, tmp_path):
    """Checkpoints every 2 steps (and at each epoch end); rank 1 is SIGKILLed as step 3 begins, in
    the middle of epoch 1; the relaunch continues from step 2 and ends identical."""
    out, results = tmp_path / "run", tmp_path / "results"
    args = finetune_args(bench, straight / "checkpoint.safetensors", out, "--save-every", "2", "--resume", "auto")
    proc = torchrun("finetune", args, results, "--standalone", "--nproc_per_node=2", "--max-restarts=1",
                    fault="kill:1:3")
    assert f"resuming from {out / 'checkpoint.safetensors'} at epoch 1, step 2" in proc.stdout
    assert set(returned(results)) == {(0, 1), (1, 1)}  # the relaunched round finished
    assert_same_finetune(out, ft_straight)


def test_finetune_sigterm_to_one_rank_stops_every_rank_and_resume_auto_is_exact(bench, straight, ft_straight,
                                                                                 tmp_path):
    """SIGTERM to rank 1 alone as step 5 begins (epoch 2): both ranks stop after it, rank 0 saves;
    the relaunch resumes in epoch 2 with epoch 1's record and ends identical."""
    out, results = tmp_path / "run", tmp_path / "results"
    args = finetune_args(bench, straight / "checkpoint.safetensors", out, "--resume", "auto")
    proc = torchrun("finetune", args, results / "1", fault="term:1:5")
    assert "stopped by a signal on another rank at epoch 2, step 6" in proc.stdout
    assert returned(results / "1") == {(0, 0): dict(stopped=True, step=6), (1, 0): dict(stopped=True, step=6)}
    proc = torchrun("finetune", args, results / "2")
    assert f"resuming from {out / 'checkpoint.safetensors'} at epoch 2, step 6" in proc.stdout
    assert_same_finetune(out, ft_straight)


def test_finetune_sigterm_to_every_process_of_the_job_saves_the_step_and_resume_auto_is_exact(
        bench, straight, ft_straight, tmp_path):
    """The same signal to torchrun, both ranks and their DataLoader workers (--workers 1) as step 5
    begins (epoch 2): both ranks stop after it, rank 0 saves; the relaunch ends identical."""
    out, results = tmp_path / "run", tmp_path / "results"
    args = finetune_args(bench, straight / "checkpoint.safetensors", out, "--workers", "1", "--resume", "auto")
    proc = torchrun("finetune", args, results / "1", fault="termjob:1:5", check=False)
    assert "stopped by SIGTERM at epoch 2, step 6" in proc.stdout, proc.stdout + proc.stderr
    assert "DataLoader worker" not in proc.stdout + proc.stderr
    assert returned(results / "1") == {(0, 0): dict(stopped=True, step=6), (1, 0): dict(stopped=True, step=6)}
    torchrun("finetune", args, results / "2")
    assert_same_finetune(out, ft_straight)
