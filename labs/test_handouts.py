"""Every measuring lab has a handout whose table of expected numbers is the one its expected.json
holds, and a measure.py that states a floor for each number it records; the ablation lab's handout
shows the tables that `ablate.py collect` rebuilds from its committed results; every number in
the prose that carries its expression (handouts.py) is what that expression computes, and the
prose that reports results quotes no other."""
import contextlib
import io
import re

import pytest

import ablate
import common
import handouts

FOLDERS = sorted(f for f in common.LABS.glob("[0-9][0-9]-*") if (f / "measure.py").is_file())
ABLATIONS = common.LABS / "08-ablations"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_handout_quotes_expected_json(folder):
    handout = (folder / "README.md").read_text()
    assert (folder / "expected.json").is_file(), f"{folder.name}: record it with check.py --record"
    block = handout.split(handouts.BEGIN, 1)[1].split(handouts.END, 1)[0].strip()
    assert block == handouts.expected_table(folder)
    measure = common.load_module(folder / "measure.py", f"{folder.name.replace('-', '_')}_measure_h")
    assert set(common.read_expected(folder)["numbers"]) == set(measure.FLOORS)


def test_there_are_at_least_seven_measuring_labs_and_the_ablations():
    assert len(FOLDERS) >= 7 and (ABLATIONS / "README.md").is_file()


def test_ablation_handout_shows_the_collected_results(tmp_path):
    results = ABLATIONS / "results"
    with contextlib.redirect_stdout(io.StringIO()):
        summary = ablate.collect_into(results, tmp_path)
    assert summary and all(set(rows) <= set(ablate.CELLS[t]) for t, rows in summary.items())
    block = (ABLATIONS / "README.md").read_text().split(ablate.BEGIN, 1)[1].split(ablate.END, 1)[0].strip()
    assert block == "\n\n".join(ablate.markdown(t, summary[t]) for t in sorted(summary))


# ----------------------------------------------------------------------------- numbers in the prose

@pytest.mark.parametrize("path", handouts.files(), ids=lambda p: str(p.relative_to(common.LABS)))
def test_every_tagged_number_is_what_its_expression_computes(path):
    assert path.read_text() == handouts.rendered(path), f"{path} is stale: python labs/notebooks.py re-renders it"


def test_a_stale_number_is_rendered_afresh():
    folder = common.lab_folder(1)
    entry = common.read_expected(folder)["numbers"]["rows_with_gradient_ours"]
    stale = "about 25<!--= rows_with_gradient_ours.mean:.0f --> of (-1<!--= tiny.k_textual:d -->) `2<!--= x -->`"
    assert handouts.render_numbers(stale, handouts.names(folder)) == (
        f"about {entry['mean']:.0f}<!--= rows_with_gradient_ours.mean:.0f --> of (16<!--= tiny.k_textual:d -->) "
        "`2<!--= x -->`")  # the tiny preset's k_textual; code spans are left alone


REPORTING = ("What to look for", "Our results", "Verdicts")
MEASURED = re.compile(r"(?<![\w.])\d+(?:\.\d+|(?:\.\d+)?%)(?!\d)")  # a decimal or a percentage


def reporting_prose(path) -> str:
    """The parts of a file that report results (a handout's sections REPORTING, a whole answer
    sheet), without code, tables, tagged numbers and numbers that cite their source."""
    text = path.read_text()
    if path.name == "README.md":
        text = "\n".join(body for heading, body in handouts.sections(text) if heading.startswith(REPORTING))
    text = re.sub(r"<!-- (\S+): begin -->.*?<!-- \1: end -->", "", text, flags=re.S)
    text = handouts.TAGGED.sub("", text)
    text = re.sub(r"\S+<!--source:.*?-->", "", text)
    return "\n".join(line for line in text.splitlines() if not line.startswith("|"))


@pytest.mark.parametrize("path", [p for p in handouts.files() if p.parent != common.LABS],
                         ids=lambda p: str(p.relative_to(common.LABS)))
def test_results_prose_quotes_no_number_without_its_source(path):
    """Where a handout reports results (and in its answers), every decimal and percentage is a
    tagged number or names its source (<!--source: ...-->), so that no stale one survives a
    re-recording."""
    conditions = {"1%", "10%", "100%"}  # the share of the labels a fine-tuning gets (labs 6 and 8)
    assert [n for n in MEASURED.findall(reporting_prose(path)) if n not in conditions] == []
