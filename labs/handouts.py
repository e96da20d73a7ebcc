"""The handouts' numbers, rendered from what was measured: each lab's table of expected numbers
(from its expected.json) and every measured number in the prose, which carries the expression
that computes it.

A number in a lab's handout (its README.md), its answer sheet (answers.md) or labs/README.md is
written in front of an HTML comment that says where it comes from (Markdown viewers hide it):

    about 37<!--= rows_with_gradient_ours.mean:.0f --> of the 64 rows

`render_numbers` recomputes each such number from the expression before the last colon, in the
format after it, and writes it in front of its comment. An expression may name (`names`): every
number of the lab's expected.json (with .mean, .std, .band, .values, .seeds), `minutes` (its time
per seed), `measure` (its measure.py: STEPS, ...), `tiny` and `recipe` (the tiny preset's model
config and recipe); in the ablation lab, `t3` / `t4` (its collected tables: t3.mlm_itm.ic_1pct.mean,
.std) and `ablate`; in labs/README.md, `lab1` ... `lab8` holding each lab's names; and log, min,
max, abs, sum, len, zip, round, getattr. `python labs/notebooks.py` (or `check.py --record`)
rewrites the files; labs/test_handouts.py fails while a file differs from its rendering. A number
measured elsewhere (a benchmark's baseline) names its source instead, `13.7<!--source: docs/NOTES.md
section 2 -->`: the test for the prose that reports results accepts no third kind of decimal or
percentage.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import common

BEGIN, END = "<!-- expected.json: begin -->", "<!-- expected.json: end -->"
# a number (1,148 / 0.23 / 2e-16 / 23%) directly in front of its <!--= expression:format --> comment,
# outside `code` (a minus sign only after a space or a parenthesis: 3.82-3.84 is a range)
TAGGED = re.compile(r"`[^`\n]*`|(?<![\w.])((?:(?<![^\s(])-)?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?%?)<!--=(.+?)-->")
FUNCTIONS = {"log": math.log, "min": min, "max": max, "abs": abs, "sum": sum, "len": len, "zip": zip,
             "round": round, "getattr": getattr}


def duration(minutes: float) -> str:
    return f"about {minutes * 60:.0f} s" if minutes < 1 else f"about {minutes:.1f} min"


def expected_table(folder: Path) -> str:
    """The handout's table of expected numbers, rendered from expected.json."""
    expected = common.read_expected(folder)
    env = expected["environment"]
    lines = [f"Measured {env['date']} with torch {env['torch']}, {env['threads']} thread(s), seeds "
             f"{', '.join(map(str, next(iter(expected['numbers'].values()))['seeds']))}; "
             f"{duration(expected['minutes'])} per seed. `python labs/check.py {int(folder.name[:2])}` passes "
             "when every number lies in its band (mean +- max(3 std, floor)).", "",
             "| number | mean | std | band |", "|---|---|---|---|"]
    for name, e in expected["numbers"].items():
        lines.append(f"| `{name}` | {common.fmt(e['mean'])} | {common.fmt(e['std'])} | "
                     f"[{common.fmt(e['band'][0])}, {common.fmt(e['band'][1])}] |")
    return "\n".join(lines)


def names(folder: Path) -> dict:
    """What the tagged numbers of lab `folder`'s files may name (see the top of this file)."""
    from recipes import RECIPES
    found = dict(FUNCTIONS, recipe=RECIPES["tiny"], tiny=RECIPES["tiny"].model)
    expected = common.read_expected(folder)
    if (folder / "measure.py").is_file():
        found["measure"] = common.load_module(folder / "measure.py", f"{folder.name.replace('-', '_')}_measure_names")
    if expected:
        found["minutes"] = expected["minutes"]
        found.update({name: SimpleNamespace(**entry) for name, entry in expected["numbers"].items()})
    if (folder / "results").is_dir():  # the ablation lab: its collected tables
        import ablate
        found["ablate"] = ablate
        for table, rows in ablate.summarise(folder / "results").items():
            found[f"t{table}"] = SimpleNamespace(**{config: SimpleNamespace(**{
                column: SimpleNamespace(mean=stat[0], std=stat[1]) for column, stat in row.items() if column != "seeds"})
                for config, row in rows.items()})
    return found


def names_for(path: Path) -> dict:
    """The names of a file's tags: its lab's, or every lab's (lab1, lab2, ...) for labs/README.md."""
    if path.parent == common.LABS:
        return dict(FUNCTIONS, **{f"lab{int(f.name[:2])}": SimpleNamespace(**names(f)) for f in lab_folders()})
    return names(path.parent)


def lab_folders() -> list[Path]:
    return sorted(f for f in common.LABS.glob("[0-9][0-9]-*") if f.is_dir())


def render_numbers(text: str, found: dict, where: str = "") -> str:
    """`text` with every tagged number recomputed from its expression."""
    def one(match: re.Match) -> str:
        if match[0].startswith("`"):
            return match[0]
        expression, _, spec = match[2].strip().rpartition(":")
        try:
            value = eval(expression, {"__builtins__": {}, **found})  # noqa: S307  (the project's own handouts)
        except Exception as error:
            raise SystemExit(f"{where}: the number {match[1]!r} tagged {match[2].strip()!r}: {error!r}") from error
        return f"{format(value, spec)}<!--={match[2]}-->"
    return TAGGED.sub(one, text)


def render_table(text: str, folder: Path, where: str = "") -> str:
    """`text` with its block between BEGIN and END replaced by expected_table."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{where} has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    return head + BEGIN + "\n" + expected_table(folder) + "\n" + END + rest.split(END, 1)[1]


def rendered(path: Path) -> str:
    """The file at `path` as it must read: its expected table and its tagged numbers recomputed."""
    text = path.read_text()
    if path.name == "README.md" and (path.parent / "expected.json").is_file():
        text = render_table(text, path.parent, str(path))
    return render_numbers(text, names_for(path), str(path))


def files(folder: Path | None = None) -> list[Path]:
    """Every file whose numbers are rendered: a lab's handout and answer sheet, or (no folder) all
    of them and labs/README.md."""
    folders = [folder] if folder else lab_folders()
    found = [f / name for f in folders for name in ("README.md", "answers.md") if (f / name).is_file()]
    return found if folder else [common.LABS / "README.md", *found]


def update(folder: Path | None = None) -> None:
    """Rewrite the files of `folder` (or of every lab, and labs/README.md) as they must read."""
    for path in files(folder) + ([common.LABS / "README.md"] if folder else []):
        text = rendered(path)
        if text != path.read_text():
            path.write_text(text)
            print(f"updated {path}")


def sections(text: str) -> list[tuple[str, str]]:
    """[(heading, markdown)] for the part before the first `## ` heading ("") and each section."""
    parts = re.split(r"^(?=## )", text.strip() + "\n", flags=re.M)
    return [(part.splitlines()[0][3:].split(" (")[0] if part.startswith("## ") else "", part.strip())
            for part in parts if part.strip()]


def numbered(text: str) -> tuple[str, list[str]]:
    """(the text before a numbered list, [its items]) of a Markdown section; items keep their number."""
    parts = re.split(r"^(?=\d+\. )", text.strip(), flags=re.M)
    head = parts[0].strip() if not re.match(r"\d+\. ", parts[0]) else ""
    return head, [p.strip() for p in parts if re.match(r"\d+\. ", p)]


def strip_tags(text: str) -> str:
    """Markdown without the numbers' tags and the tables' marker lines (what a notebook shows)."""
    text = TAGGED.sub(lambda m: m[0] if m[0].startswith("`") else m[1], text)
    return re.sub(r"^<!--.*-->\n", "", text, flags=re.M)
