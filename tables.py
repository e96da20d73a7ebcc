"""The pieces every prepare.py converter shares: the Output it returns, CSV / JSONL / JSON readers
whose errors name the file and line (PrepareError), the text filters, seeded hold-outs, the
split-disjointness check and the VQA answer vocabulary (docs/DATASETS.md, "Conventions")."""
import csv
import gzip
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field

from data import MIN_WORDS
from tokenizer import clean_text


class PrepareError(ValueError):
    """The raw release does not look as expected; the message names the file and line."""


@dataclass
class Output:
    """One task folder to write: its records plus the dataset-specific meta entries."""
    folder: str                  # task folder (created)
    task: str                    # data.TASK_FIELDS key
    records: list                # manifest records (dicts with id, split and task fields)
    dropped: Counter             # reason -> number of dropped records / texts
    image_root: str | None       # absolute image root, None for text-only tasks
    extra: dict = field(default_factory=dict)  # classes / answers / notes for meta.json


# ----------------------------------------------------------------------------- shared helpers

def long_enough(text: str) -> bool:
    return len(text.split()) >= MIN_WORDS


def keep_texts(texts, dropped: Counter) -> list[str]:
    """Clean `texts`, drop empty ones silently (absent section) and count short ones."""
    kept = []
    for text in map(clean_text, texts):
        if text and not long_enough(text):
            dropped["short_text"] += 1
        elif text:
            kept.append(text)
    return kept


def seeded_holdout(keys, sizes: dict, seed: int) -> dict:
    """Assign sizes[split] keys (chosen with `seed`) to each split; the rest to 'train'."""
    order = sorted(set(keys))
    if sum(sizes.values()) > len(order):
        raise PrepareError(f"cannot hold out {sizes} from {len(order)} items; lower the sizes")
    random.Random(seed).shuffle(order)
    split_of, start = {}, 0
    for split, n in sizes.items():
        split_of.update((k, split) for k in order[start:start + n])
        start += n
    split_of.update((k, "train") for k in order[start:])
    return split_of


def image_exists(root: str, rel: str, dropped: Counter) -> bool:
    """True when root/rel is a file; otherwise count it as dropped ('missing_image')."""
    if os.path.isfile(os.path.join(root, rel)):
        return True
    dropped["missing_image"] += 1
    return False


def open_text(path: str):
    """Open a text file, falling back to path + '.gz' (MIMIC-CXR ships its CSVs gzipped)."""
    if not os.path.exists(path) and os.path.exists(path + ".gz"):
        return gzip.open(path + ".gz", "rt", encoding="utf-8", newline="")
    if not os.path.exists(path):
        raise PrepareError(f"{path}: file not found (check --src and docs/DATASETS.md for the layout)")
    return open(path, encoding="utf-8", newline="")


def csv_rows(f, path: str, columns: list[str], hint: str = "") -> csv.DictReader:
    """A csv.DictReader of `f` whose header has `columns`; else PrepareError naming the file."""
    reader = csv.DictReader(f)
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise PrepareError(f"{path}:1: header lacks columns {missing}{hint}: found {reader.fieldnames}")
    return reader


def wrong_length(row: dict) -> bool:
    """True for a csv.DictReader row with more or fewer fields than its header."""
    return None in row or None in row.values()


def read_csv(path: str, columns: list[str]):
    """Yield (line, row dict) from a CSV with a header; bad rows raise PrepareError(file:line)."""
    with open_text(path) as f:
        reader = csv_rows(f, path, columns)
        try:
            for row in reader:
                if wrong_length(row):
                    raise PrepareError(f"{path}:{reader.line_num}: expected "
                                       f"{len(reader.fieldnames)} fields, got a different count")
                yield reader.line_num, row
        except csv.Error as e:
            raise PrepareError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def read_jsonl(path: str, keys: list[str]):
    """Yield (line, object) from a JSONL file; bad lines and missing keys name file:line."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            require_keys(obj, keys, f"{path}:{lineno}")
            yield lineno, obj


def read_json(path: str):
    with open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def require_keys(obj, keys: list[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise PrepareError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise PrepareError(f"{where}: missing keys {missing}")


def json_entries(path: str, keys: list[str]):
    """Yield (where, entry) from a JSON file holding one array; entry index in `where`."""
    entries = read_json(path)
    if not isinstance(entries, list):
        raise PrepareError(f"{path}: expected a JSON array of entries")
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}"
        require_keys(entry, keys, where)
        yield where, entry


def find_file(root: str, name: str) -> str:
    """The single path named `name` under `root` (searched recursively)."""
    hits = sorted(os.path.join(d, name) for d, dirs, files in os.walk(root)
                  if name in files or name in dirs)
    if len(hits) != 1:
        raise PrepareError(f"{root}: expected exactly one '{name}' below it, "
                           f"found {hits or 'none'}")
    return hits[0]


def check_disjoint(records: list[dict], key: str) -> None:
    """Raise if any value of record[key] appears in two splits."""
    split_of = {}
    for r in records:
        if split_of.setdefault(r[key], r["split"]) != r["split"]:
            raise AssertionError(f"{key} {r[key]!r} is in both {split_of[r[key]]} and {r['split']}")


def vqa_output(folder: str, image_root: str, records: list[dict], dropped: Counter, extra: dict) -> Output:
    """Answer vocabulary from train + val; count test records whose answer is outside it."""
    vocab = sorted({r["answer"] for r in records if r["split"] != "test"})
    known = set(vocab)
    outside = sum(1 for r in records if r["split"] == "test"
                  and not known.intersection(r.get("answers", [r["answer"]])))
    extra = {**extra, "answers": vocab, "test_answers_outside_vocab": outside,
             "answer_normalisation": "lower-case, collapse whitespace, trim, drop trailing '.'"}
    return Output(folder, "vqa", records, dropped, image_root, extra)
