"""scripts/slurm.sh under a real SLURM: one node, two processes, the CPU (gloo), tiny runs.

- a preemption (`scontrol requeue`) while the job trains: SLURM signals every process of the
  job, the step ends in a save, the relaunched job resumes by itself and ends bit-identical to an
  uninterrupted torchrun run (pre-training, and a fine-tune: weights, best epoch, scores);
- a time limit with --signal before it: the step stops and saves, the script queues the job
  again, and the run ends bit-identical (after as many launches as it takes);
- `scancel --signal=TERM` (the step only): the same as the notice, the job is queued again;
  a plain `scancel`: the step saves, the job ends CANCELLED and is not queued again;
- a worker killed (SIGKILL) under --max-restarts: torchrun relaunches the workers from the last
  periodic save, SLURM sees nothing, and the run ends bit-identical.
Not collected by the README's `python -m pytest -q tests` (the file name is not test_*.py): it
needs a cluster, and .ci/run starts one, runs it and stops it:

    sudo scripts/slurm_local.sh start
    SLURM_CONF=/tmp/ptunifier-slurm/slurm.conf python -m pytest -q tests/slurm_cases.py
    sudo scripts/slurm_local.sh stop

Without a reachable SLURM every case fails (never skips).
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoint import read_metadata
from test_cluster import assert_same_finetune, free_port, metric_steps
from test_train import assert_same_checkpoints

ROOT = Path(__file__).resolve().parents[1]
STEPS = 200  # about 50 s of training here: longer than the 35 s before the time-limit notice


def program_args(bench, *extra):
    return ["train.py", "--data", str(bench / "pretrain"), "--tokenizer", str(bench / "tokenizer.json"),
            "--batch-size", "8", "--workers", "1", "--log-every", "1", "--save-every", "1000",
            "--steps", str(STEPS), *extra]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    try:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"no SLURM here ({e}): start one with `sudo scripts/slurm_local.sh start`")
    if state.returncode != 0 or not state.stdout.strip():
        pytest.fail(f"no SLURM node: {state.stderr.strip()}; start one with `sudo scripts/slurm_local.sh "
                    "start` and set SLURM_CONF=/tmp/ptunifier-slurm/slurm.conf")


def finetune_args(bench, init: Path):
    """IC, 12 epochs of 6 steps of 8 images, validated after each."""
    return ["finetune.py", "--task", "ic", "--data", str(bench / "ic"), "--init", str(init), "--epochs", "12",
            "--batch-size", "8", "--eval-batch", "16", "--workers", "1", "--save-every", "1000"]


def uninterrupted(args: list[str], out: Path) -> Path:
    """The run with plain torchrun (two processes), uninterrupted."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def reference(bench, tmp_path_factory):
    return uninterrupted(program_args(bench), tmp_path_factory.mktemp("reference") / "run")


def submit(out: Path, args: list[str], **header) -> str:
    """`bash scripts/slurm.sh ARGS` for one node with two processes on the CPU; its job id."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NODES": "1", "PROCS_PER_NODE": "2", "GPUS": "0",
           "CPUS_PER_NODE": str(os.cpu_count()), "OUT": str(out), "PORT": str(free_port()), **header}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm.sh"), *args], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return re.fullmatch(r"Submitted batch job (\d+)", proc.stdout.strip()).group(1)


def job(job_id: str) -> dict:
    """`scontrol show job` as a dict (JobState, Restarts, ...)."""
    text = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                          check=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def log(out: Path, job_id: str) -> list[str]:
    """The job's log, one line per line or progress-bar update."""
    return re.split(r"[\r\n]+", (out / "slurm" / f"{job_id}.out").read_text(errors="replace"))


def last_step(out: Path) -> int:
    try:
        return metric_steps(out)[-1]
    except (FileNotFoundError, IndexError, ValueError):  # not yet written, or a line half-written
        return 0


def wait_until(condition, what: str, timeout: float = 420):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.5)
    return found


def ended(job_id: str) -> dict:
    """Wait for the job to end; its record."""
    return wait_until(lambda: (j := job(job_id))["JobState"] in ("COMPLETED", "FAILED", "CANCELLED",
                                                                  "TIMEOUT") and j, f"job {job_id} to end")


def saved_step(out: Path) -> int:
    return read_metadata(out / "checkpoint.safetensors")["state"]["step"]


def assert_finished_as(out: Path, job_id: str, reference: Path) -> list[str]:
    """The run ended bit-identical to `reference`, every step logged once; its log."""
    lines = log(out, job_id)
    assert not [line for line in lines if "DataLoader worker" in line], lines
    assert_same_checkpoints(out / "checkpoint.safetensors", reference / "checkpoint.safetensors")
    assert metric_steps(out) == list(range(1, STEPS + 1))
    return lines


def stops(lines: list[str]) -> list[int]:
    """The steps at which the program saved on SIGTERM; no rank failed on the way (the only
    traceback is torchrun's own exit on the signal)."""
    tracebacks = sum("Traceback" in line for line in lines)
    assert tracebacks == sum(line.startswith("torch.distributed.elastic.multiprocessing.api.SignalException")
                             for line in lines), lines
    return [int(m.group(1)) for line in lines if (m := re.search(r"stopped by SIGTERM at step (\d+);", line))]


def test_a_preempted_job_is_relaunched_resumes_and_ends_bit_identical(bench, reference, tmp_path):
    """`scontrol requeue` at step >= 30: SLURM sends SIGTERM to the batch shell and to every
    process of the step; the step in progress ends, rank 0 saves it (not an earlier step: the
    periodic saves are every 1000), SLURM queues the job again and relaunches it."""
    out = tmp_path / "run"
    job_id = submit(out, program_args(bench), TIME="10")
    at = wait_until(lambda: (s := last_step(out)) >= 30 and s, "step 30")
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    record = ended(job_id)
    assert (record["JobState"], record["Restarts"]) == ("COMPLETED", "1")
    lines = assert_finished_as(out, job_id, reference)
    [stopped] = stops(lines)
    assert stopped >= at
    assert any(f"resuming from {out / 'checkpoint.safetensors'} at step {stopped}" in line for line in lines)


def test_a_preempted_finetune_is_relaunched_resumes_and_ends_bit_identical(bench, reference, tmp_path):
    """The same for finetune.py: `scontrol requeue` once epoch 2 is saved; the relaunch resumes in
    the epoch it was in, and ends with the uninterrupted fine-tune's weights, best epoch and scores."""
    args = finetune_args(bench, reference / "checkpoint.safetensors")
    expected = uninterrupted(args, tmp_path / "uninterrupted")
    out = tmp_path / "run"
    job_id = submit(out, args, TIME="10")
    wait_until(lambda: (out / "checkpoint.safetensors").is_file() and saved_step(out) >= 12, "epoch 2 saved")
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    record = ended(job_id)
    assert (record["JobState"], record["Restarts"]) == ("COMPLETED", "1")
    lines = log(out, job_id)
    assert any(re.search(r"stopped by SIGTERM at epoch \d+, step \d+", line) for line in lines), lines
    assert not [line for line in lines if "DataLoader worker" in line], lines
    assert_same_finetune(out, expected)


def test_a_time_limit_signal_saves_and_the_script_requeues_until_done(bench, reference, tmp_path):
    """--time=2 --signal=TERM@60: SIGTERM reaches the step (not the batch shell) before the limit,
    the run saves, the script finds progress and no result.json and queues the job again."""
    out = tmp_path / "run"
    job_id = submit(out, program_args(bench), TIME="2", NOTICE="60")
    record = ended(job_id)
    assert record["JobState"] == "COMPLETED" and int(record["Restarts"]) >= 1
    lines = assert_finished_as(out, job_id, reference)
    requeued = [line for line in lines if re.search(r"stopped at step \d+ \(torchrun exit \d+\): requeued", line)]
    assert stops(lines) and len(requeued) == len(stops(lines)) == int(record["Restarts"])


def test_scancel_with_the_signal_requeues_and_plain_scancel_ends_the_job_saved(bench, reference, tmp_path):
    """`scancel --signal=TERM` signals the step only: the script lives on and queues the job again
    (the run ends bit-identical); a plain `scancel` signals the batch shell too: the step saves,
    and the job ends CANCELLED, not queued again."""
    out = tmp_path / "signalled"
    job_id = submit(out, program_args(bench), TIME="10")
    wait_until(lambda: last_step(out) >= 30, "step 30")
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
    record = ended(job_id)
    assert (record["JobState"], record["Restarts"]) == ("COMPLETED", "1")
    assert len(stops(assert_finished_as(out, job_id, reference))) == 1

    out = tmp_path / "cancelled"
    job_id = submit(out, program_args(bench), TIME="10")
    at = wait_until(lambda: (s := last_step(out)) >= 30 and s, "step 30")
    subprocess.run(["scancel", job_id], check=True)
    record = ended(job_id)
    assert (record["JobState"], record["Restarts"]) == ("CANCELLED", "0")
    [stopped] = stops(log(out, job_id))
    assert saved_step(out) == stopped >= at and not (out / "result.json").exists()


def rank_process(job_id: str, rank: int) -> int:
    """The pid of the job's training process of `rank` (a child of torchrun, not a DataLoader worker)."""
    for proc in Path("/proc").iterdir():
        try:
            env = dict(v.split("=", 1) for v in (proc / "environ").read_text().split("\0") if "=" in v)
            parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            launcher = Path(f"/proc/{parent}/cmdline").read_text()
        except (OSError, ValueError):
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("RANK") == str(rank) and "torch.distributed.run" in launcher:
            return int(proc.name)
    raise AssertionError(f"no rank {rank} process in job {job_id}")


def test_a_dead_worker_is_relaunched_by_torchrun_within_the_job(bench, reference, tmp_path):
    """--max-restarts=1, a save every 20 steps; rank 1 SIGKILLed after step 30: torchrun stops rank
    0 and relaunches both from the last save; SLURM sees nothing (no requeue); the run ends
    bit-identical, having lost the steps since that save."""
    out = tmp_path / "run"
    job_id = submit(out, program_args(bench, "--save-every", "20"), TIME="10", MAX_RESTARTS="1")
    wait_until(lambda: last_step(out) >= 30, "step 30")
    os.kill(rank_process(job_id, 1), signal.SIGKILL)
    record = ended(job_id)
    assert (record["JobState"], record["Restarts"]) == ("COMPLETED", "0")
    lines = assert_finished_as(out, job_id, reference)
    resumed = [int(m.group(1)) for line in lines if (m := re.search(r"resuming from \S+ at step (\d+)", line))]
    assert len(resumed) == 1 and resumed[0] % 20 == 0 and resumed[0] >= 20
