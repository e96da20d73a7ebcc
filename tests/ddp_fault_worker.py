"""Worker that tests/test_faults.py runs under torchrun (2 gloo processes), one launch per phase
(a fresh launch each time: re-creating a gloo group inside one torchrun launch can hang):

  1. straight: the run for N steps, uninterrupted;
  2. split:    the same run, where rank 1 waits at step K until the test sends SIGTERM to its pid
               only (rank 0 gets no signal), so it must learn of the stop from the all-reduced flag;
  3. resume:   `--resume` of the split run to N steps.

Each rank writes what train.train returned to OUT/rank<r>_<phase>.json, and rank 1 writes its pid
to OUT/rank1.pid when it is waiting for the signal.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_fault_worker.py \
        PHASE DATA TOKENIZER OUT N K
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

ORIGINAL_SEED_STEP = train.seed_step


def wait_for_sigterm_at(pause_step: int, pid_file: Path):
    """A train.seed_step that makes rank 1 wait at `pause_step` until its StopSignal fired."""
    def seed_step(seed, rank, step):
        if rank == 1 and step == pause_step:
            stop = signal.getsignal(signal.SIGTERM).__self__  # the run's StopSignal handler
            pid_file.write_text(str(os.getpid()))
            deadline = time.time() + 120
            while stop.received is None:
                if time.time() > deadline:
                    raise SystemExit("rank 1: no SIGTERM arrived within 120 s")
                time.sleep(0.05)
        ORIGINAL_SEED_STEP(seed, rank, step)
    return seed_step


def run(phase: str, args: list[str], out: Path) -> None:
    result = train.train(train.parse_args(args))
    rank = os.environ["RANK"]
    (out / f"rank{rank}_{phase}.json").write_text(json.dumps({"step": result["step"],
                                                               "stopped": result.get("stopped", False)}))


def main(phase: str, data: str, tokenizer: str, out: str, n: str, k: str) -> None:
    out = Path(out)

    def args(folder, *extra):
        return ["--data", data, "--tokenizer", tokenizer, "--out", str(out / folder), "--batch-size", "8",
                "--workers", "0", "--log-every", "1", "--save-every", "1000", "--steps", n, *extra]

    if phase == "straight":
        run("straight", args("straight"), out)
    elif phase == "split":
        train.seed_step = wait_for_sigterm_at(int(k), out / "rank1.pid")
        run("split", args("split"), out)
    else:
        run("resume", args("split", "--resume"), out)


if __name__ == "__main__":
    main(*sys.argv[1:])
