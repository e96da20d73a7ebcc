"""Data: JSONL task manifests -> validated records -> tensors -> batches.

Implements the data side of PTUnifier (ICCV 2023):
- manifests: the on-disk contract shared by prepare.py (real datasets) and synth.py
  (synthetic benchmark); every line is validated and errors name file:line and field.

Manifest layout (one task folder): `manifest.jsonl`, one JSON object a line, and `meta.json`.
Every record has `id` (unique str) and `split` in {"train", "val", "test"} plus the task
fields of TASK_FIELDS. Image paths are relative to meta["image_root"] (itself relative to the
task folder, or absolute); a path that is absolute or contains ".." is refused.
"""
import json
import os
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath

SPLITS = ("train", "val", "test")
ANSWER_TYPES = ("closed", "open")

# Task -> {field: type}. Types: "str" (non-empty after stripping), "image" (a relative path
# str inside image_root), "texts" (non-empty list of str, each >= 3 words), "labels" (list of
# 0/1 ints, one per meta["classes"]), "class" (str in meta["classes"]), "answer_type".
TASK_FIELDS = {
    "pretrain": {"image": "image", "texts": "texts"},
    "ic": {"image": "image", "labels": "labels"},
    "tc": {"text_a": "str", "text_b": "str", "label": "class"},
    "ts": {"source": "str", "target": "str"},
    "retrieval": {"image": "image", "text": "str"},
    "itg": {"image": "image", "report": "str"},
    "vqa": {"image": "image", "question": "str", "answer": "str", "answer_type": "answer_type"},
}
MIN_WORDS = 3  # texts shorter than this are dropped by preprocessing (DATASETS.md)


class ManifestError(ValueError):
    """A manifest or meta.json violates the contract; the message names file:line and field."""


# ----------------------------------------------------------------------------- validation

def _is_safe_relpath(path: str) -> bool:
    """True when `path` is relative and stays inside its root (no '..', no drive, no '/x')."""
    posix, windows = PurePosixPath(path), PureWindowsPath(path)
    if not path or posix.is_absolute() or windows.is_absolute() or windows.drive:
        return False
    return ".." not in posix.parts and ".." not in windows.parts


def _field_problem(kind: str, value, meta: dict) -> str | None:
    """Return 'expected ...' when `value` does not satisfy field type `kind`, else None."""
    classes = meta.get("classes") or []
    if kind in ("str", "class", "answer_type", "image"):
        if not isinstance(value, str) or not value.strip():
            return "expected a non-empty string"
        if kind == "class" and value not in classes:
            return f"expected one of meta classes {classes}"
        if kind == "answer_type" and value not in ANSWER_TYPES:
            return f"expected one of {list(ANSWER_TYPES)}"
        if kind == "image" and not _is_safe_relpath(value):
            return "expected a relative path inside image_root (no absolute path, no '..')"
        return None
    if kind == "texts":
        if not isinstance(value, list) or not value:
            return "expected a non-empty list of strings"
        if not all(isinstance(t, str) and len(t.split()) >= MIN_WORDS for t in value):
            return f"expected every text to be a string of >= {MIN_WORDS} words"
        return None
    if kind == "labels":
        ok = isinstance(value, list) and all(type(v) is int and v in (0, 1) for v in value)
        if not ok or len(value) != len(classes):
            return f"expected a list of {len(classes)} ints in {{0, 1}} (one per meta classes)"
        return None
    raise AssertionError(f"unknown field kind {kind!r}")


def validate_meta(meta, where: str) -> None:
    """Check meta.json keys needed to read records; `where` names the file in errors."""
    if not isinstance(meta, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    task = meta.get("task")
    if task not in TASK_FIELDS:
        raise ManifestError(f"{where}: key 'task' is {task!r}: expected one of {list(TASK_FIELDS)}")
    needs = {"ic": "classes", "tc": "classes", "vqa": "answers"}.get(task)
    if needs and not (isinstance(meta.get(needs), list) and meta[needs]
                      and all(isinstance(c, str) for c in meta[needs])):
        raise ManifestError(f"{where}: key '{needs}': expected a non-empty list of strings")
    if "image" in TASK_FIELDS[task] and not (isinstance(meta.get("image_root"), str)
                                             and meta["image_root"]):
        raise ManifestError(f"{where}: key 'image_root': expected a path string")


def validate_record(record, meta: dict, where: str, seen_ids: set) -> None:
    """Check one record against TASK_FIELDS[meta['task']]; adds its id to `seen_ids`."""
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
    fields = {"id": "str", "split": "split", **TASK_FIELDS[meta["task"]]}
    for name, kind in fields.items():
        if name not in record:
            raise ManifestError(f"{where}: field '{name}' is missing: expected {kind}")
        value = record[name]
        if kind == "split":
            problem = None if value in SPLITS else f"expected one of {list(SPLITS)}"
        else:
            problem = _field_problem(kind, value, meta)
        if problem:
            raise ManifestError(f"{where}: field '{name}' is {_short(value)}: {problem}")
    if record["id"] in seen_ids:
        raise ManifestError(f"{where}: field 'id' is {record['id']!r}: expected a unique id "
                            "(duplicate)")
    seen_ids.add(record["id"])


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------- read / write

def _atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same folder and os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_manifest(folder, records: list[dict], meta: dict) -> None:
    """Validate `records` and write folder/manifest.jsonl and folder/meta.json atomically.

    meta["counts"] is (re)computed from the records ({split: n}); key order is kept, so the
    same inputs give the same bytes.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    meta["counts"] = {s: sum(r.get("split") == s for r in records) for s in SPLITS}
    validate_meta(meta, f"{folder / 'meta.json'}")
    seen: set = set()
    for i, record in enumerate(records):
        validate_record(record, meta, f"{folder / 'manifest.jsonl'}:record {i + 1}", seen)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    _atomic_write(folder / "manifest.jsonl", lines)
    _atomic_write(folder / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False) + "\n")


def read_meta(folder) -> dict:
    """Read and validate folder/meta.json."""
    path = Path(folder) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing (expected meta.json next to manifest.jsonl)")
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    validate_meta(meta, str(path))
    return meta


def read_manifest(folder, split: str | None = None) -> tuple[list[dict], dict]:
    """Read folder/manifest.jsonl + meta.json, validating every line.

    Returns (records, meta); with `split`, only that split's records (all lines are still
    validated). Raises ManifestError "file:line: field 'x' is ...: expected ...".
    """
    if split is not None and split not in SPLITS:
        raise ManifestError(f"split {split!r}: expected one of {list(SPLITS)}")
    meta = read_meta(folder)
    path = Path(folder) / "manifest.jsonl"
    if not path.is_file():
        raise ManifestError(f"{path}: missing (expected one JSON object per line)")
    records, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: malformed JSON ({e.msg} at column {e.colno}): "
                                    "expected one JSON object per line") from None
            validate_record(record, meta, where, seen)
            if split is None or record["split"] == split:
                records.append(record)
    return records, meta


def resolve_image(meta_folder, meta: dict, rel_path: str) -> Path:
    """Absolute-or-relative path of image `rel_path` under meta["image_root"] of a task folder."""
    if not _is_safe_relpath(rel_path):
        raise ManifestError(f"image path {rel_path!r}: expected a relative path inside image_root")
    root = Path(meta["image_root"])
    if not root.is_absolute():
        root = Path(meta_folder) / root
    return root / rel_path
