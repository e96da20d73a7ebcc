"""The labs' Jupyter notebooks: made from each lab's sources, run top to bottom by a real kernel,
handed out without their answers, and graded.

    python labs/notebooks.py                          # re-render the handouts' numbers, re-make every notebook
    python labs/notebooks.py build 5                  # lab 5's notebook only (after its handout changed)
    python labs/notebooks.py student --out DIR        # the students' version: answers and reference cells stripped
    python labs/notebooks.py grade HANDIN.ipynb ...   # the exercise tests on students' notebooks
    python labs/check.py --notebooks [N ...]          # execute notebooks top to bottom (CI: labs 1-3)

A notebook (labs/NN-slug/lab.ipynb) is made from its lab's sources and nothing else: the handout
(README.md: text, equations, the table of expected numbers and the prose's numbers, all rendered
from expected.json by handouts.py), answers.md (an answer to each "predict before you run"
question), reference.py (the exercise, answered; the students' version puts student.py's stubs in
its place) and code cells that call the lab's own test_labNN.py and measure.py through
lab_notebook.py. lab.py is the same notebook in jupytext's percent format, for review; the two are
paired (Jupyter with jupytext keeps them in step) and labs/test_notebooks.py checks that both are
what the sources make. Edit the sources, then run this script; never edit a notebook by hand.

Cell tags: `setup` (finds the project), `exercise` (the functions to write; `reference` too where
they are answered), `grade` (runs the lab's tests on them), `answer` (below each prediction
question), `measure` (measure.py, the bands, the picture).
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
import textwrap
import time
from pathlib import Path

import jupytext
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import handouts  # noqa: E402

PREDICT = "Predict before you run"
YOUR_ANSWER = "**Your prediction:** "
EXECUTED = common.RUNS / "notebooks"  # check.py --notebooks writes the executed notebooks here
SETUP = '''\
# Find the project: Jupyter starts the kernel in this notebook's folder (labs/NN-slug/ of a clone).
import sys
from pathlib import Path

labs = next((p / "labs" for p in (Path.cwd(), *Path.cwd().parents) if (p / "labs" / "common.py").is_file()), None)
assert labs, f"{Path.cwd()} is not inside the project: open this notebook from a clone's labs/ folder"
sys.path.insert(0, str(labs))
import lab_notebook  # noqa: E402

lab = lab_notebook.Lab(%d)'''


# ----------------------------------------------------------------------------- making a notebook

def answers(folder: Path) -> list[str]:
    """The answers of the lab's answers.md, one per prediction question, as Markdown."""
    path = folder / "answers.md"
    if not path.is_file():
        return []
    return [textwrap.dedent(re.sub(r"^\d+\. ", "   ", item)).strip()
            for item in handouts.numbered(handouts.strip_tags(path.read_text()))[1]]


def code_of(path: Path) -> str:
    """A Python file without its module docstring."""
    text = path.read_text()
    body = ast.parse(text).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        text = "\n".join(text.splitlines()[body[0].end_lineno:])
    return text.strip()


def markdown(text: str, *tags: str):
    return new_markdown_cell(text, metadata={"tags": list(tags)} if tags else {})


def code(text: str, *tags: str):
    return new_code_cell(text, metadata={"tags": list(tags)} if tags else {})


def setup_cells(folder: Path) -> list:
    return [code(SETUP % int(folder.name[:2]), "setup")]


def exercise_cells(folder: Path) -> list:
    tests = next(folder.glob("test_lab*.py")).name
    note = (f"*In this notebook:* the next cell holds the functions to write (those of `student.py`); "
            f"the cell after it runs the lab's own tests (`{tests}`) on the functions this notebook "
            "defines, and fails until they are right.")
    return [markdown(note), code(code_of(folder / "reference.py"), "exercise", "reference"),
            code(f"lab.grade(globals())  # {tests} on the functions above", "grade")]


def measure_cells(folder: Path) -> list:
    minutes = handouts.duration(common.read_expected(folder)["minutes"])
    return [code(f"values = lab.measure(seed=0)  # measure.py ({minutes} on 2 cores): its table prints below",
                 "measure"),
            code("lab.compare(values)  # each number beside its band, from expected.json", "measure"),
            code("lab.picture()", "measure")]


def ablation_cells(folder: Path) -> list:
    return [code("# Your cell of the grid (the instructor hands out table, config and seed). Table 4's pool_64 is\n"
                 "# the tables' recipe itself: one pre-training, about 5 min. Hand in the JSON it writes.\n"
                 'mine = lab.ablation(table=4, config="pool_64", seed=0)', "measure")]


def table_cells(folder: Path) -> list:
    return [code("lab.tables()  # the recorded cells' tables, drawn", "measure")]


CODE_AFTER = {"": setup_cells, "Exercise": exercise_cells, "Measure": measure_cells, "Run": measure_cells,
              "Run it as a class": ablation_cells, "Our results": table_cells}


def prediction_cells(text: str, folder: Path) -> list:
    head, questions = handouts.numbered(text)
    given = answers(folder)
    if len(given) != len(questions):
        raise SystemExit(f"{folder}/answers.md: {len(given)} answers for {len(questions)} questions of the handout")
    cells = [markdown(head)]
    for question, answer in zip(questions, given):
        cells += [markdown(question), markdown("**Answer.** " + answer, "answer")]
    return cells


def make(folder: Path):
    """The instructors' notebook of lab `folder`, from its sources."""
    cells = []
    for heading, text in handouts.sections(handouts.strip_tags((folder / "README.md").read_text())):
        cells += prediction_cells(text, folder) if heading == PREDICT else [markdown(text)]
        cells += CODE_AFTER.get(heading, lambda _: [])(folder)
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: the file changes only where its sources did
    return new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
        "jupytext": {"formats": "ipynb,py:percent"},
        "ptunifier_lab": folder.name})


def paired_text(notebook) -> str:
    """lab.py: the notebook in jupytext's percent format."""
    return jupytext.writes(notebook, fmt="py:percent")


def build(folder: Path) -> None:
    """Write lab.ipynb and lab.py of lab `folder` from its sources."""
    notebook = make(folder)
    for path, text in ((folder / "lab.ipynb", nbformat.writes(notebook) + "\n"),
                       (folder / "lab.py", paired_text(notebook))):
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path}")


# ----------------------------------------------------------------------------- the students' version

def student_version(notebook, folder: Path):
    """`notebook` with the answers blanked, the reference cells replaced by student.py's stubs, no
    outputs, and no jupytext pairing (a student's copy stands alone)."""
    notebook = nbformat.from_dict(notebook)
    for cell in notebook.cells:
        tags = cell.metadata.get("tags", [])
        if "reference" in tags:
            cell.source = code_of(folder / "student.py")
            cell.metadata["tags"] = [t for t in tags if t != "reference"]
        if "answer" in tags:
            cell.source = YOUR_ANSWER
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    notebook.metadata.pop("jupytext", None)
    return notebook


def write_students(out: Path, folders: list[Path]) -> None:
    for folder in folders:
        path = out / folder.name / "lab.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(student_version(nbformat.read(folder / "lab.ipynb", as_version=4), folder), path)
        print(f"wrote {path}")


# ----------------------------------------------------------------------------- running notebooks

def run(notebook, folder: Path, label: str) -> tuple[bool, str]:
    """Execute `notebook` in a fresh python3 kernel (this Python) started in `folder`, printing each
    code cell's time; (no cell raised, the error's text). `notebook` keeps its outputs. No time
    limit per cell: a loaded machine runs a lab several times slower than its stated time."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, DeadKernelError
    started = {}

    def before(cell, cell_index, **_):
        started[cell_index] = time.time()

    def after(cell, cell_index, **_):
        first = cell.source.splitlines()[-1][:70] if cell.source else ""
        print(f"  {label} cell {cell_index:2d} {time.time() - started[cell_index]:6.1f} s  {first}", flush=True)

    client = NotebookClient(notebook, timeout=None, kernel_name="python3", on_cell_execute=before,
                            on_cell_executed=after, resources={"metadata": {"path": str(folder)}})
    try:
        client.execute()
    except (CellExecutionError, DeadKernelError) as error:  # a cell raised; the kernel died
        return False, str(error)
    return True, ""


def execute(folder: Path) -> tuple[bool, float]:
    """Run lab `folder`'s notebook top to bottom (check.py --notebooks); the executed copy, with its
    outputs and pictures, goes to runs/labs/notebooks/NN-slug.ipynb. (passed, seconds)"""
    notebook = nbformat.read(folder / "lab.ipynb", as_version=4)
    started = time.time()
    ok, error = run(notebook, folder, folder.name[:2])
    seconds = time.time() - started
    EXECUTED.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, EXECUTED / f"{folder.name}.ipynb")
    if error:
        print(error, file=sys.stderr)
    return ok, seconds


def grade(path: Path) -> tuple[bool, str]:
    """Run the exercise of a handed-in notebook: its setup, exercise and grade cells, in a fresh
    kernel in its lab's folder. (the tests passed, what the grade cell printed or the error)"""
    notebook = nbformat.read(path, as_version=4)
    folder = common.LABS / notebook.metadata.get("ptunifier_lab", "")
    if not (folder / "student.py").is_file():
        raise SystemExit(f"{path}: not the notebook of a lab with an exercise (metadata ptunifier_lab "
                         f"{notebook.metadata.get('ptunifier_lab')!r})")
    notebook.cells = [c for c in notebook.cells if {"setup", "exercise", "grade"} & set(c.metadata.get("tags", []))]
    if not any("grade" in c.metadata["tags"] for c in notebook.cells):
        raise SystemExit(f"{path}: no cell tagged 'grade' (the cell that runs the tests)")
    ok, error = run(notebook, folder, path.stem)
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    return ok, printed + error


# ----------------------------------------------------------------------------- command line

def folders_of(numbers: list[int]) -> list[Path]:
    return [common.lab_folder(n) for n in numbers] if numbers else handouts.lab_folders()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    one = sub.add_parser("build", help="re-make some labs' notebooks from their sources (default: every lab)")
    one.add_argument("labs", type=int, nargs="*")
    out = sub.add_parser("student", help="write the students' version of the notebooks")
    out.add_argument("labs", type=int, nargs="*")
    out.add_argument("--out", type=Path, default=common.RUNS / "student",
                     help="folder for OUT/NN-slug/lab.ipynb (--out labs: in place, on a course branch)")
    mark = sub.add_parser("grade", help="run the exercise tests on handed-in notebooks")
    mark.add_argument("notebooks", type=Path, nargs="+")
    a = p.parse_args(argv)
    if a.command == "student":
        write_students(a.out, [f for f in folders_of(a.labs) if (f / "lab.ipynb").is_file()])
    elif a.command == "grade":
        results = []
        for path in a.notebooks:
            ok, printed = grade(path)
            print(printed)
            results.append(ok)
            print(f"{'PASS' if ok else 'FAIL'} {path}")
        return 0 if all(results) else 1
    else:
        if a.command is None:
            handouts.update()
        for folder in folders_of(getattr(a, "labs", [])):
            build(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
