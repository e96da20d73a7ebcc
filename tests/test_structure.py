"""The shape of the project: layered imports, small files, a short README, every cited document shipped."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def imports_of(path: Path) -> set[str]:
    """Project modules that `path` imports anywhere (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {path.stem}


def test_no_module_imports_one_that_imports_it_back():
    graph = {name: imports_of(path) for name, path in MODULES.items()}
    assert graph["model"] and graph["train"]  # the scan sees imports at all

    def reaches(start: str, goal: str, seen: set) -> bool:
        for nxt in graph[start] - seen:
            seen.add(nxt)
            if nxt == goal or reaches(nxt, goal, seen):
                return True
        return False
    circles = sorted(name for name in graph if reaches(name, name, set()))
    assert circles == [], f"modules on an import circle: {circles}"


def test_the_layers_hold():
    """Metrics know nothing of models; the synthetic data knows no evaluation code; model.py
    knows nothing of loading, generation, recipes or training."""
    assert imports_of(MODULES["metrics"]) <= {"data"}
    assert imports_of(MODULES["synth"]) <= {"tokenizer", "data", "metrics"}
    assert imports_of(MODULES["model"]) <= {"prompts", "losses"}
    assert imports_of(MODULES["runtime"]) == set()
    assert imports_of(MODULES["tokenizer"]) == set()  # text cleaning and tokens, below the data layer
    # Using a trained model (predict.py) stands on the evaluation code, below the benchmark.
    assert {"zeroshot", "tasks", "checkpoint", "data"} <= imports_of(MODULES["predict"])
    assert not imports_of(MODULES["predict"]) & {"train", "finetune", "evaluate", "prepare", "bench"}
    assert not imports_of(MODULES["tasks"]) & {"train", "finetune", "runtime", "data"}  # no script, no loop


def test_no_source_file_over_900_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 900}
    assert long == {}


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text()) <= 16_000


def shipped_files() -> list[Path]:
    ignored = {".git", "data", "runs", "bench_results", "__pycache__", ".pytest_cache"}
    return [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".txt") and p.is_file()
            and not ignored & set(p.relative_to(ROOT).parts)]


def test_every_cited_document_ships_in_the_repo():
    """Every *.md path that a source file or document names exists in the repository; none points
    outside it (into ../ or the private shared/ folder)."""
    cited = re.compile(r"(?<![\w/.-])((?:\.\./|[\w-]+/)*[A-Z][A-Z_]*\.md)\b")  # documents: upper-case names
    missing = []
    for path in shipped_files():
        for name in cited.findall(path.read_text(errors="replace")):
            inside = ".." not in name and not name.startswith("shared/")
            if not inside or (name != "README.md" and not any(
                    c.is_file() for c in (ROOT / name, path.parent / name))):
                missing.append(f"{path.relative_to(ROOT)} -> {name}")
    assert missing == []
