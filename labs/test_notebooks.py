"""The labs' notebooks: each is what its lab's sources make, its paired plain-text file (lab.py)
holds the same cells, it carries the whole handout and an answer under every question, and the
students' version keeps no answer and fails its grading cell until the exercise is answered.

(check.py --notebooks executes whole notebooks against their bands; CI runs it on labs 1-3.)
"""
import jupytext
import nbformat
import pytest

import common
import handouts
import notebooks

FOLDERS = handouts.lab_folders()
EXERCISES = [f for f in FOLDERS if (f / "student.py").is_file()]


def cells(notebook) -> list[tuple[str, str, list]]:
    return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in notebook.cells]


def tagged(notebook, tag: str) -> list:
    return [c for c in notebook.cells if tag in c.metadata.get("tags", [])]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_the_notebook_is_what_its_sources_make(folder):
    made = notebooks.make(folder)
    hint = f"{folder.name}: re-make it with `python labs/notebooks.py build {int(folder.name[:2])}`"
    assert (folder / "lab.ipynb").read_text() == nbformat.writes(made) + "\n", hint
    assert (folder / "lab.py").read_text() == notebooks.paired_text(made), hint


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_the_paired_text_file_holds_the_notebooks_cells(folder):
    text = jupytext.read(folder / "lab.py")
    notebook = nbformat.read(folder / "lab.ipynb", as_version=4)
    assert cells(text) == cells(notebook)
    assert notebook.metadata["jupytext"]["formats"] == "ipynb,py:percent"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_the_notebook_carries_the_handout_and_the_lab_code(folder):
    notebook = nbformat.read(folder / "lab.ipynb", as_version=4)
    shown = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown").splitlines()
    handout = [line for line in handouts.strip_tags((folder / "README.md").read_text()).splitlines() if line.strip()]
    position = 0
    for line in handout:  # every line of the handout, in order
        position = shown.index(line, position) + 1
    questions = handouts.numbered(dict(handouts.sections((folder / "README.md").read_text()))[notebooks.PREDICT])[1]
    answers = tagged(notebook, "answer")
    assert len(answers) == len(questions) and all(a.source.startswith("**Answer.** ") for a in answers)
    code = [c.source for c in notebook.cells if c.cell_type == "code"]
    assert f"lab_notebook.Lab({int(folder.name[:2])})" in code[0]
    if (folder / "measure.py").is_file():
        assert [c.source.split("(")[0] for c in tagged(notebook, "measure")] == [
            "values = lab.measure", "lab.compare", "lab.picture"]
    if folder in EXERCISES:
        assert [c.source for c in tagged(notebook, "reference")] == [notebooks.code_of(folder / "reference.py")]
        assert tagged(notebook, "grade")[0].source.startswith("lab.grade(globals())")


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_the_students_version_keeps_no_answer(folder):
    notebook = notebooks.student_version(nbformat.read(folder / "lab.ipynb", as_version=4), folder)
    text = "\n".join(c.source for c in notebook.cells)
    assert all(a.source == notebooks.YOUR_ANSWER for a in tagged(notebook, "answer"))
    assert not any(answer in text for answer in notebooks.answers(folder))
    assert tagged(notebook, "reference") == [] and "jupytext" not in notebook.metadata
    if folder in EXERCISES:
        assert [c.source for c in tagged(notebook, "exercise")] == [notebooks.code_of(folder / "student.py")]


@pytest.mark.parametrize("folder", EXERCISES, ids=lambda f: f.name)
def test_the_students_exercise_fails_its_tests_until_answered(folder, tmp_path):
    """`notebooks.py grade` on the students' version, in a real kernel: the stubs fail the lab's
    tests (NotImplementedError); the same notebook with the exercise answered passes them."""
    path = tmp_path / "lab.ipynb"
    notebook = notebooks.student_version(nbformat.read(folder / "lab.ipynb", as_version=4), folder)
    nbformat.write(notebook, path)
    passed, printed = notebooks.grade(path)
    assert not passed and "NotImplementedError" in printed and "failed" in printed
    tagged(notebook, "exercise")[0].source = (folder / "reference.py").read_text()  # a student's answer
    nbformat.write(notebook, path)
    passed, printed = notebooks.grade(path)
    assert passed, printed
    assert " passed" in printed and "failed" not in printed


def test_grading_refuses_a_notebook_of_no_exercise(tmp_path):
    path = tmp_path / "lab.ipynb"
    nbformat.write(nbformat.read(common.lab_folder(4) / "lab.ipynb", as_version=4), path)
    with pytest.raises(SystemExit, match="not the notebook of a lab with an exercise"):
        notebooks.grade(path)
