"""A worker that the cluster tests run under torchrun: train.py or finetune.py, with one fault
injected on one rank, chosen by the environment (a hook of the tests; the programs read none of it):

    FAULT=kill:R:K   rank R sends itself SIGKILL as step K begins (K steps done), in the first
                     round of workers only (a relaunched round has TORCHELASTIC_RESTART_COUNT > 0)
    FAULT=term:R:K   rank R sends itself SIGTERM as step K begins (no other rank gets a signal)
    FAULT=termjob:R:K  rank R sends SIGTERM as step K begins to torchrun and every process below it
                     (the ranks and their DataLoader workers), as SLURM signals a job step
    FAULT=nan:R:K    train.py: the loss of rank R is NaN in step K
    RESULTS=DIR      each rank writes what the program returned to DIR/rank<R>-round<C>.json

In a relaunched round, rank 0 starts to join the process group a second after rank 1 did: rank 1
then looks for rank 0's address while the store still holds the one rank 0 had in the failed round
(what runtime.launch_store guards against).

    python -m torch.distributed.run --standalone --nproc_per_node=2 --max-restarts=1 \
        tests/ddp_fault_worker.py train|finetune ARGS...
"""
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


KILL_ALL = ("import contextlib, os, signal, sys\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's shutdown signals its workers' groups\n"
            "for pid in sys.argv[1:]:\n"
            "    with contextlib.suppress(ProcessLookupError):  # ended meanwhile\n"
            "        os.kill(int(pid), signal.SIGTERM)\n")


def job_processes() -> list[int]:
    """torchrun (this worker's parent) and every process below it, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()  # "pid (name) state ppid ..."; the name may hold spaces
        except OSError:  # the process ended meanwhile
            continue
        parents[int(stat.parent.name)] = int(text.rsplit(")", 1)[1].split()[1])
    job, grown = {os.getppid()}, True
    while grown:
        below = {pid for pid, parent in parents.items() if parent in job} - job
        job, grown = job | below, bool(below)
    return sorted(job)


def inject(program, kind: str, at: int) -> None:
    """Patch the program's seed_step (called as each step begins) to inject the fault at step `at`."""
    original, current = program.seed_step, {}

    def seed_step(seed, rank, step):
        current["step"] = step
        if step == at and kind in ("kill", "term"):
            os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGTERM)
        if step == at and kind == "termjob":
            # from a process of its own, as slurmstepd sends it (a DataLoader worker obeys its main process)
            subprocess.run([sys.executable, "-c", KILL_ALL, *map(str, job_processes())], check=True)
        original(seed, rank, step)

    program.seed_step = seed_step
    if kind == "nan":  # the weighted sum of the step's losses (Eq. 1), where the step module reads it
        step_module = sys.modules[program.PretrainStep.__module__]
        total_loss = step_module.total_loss
        step_module.total_loss = lambda *a: total_loss(*a) * (float("nan") if current["step"] == at else 1.0)


def main(name: str, args: list[str]) -> None:
    program = importlib.import_module(name)
    rank, round_ = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    results = Path(os.environ["RESULTS"])
    if os.environ.get("FAULT"):
        kind, fault_rank, at = os.environ["FAULT"].split(":")
        if rank == int(fault_rank) and not (kind == "kill" and round_ > 0):
            inject(program, kind, int(at))
    if round_ > 0:  # rank 1 joins first, rank 0 a second later
        joining = results / f"rank1-round{round_}.joining"
        if rank == 1:
            joining.touch()
        else:
            deadline = time.time() + 120
            while not joining.exists() and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
    result = getattr(program, name)(program.parse_args(args))  # train.train / finetune.finetune
    (results / f"rank{rank}-round{round_}.json").write_text(json.dumps(
        dict(stopped=result.get("stopped", False), step=result.get("step"))))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
