"""What the labs share: the project on the path, where runs go, the exercise switch, the
pre-trained checkpoints, bands, tables and pictures.

A lab folder NN-slug/ holds README.md (the handout), expected.json (every number the handout
quotes, with its seeds and band), measure.py (`run(seed, out)` re-measures those numbers, writes
the lab's picture and prints its table) and, where the lab has an exercise, student.py (stubs),
reference.py (the same functions, answered with the project's code) and test_labNN.py.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
LABS = ROOT / "labs"
RUNS = ROOT / "runs" / "labs"
REUSE_PRETRAINING = False  # check.py --reuse: a lab that re-runs the default pre-training keeps a finished one


def lab_folder(number: int | str) -> Path:
    """labs/NN-slug for lab NN."""
    found = sorted(LABS.glob(f"{int(number):02d}-*"))
    if not found:
        raise SystemExit(f"no lab {number}: expected a folder labs/{int(number):02d}-...")
    return found[0]


def load_module(path: Path, name: str):
    """Import the file `path` under a unique module name (lab files share base names)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exercise(test_file: str):
    """The module a lab's tests check: reference.py, student.py when LABS_IMPL=student, or the
    functions a lab's notebook defines when LABS_IMPL=notebook (lab_notebook.Lab.grade registers
    them as the module `NN_slug_notebook` before it runs the tests)."""
    which = os.environ.get("LABS_IMPL", "reference")
    if which not in ("reference", "student", "notebook"):
        raise SystemExit(f"LABS_IMPL={which!r}: expected 'reference', 'student' or 'notebook'")
    folder = Path(test_file).resolve().parent
    name = f"{folder.name.replace('-', '_')}_{which}"
    if which == "notebook":
        if name not in sys.modules:
            raise SystemExit(f"LABS_IMPL=notebook: no module {name}; grade from the lab's notebook (lab.grade)")
        return sys.modules[name]
    return load_module(folder / f"{which}.py", name)


# ----------------------------------------------------------------------------- pre-training

def pretrained(seed: int = 0, rerun: bool = False) -> Path:
    """The checkpoint of the default run (`python train.py --seed SEED`), kept in
    runs/labs/pretrain-seedSEED; trained when it is missing, or when `rerun` is asked and
    REUSE_PRETRAINING is not set (about 5 minutes on 2 cores)."""
    out = RUNS / f"pretrain-seed{seed}"
    if (rerun and not REUSE_PRETRAINING) or not (out / "result.json").is_file():
        if out.exists():
            shutil.rmtree(out)
        print(f"pre-training {out} (the default run, seed {seed}; about 5 minutes) ...", flush=True)
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--seed", str(seed), "--out", str(out)],
                       cwd=ROOT, check=True)
    return out / "checkpoint.safetensors"


def run_log(folder: Path) -> list[dict]:
    """The rows of a pre-training run's metrics.jsonl (train.py --out FOLDER)."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def final_losses(rows: list[dict], steps: int = 50) -> dict[str, float]:
    """The mean MLM, ITM and ITC losses over the last `steps` steps of a run's log rows."""
    last = rows[-1]["step"]
    return {k: statistics.fmean(r[k] for r in rows if r["step"] > last - steps and k in r)
            for k in ("mlm", "itm", "itc")}


# ----------------------------------------------------------------------------- numbers

def band(values: list[float], floor: float) -> tuple[float, float]:
    """mean +- max(3 standard deviations, floor) of values measured over seeds."""
    mean = statistics.fmean(values)
    half = max(3 * statistics.stdev(values) if len(values) > 1 else 0.0, floor)
    return mean - half, mean + half


def expected_entry(values: list[float], seeds: list[int], floor: float) -> dict:
    lo, hi = band(values, floor)
    return {"seeds": seeds, "values": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "floor": floor, "band": [lo, hi]}


def environment() -> dict:
    import torch
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}


def read_expected(folder: Path) -> dict:
    path = folder / "expected.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.3e}"


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain-text table (one row per dict), the lab's table."""
    cells = [[c for c in columns]] + [[fmt(r[c]) if isinstance(r[c], float) else str(r[c]) for c in columns]
                                      for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for i, row in enumerate(cells):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def pyplot():
    """matplotlib's pyplot without a screen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    """Lay the figure out, write it as a PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)

