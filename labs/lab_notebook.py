"""What a lab's notebook (labs/NN-slug/lab.ipynb) calls, inside its Jupyter kernel.

    lab = lab_notebook.Lab(1)
    lab.grade(globals())        # the lab's own tests (test_lab01.py) on the functions the notebook defines
    values = lab.measure()      # the lab's own measure.py: its table, its picture
    lab.compare(values)         # each number beside the band of expected.json; an error if one leaves it
    lab.picture()               # the picture, inline

The notebooks themselves are generated from the handouts by labs/notebooks.py.
"""
from __future__ import annotations

import ast
import json
import os
import sys
import types
from pathlib import Path

import check
import common


class Lab:
    """One lab's folder, seen from its notebook."""

    def __init__(self, number: int):
        self.folder = common.lab_folder(number)
        self.seed = 0

    # ------------------------------------------------------------------------- the exercise

    def grade(self, namespace: dict) -> None:
        """Run the lab's tests on the functions of student.py as `namespace` (the notebook's
        globals()) defines them; raise if one fails. The same tests as
        `LABS_IMPL=student python -m pytest labs/NN-slug`, with LABS_IMPL=notebook."""
        import pytest
        wanted = [node.name for node in ast.parse((self.folder / "student.py").read_text()).body
                  if isinstance(node, ast.FunctionDef)]
        missing = [name for name in wanted if name not in namespace]
        if missing:
            raise NameError(f"{', '.join(missing)} not defined: run the exercise cell above first")
        name = f"{self.folder.name.replace('-', '_')}_notebook"
        module = types.ModuleType(name, f"the exercise of {self.folder.name} as its notebook defines it")
        module.__dict__.update({n: namespace[n] for n in wanted})
        sys.modules[name] = module
        test_file = next(self.folder.glob("test_lab*.py"))
        previous = os.environ.get("LABS_IMPL")
        os.environ["LABS_IMPL"] = "notebook"
        forget(test_file)  # pytest imports it afresh, so that it reads this module
        try:
            code = pytest.main(["-q", "-p", "no:cacheprovider", str(test_file)])
        finally:
            forget(test_file)
            del sys.modules[name]
            if previous is None:
                os.environ.pop("LABS_IMPL")
            else:
                os.environ["LABS_IMPL"] = previous
        if code != 0:
            raise AssertionError(f"{test_file.name} failed on the functions above (pytest exit code {int(code)})")

    # ------------------------------------------------------------------------- the measurement

    def measure(self, seed: int = 0, reuse: bool = False) -> dict[str, float]:
        """The lab's measure.py, as `python labs/check.py N --seed SEED` runs it: prints its table,
        writes its picture into runs/labs/NN-slug/seedSEED, returns its numbers. `reuse`: keep a
        finished default pre-training (check.py --reuse)."""
        common.REUSE_PRETRAINING = reuse
        self.seed = seed
        return check.measure(self.folder, seed)[0]

    def compare(self, values: dict[str, float]):
        """Each measured number beside its recorded mean and band (expected.json), as a table;
        raises AssertionError when one lies outside its band."""
        from IPython.display import Markdown, display
        expected = common.read_expected(self.folder)
        rows = check.compare(expected, values)
        lines = ["| number | measured | recorded mean | band | |", "|---|---|---|---|---|"]
        lines += [f"| `{name}` | {common.fmt(value)} | {common.fmt(expected['numbers'][name]['mean'])} | "
                  f"[{common.fmt(lo)}, {common.fmt(hi)}] | {'in band' if good else '**OUT OF BAND**'} |"
                  for name, value, (lo, hi), good in rows]
        display(Markdown("\n".join(lines)))
        outside = [name for name, *_, good in rows if not good]
        if outside:
            raise AssertionError(f"{', '.join(outside)}: outside the band recorded in {self.folder.name}/expected.json")

    def picture(self):
        """The picture measure.py wrote for the last measured seed, to show inline."""
        from IPython.display import Image
        module = common.load_module(self.folder / "measure.py", f"{self.folder.name.replace('-', '_')}_measure")
        return Image(filename=str(common.RUNS / self.folder.name / f"seed{self.seed}" / module.PICTURE))

    # ------------------------------------------------------------------------- the ablation lab

    def ablation(self, table: int, config: str, seed: int) -> dict:
        """(Lab 8) Run one cell of the grid (`ablate.py run`) into runs/ablations and show its
        numbers beside the recorded cell's mean and standard deviation over seeds."""
        import ablate
        from IPython.display import Markdown, display
        out = common.ROOT / "runs" / "ablations"
        out.mkdir(parents=True, exist_ok=True)
        metrics = json.loads(ablate.run_cell(ablate.Cell(table, config, seed, out)).read_text())["metrics"]
        recorded = ablate.summarise(self.folder / "results").get(table, {}).get(config)
        lines = ["| column | your cell | recorded mean +- std |", "|---|---|---|"]
        for column in ablate.COLUMNS[table]:
            mean, std = recorded[column] if recorded else (float("nan"), float("nan"))
            lines.append(f"| `{column}` | {common.fmt(metrics[column])} | {common.fmt(mean)} +- {common.fmt(std)} |")
        display(Markdown("\n".join(lines)))
        return metrics

    def tables(self, folder: Path | None = None):
        """(Lab 8) The tables of a folder of cells (the recorded ones by default) and their pictures."""
        import ablate
        from IPython.display import Image, display
        pictures = common.RUNS / self.folder.name
        pictures.mkdir(parents=True, exist_ok=True)
        summary = ablate.collect_into(folder or self.folder / "results", pictures)
        for table in summary:
            display(Image(filename=str(pictures / f"table{table}.png")))


def forget(path: Path) -> None:
    """Drop every imported module loaded from `path`."""
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) == str(path):
            del sys.modules[name]
