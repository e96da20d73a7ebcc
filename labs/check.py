"""Re-measure a lab's numbers and check them against the bands of its expected.json.

    python labs/check.py 1                      # one line per number: PASS name value [lo, hi]
    python labs/check.py 4 --seed 1             # another of the recorded seeds
    python labs/check.py 4 --reuse              # keep the default run that runs/labs already holds
    python labs/check.py 2 --record --seeds 0 1 2   # (maintainers) measure every seed, write expected.json,
                                                    # re-render the handout's numbers and the notebook
    python labs/check.py --notebooks            # every lab's notebook, top to bottom, in a Jupyter kernel
    python labs/check.py --notebooks 1 2 3      # some of them (CI)

Exit status 0 only when every number lies in its band (a notebook: when no cell raised). A band is the mean over the recorded seeds
+- max(3 standard deviations, the floor that the lab's measure.py states for that number).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import handouts  # noqa: E402


def measure(folder: Path, seed: int) -> dict[str, float]:
    module = common.load_module(folder / "measure.py", f"{folder.name.replace('-', '_')}_measure")
    out = common.RUNS / folder.name / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    values = module.run(seed, out)
    print(f"[{folder.name}, seed {seed}: {time.time() - started:.0f} s; picture {out / module.PICTURE}]")
    return values, module.FLOORS, time.time() - started


def check(folder: Path, seed: int) -> bool:
    expected = common.read_expected(folder)
    if not expected:
        raise SystemExit(f"{folder}/expected.json is missing: record it with --record")
    print(f"lab {folder.name}: {handouts.duration(expected['minutes'])} on a 2-core CPU "
          f"(measured {expected['environment']['date']}); started {time.strftime('%H:%M:%S')}, "
          f"done around {time.strftime('%H:%M', time.localtime(time.time() + 60 * expected['minutes']))}",
          flush=True)
    values, _, _ = measure(folder, seed)
    rows = compare(expected, values)
    for name, value, (lo, hi), good in rows:
        print(f"{'PASS' if good else 'FAIL'} {name} {common.fmt(value)} [{common.fmt(lo)}, {common.fmt(hi)}]")
    return all(good for *_, good in rows)


def compare(expected: dict, values: dict[str, float]) -> list[tuple[str, float, tuple[float, float], bool]]:
    """(name, measured value, band, whether it lies in the band) for every number of expected.json."""
    return [(name, values[name], tuple(e["band"]), e["band"][0] <= values[name] <= e["band"][1])
            for name, e in expected["numbers"].items()]


def record(folder: Path, seeds: list[int]) -> None:
    runs, floors, seconds = [], None, []
    for seed in seeds:
        values, floors, took = measure(folder, seed)
        runs.append(values)
        seconds.append(took)
    numbers = {name: common.expected_entry([r[name] for r in runs], seeds, floors[name]) for name in floors}
    expected = {"lab": folder.name, "environment": common.environment(),
                "minutes": max(seconds) / 60, "seconds_per_seed": seconds, "numbers": numbers}
    (folder / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {folder / 'expected.json'}")


def run_notebooks(folders: list[Path]) -> bool:
    """Execute each lab's notebook top to bottom in a Jupyter kernel; PASS when no cell raised (its
    numbers in their bands, its exercise tests passed)."""
    import notebooks
    results = []
    for folder in folders:
        expected = common.read_expected(folder)
        stated = f"{handouts.duration(expected['minutes'])} per seed on a 2-core CPU; " if expected else ""
        print(f"notebook {folder.name}/lab.ipynb: {stated}started {time.strftime('%H:%M:%S')}", flush=True)
        ok, seconds = notebooks.execute(folder)
        results.append(ok)
        print(f"{'PASS' if ok else 'FAIL'} {folder.name}/lab.ipynb in {seconds:.0f} s "
              f"(executed copy: {notebooks.EXECUTED / folder.name}.ipynb)", flush=True)
    return all(results)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lab", type=int, nargs="*", help="lab number, e.g. 1 (with --notebooks: none or several)")
    p.add_argument("--seed", type=int, default=0, help="the seed to re-measure (one of the recorded ones)")
    p.add_argument("--record", action="store_true", help="measure --seeds and write expected.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--reuse", action="store_true",
                   help="keep a finished default pre-training in runs/labs/pretrain-seedS instead of re-running it")
    p.add_argument("--notebooks", action="store_true",
                   help="execute the labs' notebooks (labs/NN-slug/lab.ipynb, seed 0) top to bottom in a "
                        "Jupyter kernel: every lab's in order, or the labs given")
    a = p.parse_args(argv)
    if a.notebooks:
        return 0 if run_notebooks([common.lab_folder(n) for n in a.lab] or handouts.lab_folders()) else 1
    if len(a.lab) != 1:
        p.error("give one lab number (several, or none, only with --notebooks)")
    common.REUSE_PRETRAINING = a.reuse
    folder = common.lab_folder(a.lab[0])
    if a.record:
        import notebooks
        record(folder, a.seeds)
        handouts.update(folder)
        notebooks.build(folder)
        return 0
    return 0 if check(folder, a.seed) else 1


if __name__ == "__main__":
    sys.exit(main())
