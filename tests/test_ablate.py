"""labs/ablate.py end to end on a miniature benchmark: one Table-3 cell (pre-training with MLM
alone, then every fine-tune of its columns), Table-4 cells from their pre-training runs, and
`collect` rebuilding the tables from the JSON files."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

import synth

LABS = Path(__file__).resolve().parents[1] / "labs"
SHORT = ("--steps", "4", "--batch-size", "8", "--log-every", "1")


def load_ablate():
    spec = importlib.util.spec_from_file_location("labs_ablate", LABS / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    synth.main(["--out", str(root), "--train", "40", "--val", "8", "--test", "12", "--image-size", "64",
                "--vocab-size", "600", "--workers", "1"])
    return root


def test_a_table3_cell_writes_every_column(mini, tmp_path):
    ablate = load_ablate()
    path = ablate.run_cell(ablate.Cell(3, "mlm", 0, tmp_path, data=mini, train_flags=SHORT, epochs=1))
    entry = json.loads(path.read_text())
    assert (entry["table"], entry["config"], entry["seed"]) == (3, "mlm", 0)
    assert entry["flags"] == list(ablate.CELLS[3]["mlm"])
    assert set(entry["metrics"]) == set(ablate.COLUMNS[3])
    assert all(0 <= v <= 1 or (k == "itg_cider" and v >= 0) for k, v in entry["metrics"].items())
    # MLM alone: the pre-training log has MLM losses and neither ITM nor ITC (their passes never ran)
    rows = [json.loads(line) for line in (tmp_path / "pretrain-t3-mlm-seed0" / "metrics.jsonl").open()]
    assert rows and all("mlm" in r and "itm" not in r and "itc" not in r for r in rows)
    # 1% of the 40 training cases is one case; the fine-tune says how many it trained on
    ic1 = json.loads((tmp_path / "table3-mlm-seed0" / "ic_1pct" / "results.json").read_text())
    assert ic1["train_examples"] == 1


def test_table4_cells_and_collect(mini, tmp_path):
    ablate = load_ablate()
    for config, seed in (("no_pool", 0), ("no_pool", 1), ("pool_16", 0)):
        ablate.run_cell(ablate.Cell(4, config, seed, tmp_path, data=mini, train_flags=SHORT))
    no_pool = json.loads((tmp_path / "table4-no_pool-seed0.json").read_text())["metrics"]
    pool_16 = json.loads((tmp_path / "table4-pool_16-seed0.json").read_text())["metrics"]
    assert no_pool["pool_params"] == 0
    assert pool_16["pool_params"] == 2 * 16 * 128  # a visual and a textual pool of 16 x width 128
    summary = ablate.collect(tmp_path)
    runs = [json.loads((tmp_path / f"table4-no_pool-seed{s}.json").read_text())["metrics"] for s in (0, 1)]
    mean = summary[4]["no_pool"]["mlm_final"]
    assert mean[0] == pytest.approx((runs[0]["mlm_final"] + runs[1]["mlm_final"]) / 2)
    assert summary[4]["no_pool"]["seeds"] == [0, 1] and summary[4]["pool_16"]["mlm_final"][1] == 0.0
    assert not math.isnan(mean[1]) and (tmp_path / "table4.png").stat().st_size > 0
    text = ablate.markdown(4, summary[4])
    assert f"| no_pool | 0,1 | 0 | {mean[0]:.2f} +- {mean[1]:.2f} |" in text
    assert "| pool_16 | 0 | 4096 |" in text
