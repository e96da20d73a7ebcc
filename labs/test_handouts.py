"""Every measuring lab has a handout whose table of expected numbers is the one its expected.json
holds, and a measure.py that states a floor for each number it records; the ablation lab's handout
shows the tables that `ablate.py collect` rebuilds from its committed results."""
import contextlib
import io

import pytest

import ablate
import check
import common

FOLDERS = sorted(f for f in common.LABS.glob("[0-9][0-9]-*") if (f / "measure.py").is_file())
ABLATIONS = common.LABS / "08-ablations"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_handout_quotes_expected_json(folder):
    handout = (folder / "README.md").read_text()
    assert (folder / "expected.json").is_file(), f"{folder.name}: record it with check.py --record"
    block = handout.split(check.BEGIN, 1)[1].split(check.END, 1)[0].strip()
    assert block == check.expected_table(folder)
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
