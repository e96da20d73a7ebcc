"""Data: JSONL task manifests -> validated records -> tensors -> batches.

Implements the data side of PTUnifier (ICCV 2023):
- manifests: the on-disk contract shared by prepare.py (real datasets) and synth.py
  (synthetic benchmark); every line is validated and errors name file:line and field.
- images: any PIL mode -> RGB, shorter-side resize + centre crop (eval) or a mild random
  resized crop (train), CLIP mean/std (paper 5.3: 288 px pre-training, 384 px fine-tuning).
- text: cleaned and tokenised by tokenizer.py; pre-training reads one random sentence per access
  (paper 5.3 / official code), downstream tasks the whole text.
- objectives' inputs: MLM masking, 15% of real tokens, 80/10/10 (paper 3.3, Eq. 5-6) and ITM
  negatives, exactly half of a batch paired with another image of the batch (Eq. 7-8).
- datasets, collate functions and a DataLoader factory that is DDP-aware and seeded.

Manifest layout (one task folder): `manifest.jsonl`, one JSON object a line, and `meta.json`.
Every record has `id` (unique str) and `split` in {"train", "val", "test"} plus the task
fields of TASK_FIELDS. Image paths are relative to meta["image_root"] (itself relative to the
task folder, or absolute); a path that is absolute or contains ".." is refused.
"""
import dataclasses
import json
import math
import os
import random
import re
import signal
import tempfile
import threading
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
from PIL import Image

from dicom import SUFFIXES as DICOM_SUFFIXES, DicomError, is_dicom, read_dicom
from tokenizer import Tokenizer, clean_text, round_up

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
MIN_WORDS = 3  # texts shorter than this are dropped by preprocessing (docs/DATASETS.md)


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
        if not isinstance(value, str) or not clean_text(value):
            return "expected a non-empty string (control characters removed)"
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
        if not all(isinstance(t, str) and len(clean_text(t).split()) >= MIN_WORDS for t in value):
            return f"expected every text to be a string of >= {MIN_WORDS} words (control characters removed)"
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

def atomic_write(path: Path, text: str) -> None:
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
    atomic_write(folder / "manifest.jsonl", lines)
    atomic_write(folder / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False) + "\n")


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


def check_image_size(folder, size: int) -> None:
    """Refuse to train at `size` px from copies prepared smaller (meta["image_size"], prepare.py):
    the crops would be upscaled. Absent or 0: the manifest points at the originals."""
    meta = read_meta(folder)
    prepared = meta.get("image_size") or 0
    if prepared and size > prepared:
        raise SystemExit(f"{Path(folder) / 'meta.json'}: images prepared at a shorter side of {prepared} px, "
                         f"smaller than the {size} px the model reads; prepare them again: python prepare.py "
                         f"{meta.get('name', 'DATASET')} --src {meta.get('source', 'SRC')} --out {folder} "
                         f"--image-size {size} (and the other flags of the first run)")


def resolve_image(meta_folder, meta: dict, rel_path: str) -> Path:
    """Absolute-or-relative path of image `rel_path` under meta["image_root"] of a task folder."""
    if not _is_safe_relpath(rel_path):
        raise ManifestError(f"image path {rel_path!r}: expected a relative path inside image_root")
    root = Path(meta["image_root"])
    if not root.is_absolute():
        root = Path(meta_folder) / root
    return root / rel_path


# ----------------------------------------------------------------------------- images

# Decompression-bomb limit: images with more pixels are refused. 64 MP is ~7x a 3000x3000 chest
# film; PIL raises DecompressionBombError above twice this and warns above it (we make the
# warning an error in load_image). Set on import because PIL reads the module-level value.
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# The file extensions load_image reads: the image formats PIL opens, and DICOM's.
IMAGE_SUFFIXES = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN} | set(DICOM_SUFFIXES)


class UnreadableImage(OSError):
    """An image file is missing, empty, corrupt, truncated or too large; message names it."""


def _to_rgb(im: Image.Image, keep_grey: bool = False) -> Image.Image:
    """Any PIL mode -> RGB (8-bit grey stays "L" with `keep_grey`). 16/32-bit integer and float
    images are scaled by their max."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = arr.max()
        arr = np.clip(arr, 0, None) * (255.0 / peak) if peak > 0 else np.zeros_like(arr)
        im = Image.fromarray(np.round(arr).astype(np.uint8))
    return im if keep_grey and im.mode == "L" else im.convert("RGB")


def load_image(path, keep_grey: bool = False, draft_side: int = 0) -> Image.Image:
    """Decode `path` into an RGB PIL image; raise UnreadableImage naming the path.
    keep_grey: a grey image stays one channel ("L"), which image_to_tensor turns into the same
    tensor as its RGB copy for a third of the resizing work (radiographs are grey).
    draft_side: a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale whose shorter side is still
    >= draft_side (PIL's draft mode: the DCT does that reduction, at a fraction of the cost); 0: full
    size. A DICOM (dicom.SUFFIXES) is read by dicom.read_dicom and rounded to 8 bits."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableImage(f"{path}: image file is missing")
    if path.stat().st_size == 0:
        raise UnreadableImage(f"{path}: image file is empty")
    try:
        if is_dicom(path):
            return _to_rgb(Image.fromarray(np.round(read_dicom(path)).astype(np.uint8)), keep_grey)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if draft_side and im.format == "JPEG":
                    scale = draft_side / min(im.size)
                    im.draft(None, (math.ceil(im.width * scale), math.ceil(im.height * scale)))
                im.load()
                return _to_rgb(im, keep_grey)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"{path}: refused, more than {MAX_IMAGE_PIXELS} pixels ({e})") from None
    except DicomError as e:
        raise UnreadableImage(str(e)) from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for corrupt/truncated files
        raise UnreadableImage(f"{path}: cannot decode image ({e})") from None


def _random_crop_box(width: int, height: int, gen: torch.Generator | None = None,
                     scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random (left, top, w, h) box of area fraction in `scale` and aspect ratio in `ratio`
    (log-uniform), drawn from `gen` (torch's global RNG when None); after 10 misses, the centre
    crop of the image clamped to `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=gen).item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand((), generator=gen).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (), generator=gen).item())
            top = int(torch.randint(0, height - h + 1, (), generator=gen).item())
            return left, top, w, h
    w, h = width, height                     # fallback: the centre crop clamped to `ratio`
    if w / h > ratio[1]:
        w = round(h * ratio[1])
    elif w / h < ratio[0]:
        h = round(w / ratio[0])
    return (width - w) // 2, (height - h) // 2, w, h


def image_to_tensor(im: Image.Image, size: int, train: bool,
                    gen: torch.Generator | None = None) -> torch.Tensor:
    """RGB (or grey "L") PIL image -> normalised float tensor [3, size, size].

    eval: resize the shorter side to `size` (bicubic) then centre-crop;
    train: random-resized crop (scale 0.8-1.0, ratio 3/4-4/3) resized to size x size.
    """
    if train:
        left, top, w, h = _random_crop_box(*im.size, gen)
        im = im.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    else:
        scale = size / min(im.size)
        new = (max(size, round(im.width * scale)), max(size, round(im.height * scale)))
        im = im.resize(new, Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
    arr = np.asarray(im, dtype=np.float32) / 255.0  # (H, W, 3), or (H, W) grey
    if arr.ndim == 2:
        arr = arr[..., None]  # (H, W, 1): grey broadcasts to the three channels below
    arr = (arr - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())  # (H, W, 3) -> (3, H, W)


class SkipTracker:
    """Accumulates the unreadable image paths reported in `Batch.skipped` over a split and
    raises once more than `max_fraction` of the split's `total` samples were unreadable.

    Counting happens here, in the main process, because counters inside DataLoader workers
    are invisible to it.
    """

    def __init__(self, total: int, max_fraction: float = 0.01, split: str = "train"):
        self.total, self.max_fraction, self.split = total, max_fraction, split
        self.paths: set[str] = set()

    def update(self, batch: "Batch") -> None:
        self.paths.update(batch.skipped)
        if len(self.paths) > self.max_fraction * self.total:
            shown = ", ".join(sorted(self.paths)[:5])
            raise RuntimeError(f"{len(self.paths)} of {self.total} images of split "
                               f"'{self.split}' are unreadable (limit {self.max_fraction:.1%}); "
                               f"first: {shown}")


# ----------------------------------------------------------------------------- text

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def normalize_answer(answer) -> str:
    """The one VQA answer rule, used by prepare.py (vocabulary) and the metric (evaluate.py):
    str, `clean_text`, lower-case, trailing '.', '?', '!' dropped."""
    return clean_text(str(answer)).lower().rstrip(".?!").strip()


def split_sentences(text: str) -> list[str]:
    """Split after '.', '!' or '?' followed by whitespace; keep sentences of >= 3 words."""
    return [s for s in _SENTENCE_END.split(clean_text(text)) if len(s.split()) >= MIN_WORDS]


def pick_sentence(texts: list[str], rng: random.Random) -> str:
    """Pre-training text rule (paper 5.3, official code "one random sentence"): choose one of
    `texts` uniformly among those with a sentence of >= 3 words, then one such sentence
    uniformly. A text without such a sentence is used whole; if none has one, a whole text."""
    candidates = [s for s in (split_sentences(t) for t in texts) if s]
    if not candidates:
        return clean_text(texts[rng.randrange(len(texts))])
    sentences = candidates[rng.randrange(len(candidates))]
    return sentences[rng.randrange(len(sentences))]


TEXT_UNITS = ("sentence", "text")


def pick_text(texts: list[str], rng: random.Random, unit: str) -> str:
    """The pre-training text of one access: unit "sentence" is the official rule (pick_sentence);
    unit "text" is one of `texts` (e.g. findings or impression), whole, chosen uniformly."""
    if unit == "sentence":
        return pick_sentence(texts, rng)
    if unit == "text":
        return clean_text(texts[rng.randrange(len(texts))])
    raise ValueError(f"text unit {unit!r}: expected one of {TEXT_UNITS}")


# ----------------------------------------------------------------------------- MLM / ITM

def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, tok: Tokenizer,
                generator: torch.Generator, prob: float = 0.15):
    """BERT masking (paper 3.3, MLM, Eq. 5-6) of input_ids [B, L].

    Each real token (not special, not pad) is selected with probability `prob`; a row with at
    least one real token and no selection gets one selected at random. Selected tokens become
    <mask> (80%), a random non-special token (10%) or stay unchanged (10%).
    Returns (masked_ids [B, L], labels [B, L]: the original id where selected, else -100).
    """
    special = torch.isin(input_ids, torch.tensor(tok.special_ids)) | (attention_mask == 0)
    real = ~special
    selected = (torch.rand(input_ids.shape, generator=generator) < prob) & real
    empty = real.any(1) & ~selected.any(1)
    if empty.any():
        scores = torch.rand(input_ids.shape, generator=generator).masked_fill(special, -1.0)
        forced = torch.zeros_like(selected).scatter_(1, scores.argmax(1, keepdim=True), True)
        selected |= forced & empty[:, None]
    labels = input_ids.masked_fill(~selected, -100)
    action = torch.rand(input_ids.shape, generator=generator)
    ordinary = torch.tensor([i for i in range(tok.vocab_size) if i not in tok.special_ids])
    random_ids = ordinary[torch.randint(len(ordinary), input_ids.shape, generator=generator)]
    masked = input_ids.clone()
    masked[selected & (action < 0.8)] = tok.mask_id
    swap = selected & (action >= 0.8) & (action < 0.9)
    masked[swap] = random_ids[swap]
    return masked, labels


TEXT_BUCKET, MLM_BUCKET = 16, 8  # pre-training pads L and P to multiples: a compiled step meets few shapes


def mlm_positions(labels: torch.Tensor, multiple: int = MLM_BUCKET) -> torch.Tensor:
    """Where MLM scores each text, a fixed-shape index made on the host: labels [B, L] (-100: not
    masked) -> positions [B, P], each row's masked positions in order, then 0s (the start token,
    never masked) up to P = the most masked positions of a row rounded up to `multiple` (<= L)."""
    if (labels[:, 0] != -100).any():
        raise ValueError("mlm_positions: position 0 must be unmasked (label -100) to fill rows with")
    counts = (labels != -100).sum(1, keepdim=True)                        # [B, 1]
    P = round_up(max(int(counts.max()), 1), multiple, labels.shape[1])
    order = torch.argsort((labels == -100).int(), dim=1, stable=True)[:, :P]  # [B, P] masked first
    return order.masked_fill(torch.arange(P) >= counts, 0)               # [B, P]


def itm_pairs(batch_size: int, generator: torch.Generator):
    """ITM negatives (paper 3.3, ITM, Eq. 7-8): floor(B/2) random rows get another row's image.

    Returns (itm_image_index LongTensor[B]: index into the batch's images, i for positives,
    itm_labels LongTensor[B]: 1 matched, 0 not).
    """
    index = torch.arange(batch_size)
    labels = torch.ones(batch_size, dtype=torch.long)
    if batch_size < 2:
        return index, labels
    negatives = torch.randperm(batch_size, generator=generator)[: batch_size // 2]
    shift = torch.randint(1, batch_size, (len(negatives),), generator=generator)
    index[negatives] = (negatives + shift) % batch_size  # never the row's own image
    labels[negatives] = 0
    return index, labels


# ----------------------------------------------------------------------------- batches

@dataclasses.dataclass
class Batch:
    """One collated batch; fields a task does not use stay None. B = batch size."""
    ids: list[str] = dataclasses.field(default_factory=list)
    pixel_values: torch.Tensor | None = None    # [B, 3, H, W] float, CLIP-normalised
    input_ids: torch.Tensor | None = None       # [B, L] text input (pretrain sentence, tc pair,
    attention_mask: torch.Tensor | None = None  # [B, L]  ts source, vqa question, retrieval text)
    target_ids: torch.Tensor | None = None      # [B, T] ts impression / itg report, with bos/eos
    target_mask: torch.Tensor | None = None     # [B, T]
    labels: torch.Tensor | None = None          # ic float[B, C]; tc long[B]; vqa float[B, A]
    answers: list[str] | None = None            # vqa raw answers (may be outside the vocabulary)
    answer_types: list[str] | None = None       # vqa "closed" | "open"
    references: list[str] | None = None         # raw target strings for NLG metrics
    mlm_input_ids: torch.Tensor | None = None   # [B, L] input_ids after masking
    mlm_labels: torch.Tensor | None = None      # [B, L] original id at masked places, else -100
    mlm_positions: torch.Tensor | None = None   # [B, P] masked positions, then 0s (mlm_positions)
    itm_image_index: torch.Tensor | None = None  # [B] image row paired with text row i
    itm_labels: torch.Tensor | None = None      # [B] 1 matched, 0 not
    skipped: list[str] = dataclasses.field(default_factory=list)  # unreadable image paths

    def __len__(self) -> int:
        return len(self.ids)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that hold a tensor, by name."""
        return {f.name: value for f in dataclasses.fields(self) if torch.is_tensor(value := getattr(self, f.name))}

    def to(self, device, non_blocking: bool = True) -> "Batch":
        """A copy with every tensor moved to `device`."""
        return dataclasses.replace(self, **{k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items()})

    def split(self, size: int) -> list["Batch"]:
        """Consecutive micro-batches of at most `size` rows (fine-tuning's gradient accumulation; a
        pre-training batch, whose ITM pairs index its own rows, is refused)."""
        if self.itm_image_index is not None:
            raise ValueError("a pre-training batch cannot be split: its ITM pairs index its own rows")

        def rows(value, i):
            return value[i:i + size] if torch.is_tensor(value) or isinstance(value, list) else value
        names = [f.name for f in dataclasses.fields(self) if f.name != "skipped"]
        return [dataclasses.replace(self, skipped=self.skipped if i == 0 else [],
                                    **{n: rows(getattr(self, n), i) for n in names})
                for i in range(0, len(self), size)]

    def pin_memory(self) -> "Batch":
        """A copy with every tensor in page-locked memory, from which a non_blocking copy to the GPU
        leaves the host free (a DataLoader with pin_memory=True calls this)."""
        return dataclasses.replace(self, **{k: v.pin_memory() for k, v in self.tensors().items()})


@dataclasses.dataclass
class Sample:
    """One dataset item before collation; `skipped` holds the path of an unreadable image."""
    id: str
    image: torch.Tensor | None = None
    text: str | None = None
    text_b: str | None = None
    target: str | None = None
    label: object = None
    answer_type: str | None = None
    skipped: str | None = None
    seed: int | None = None  # the sample's random seed (SeededBatches); None: torch's global RNG


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of `parts` (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def _key(key) -> tuple[int, int | None]:
    """Dataset keys are plain indices (eval) or (index, seed) pairs from SeededBatches (train)."""
    return (key[0], key[1]) if isinstance(key, tuple) else (key, None)


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


def stratified_subset(keys: list, fraction: float, seed: int) -> list[int]:
    """Indices of a seeded, stratified `fraction` of the items whose strata are `keys` (e.g. the
    label, or the tuple of multi-label values), in ascending order.

    round(fraction x N) items in all (at least 1), split over the strata in proportion to their
    sizes: each stratum gets the floor of its quota, and the items left over go to the strata with
    the largest remainders (ties in a seeded random order). Within a stratum the items are a seeded
    random sample. The same (keys, fraction, seed) always give the same indices.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = random.Random(seed)
    strata: dict = {}
    for i, key in enumerate(keys):
        strata.setdefault(key, []).append(i)
    total = max(1, round(fraction * len(keys)))
    order = sorted(strata, key=repr)  # a fixed order of the strata, then a seeded shuffle for ties
    rng.shuffle(order)
    quotas = {key: fraction * len(strata[key]) for key in order}
    take = {key: math.floor(q) for key, q in quotas.items()}
    for key in sorted(order, key=lambda k: quotas[k] - take[k], reverse=True)[:total - sum(take.values())]:
        take[key] += 1
    return sorted(i for key in order for i in rng.sample(strata[key], take[key]))


class _ImageDataset(torch.utils.data.Dataset):
    """Shared image handling: train mode reports unreadable images, eval mode raises."""

    def __init__(self, folder, split, tokenizer: Tokenizer, image_size: int, max_len: int,
                 train: bool):
        self.folder, self.split = Path(folder), split
        self.records, self.meta = read_manifest(folder, split)
        self.tokenizer, self.image_size, self.max_len, self.train = (
            tokenizer, image_size, max_len, train)
        self.decoded: dict[Path, Image.Image] | None = None  # see keep_decoded_images

    def keep_decoded_images(self) -> None:
        """Keep every decoded image in memory from its first read on, so that later epochs skip
        the file decode (the synthetic benchmark's 3,000 training images: about 150 MB per data
        worker). For small datasets only."""
        self.decoded = {}

    def __len__(self) -> int:
        return len(self.records)

    def keep(self, indices: list[int]) -> None:
        """Keep only the records at `indices` (a training subset)."""
        self.records = [self.records[i] for i in indices]

    def _image(self, record: dict, gen: torch.Generator | None = None
               ) -> tuple[torch.Tensor | None, str | None]:
        """(tensor, None) or, in train mode, (None, path) for an unreadable image."""
        path = resolve_image(self.folder, self.meta, record["image"])
        try:
            image = self.decoded.get(path) if self.decoded is not None else None
            if image is None:
                image = load_image(path, keep_grey=True)
                if self.decoded is not None:
                    self.decoded[path] = image
            return image_to_tensor(image, self.image_size, self.train, gen), None
        except UnreadableImage:
            if not self.train:
                raise
            return None, str(path)


class PretrainDataset(_ImageDataset):
    """Pre-training pairs: image + one random sentence (text_unit "sentence", the official rule)
    or one whole text ("text") of its texts per access (pick_text)."""

    def __init__(self, folder, split, tokenizer, image_size, max_len, train, seed: int = 0,
                 mlm_prob: float = 0.15, text_unit: str = "sentence"):
        super().__init__(folder, split, tokenizer, image_size, max_len, train)
        if text_unit not in TEXT_UNITS:
            raise ValueError(f"PretrainDataset: text_unit {text_unit!r}: expected one of {TEXT_UNITS}")
        self.text_unit = text_unit
        if self.meta["task"] != "pretrain":
            raise ManifestError(f"{self.folder / 'meta.json'}: key 'task' is "
                                f"{self.meta['task']!r}: expected 'pretrain'")
        self.collate = PretrainCollate(tokenizer, max_len, seed, mlm_prob)

    def __getitem__(self, key) -> Sample:
        i, seed = _key(key)
        record = self.records[i]
        image, skipped = self._image(record, _generator(seed))
        if self.train:
            rng = random.Random(seed if seed is not None else torch.randint(2**62, ()).item())
        else:
            rng = random.Random(f"{record['id']}")
        text = pick_text(record["texts"], rng, self.text_unit)
        return Sample(record["id"], image=image, text=text, skipped=skipped, seed=seed)


class PretrainCollate:
    """Samples -> Batch with text input, MLM-masked copy and ITM pairing (picklable)."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, seed: int, mlm_prob: float = 0.15):
        self.tokenizer, self.max_len, self.seed, self.mlm_prob = tokenizer, max_len, seed, mlm_prob

    def __call__(self, samples: list[Sample]) -> Batch:
        kept = [s for s in samples if s.skipped is None]
        batch = Batch(ids=[s.id for s in kept], skipped=[s.skipped for s in samples if s.skipped])
        if not kept:
            return batch
        # Masking and ITM negatives draw from a generator seeded by the batch's samples, so a
        # batch is the same whichever worker builds it and whether or not the run was resumed.
        seeds = [s.seed for s in samples]
        gen = None if None in seeds else torch.Generator().manual_seed(derive_seed(self.seed, *seeds))
        batch.pixel_values = torch.stack([s.image for s in kept])  # (B, 3, H, W)
        batch.input_ids, batch.attention_mask = self.tokenizer.encode(
            [s.text for s in kept], self.max_len, pad_to_multiple_of=TEXT_BUCKET)
        batch.mlm_input_ids, batch.mlm_labels = mask_tokens(
            batch.input_ids, batch.attention_mask, self.tokenizer, gen, self.mlm_prob)
        batch.mlm_positions = mlm_positions(batch.mlm_labels)
        batch.itm_image_index, batch.itm_labels = itm_pairs(len(kept), gen)
        return batch


class TaskDataset(_ImageDataset):
    """The six downstream tasks (meta task ic, tc, ts, retrieval, itg, vqa), whole texts."""

    def __init__(self, folder, split, tokenizer, image_size, max_len, train):
        super().__init__(folder, split, tokenizer, image_size, max_len, train)
        self.task = self.meta["task"]
        if self.task == "pretrain":
            raise ManifestError(f"{self.folder / 'meta.json'}: key 'task' is 'pretrain': "
                                "expected a downstream task (use PretrainDataset)")
        self.classes = self.meta.get("classes")
        self.answers = self.meta.get("answers")
        self.collate = TaskCollate(self.task, tokenizer, max_len, self.classes, self.answers)

    def __getitem__(self, key) -> Sample:
        i, seed = _key(key)
        r = self.records[i]
        image, skipped = self._image(r, _generator(seed)) if "image" in r else (None, None)
        sample = Sample(r["id"], image=image, skipped=skipped, seed=seed)
        if self.task == "ic":
            sample.label = r["labels"]
        elif self.task == "tc":
            sample.text, sample.text_b, sample.label = r["text_a"], r["text_b"], r["label"]
        elif self.task == "ts":
            sample.text, sample.target = r["source"], r["target"]
        elif self.task == "retrieval":
            sample.text = r["text"]
        elif self.task == "itg":
            sample.target = r["report"]
        elif self.task == "vqa":
            sample.text, sample.label, sample.answer_type = (
                r["question"], r["answer"], r["answer_type"])
        return sample


class TaskCollate:
    """Samples of one downstream task -> Batch (picklable; no randomness)."""

    def __init__(self, task: str, tokenizer: Tokenizer, max_len: int, classes, answers):
        self.task, self.tokenizer, self.max_len = task, tokenizer, max_len
        self.classes, self.answers = classes, answers
        self.answer_index = {a: i for i, a in enumerate(answers or [])}

    def __call__(self, samples: list[Sample]) -> Batch:
        kept = [s for s in samples if s.skipped is None]
        batch = Batch(ids=[s.id for s in kept], skipped=[s.skipped for s in samples if s.skipped])
        if not kept:
            return batch
        if kept[0].image is not None:
            batch.pixel_values = torch.stack([s.image for s in kept])  # (B, 3, H, W)
        if kept[0].text is not None:
            pair = [s.text_b for s in kept] if self.task == "tc" else None
            batch.input_ids, batch.attention_mask = self.tokenizer.encode(
                [s.text for s in kept], self.max_len, pair=pair)
        if kept[0].target is not None:
            batch.references = [clean_text(s.target) for s in kept]
            batch.target_ids, batch.target_mask = self.tokenizer.encode(
                batch.references, self.max_len)
        self._labels(batch, kept)
        return batch

    def _labels(self, batch: Batch, kept: list[Sample]) -> None:
        if self.task == "ic":
            batch.labels = torch.tensor([s.label for s in kept], dtype=torch.float)  # (B, C)
        elif self.task == "tc":
            batch.labels = torch.tensor([self.classes.index(s.label) for s in kept])  # (B,)
        elif self.task == "vqa":
            batch.labels = torch.zeros(len(kept), len(self.answers))  # (B, A)
            for row, s in enumerate(kept):
                if s.label in self.answer_index:
                    batch.labels[row, self.answer_index[s.label]] = 1.0
            batch.answers = [s.label for s in kept]
            batch.answer_types = [s.answer_type for s in kept]


# ----------------------------------------------------------------------------- loader

class SeededBatches(torch.utils.data.Sampler):
    """Training batches as lists of (index, seed) keys, endless over epochs, for one rank.

    Epoch e's order is a permutation drawn from (seed, e); rank r takes every world-th sample
    of it (the tail that does not divide evenly is dropped, like the last partial batch). Each
    sample's seed is derive_seed(seed, e, index), so its crop, its sentence and its batch's
    masking depend only on (seed, epoch, position): the stream is identical whatever the number
    of workers, and resuming at (epoch, batch) replays exactly what an uninterrupted run reads.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 epoch: int = 0, start_batch: int = 0):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.start_batch = epoch, start_batch
        self.batches_per_epoch = n // world // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} training samples cannot fill one batch of {batch_size} "
                             f"on each of {world} processes")

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                derive_seed(self.seed, epoch)))
            mine = order[self.rank:(self.n // self.world) * self.world:self.world]  # [n // world]
            for b in range(start, self.batches_per_epoch):
                idx = mine[b * self.batch_size:(b + 1) * self.batch_size].tolist()
                yield [(i, derive_seed(self.seed, epoch, i)) for i in idx]
            epoch, start = epoch + 1, 0


class JobSignalSafeLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers live through a SIGTERM / SIGINT sent to the whole job (SLURM
    signals every process of a job step), so that the main process finishes its step and saves
    (runtime.StopSignal); a worker killed by it would fail the step instead. Its workers start
    with SIGTERM blocked (a signal that comes while they start waits for ignore_stop_signals)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, worker_init_fn=ignore_stop_signals, **kwargs)

    def __iter__(self):
        if not hasattr(signal, "sigwaitinfo"):  # macOS, Windows: see ignore_stop_signals
            return super().__iter__()
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the forks inherit it
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)


def ignore_stop_signals(worker_id: int) -> None:
    """Each worker of a JobSignalSafeLoader: SIGINT ignored, SIGTERM kept blocked and taken by a
    thread that ends the worker only when its own main process sent it (the DataLoader's shutdown,
    and Python's at exit: ignored, that one would hang the exit forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS, Windows: no sender to tell apart
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
    threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), daemon=True).start()


def _exit_on_sigterm_from(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)


def make_train_stream(dataset, batch_size: int, seed: int, epoch: int = 0, start_batch: int = 0,
                      num_workers: int = 2):
    """Endless training DataLoader starting at (epoch, start_batch), sharded over the ranks of
    an initialised process group (never touching torch.distributed otherwise)."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if initialised else (0, 1)
    sampler = SeededBatches(len(dataset), batch_size, seed, rank, world, epoch, start_batch)
    return JobSignalSafeLoader(
        dataset, batch_sampler=sampler, collate_fn=dataset.collate, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed))  # keeps the global RNG (dropout) untouched


class DeviceCopy:
    """Batches sent to the device one ahead of their use: on CUDA each is copied from pinned memory
    on a side stream, so that the next batch travels while the current step runs; elsewhere a
    plain move. `start(batch)` sends it, `ready(ticket)` hands it to the current stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, batch: Batch) -> tuple[Batch, object]:
        if self.stream is None:
            return batch.to(self.device), None
        with torch.cuda.stream(self.stream):
            moved = batch.to(self.device, non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(self.stream)
        return moved, arrived

    def ready(self, ticket: tuple[Batch, object]) -> Batch:
        moved, arrived = ticket
        if arrived is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(arrived)  # this batch's copy only, not the next one's
            for tensor in moved.tensors().values():
                tensor.record_stream(current)  # its memory is not reused before the step is done with it
        return moved


def make_loader(dataset, batch_size: int, train: bool, seed: int,
                distributed: bool | None = None, num_workers: int = 2):
    """One pass over `dataset` using its `collate` (fine-tuning epochs and evaluation).

    distributed=None means "if a torch.distributed process group is initialised": then a
    DistributedSampler (shuffle=train, seed) splits the data; call loader.sampler.set_epoch(e)
    every epoch. In eval it pads each rank to equal length by repeating up to world_size - 1
    samples: de-duplicate by Batch.ids before computing metrics. Train drops the last partial
    batch. Shuffling and augmentation draw from `seed` (loader generator, worker seeds).
    """
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and not initialised:
        raise RuntimeError("make_loader(distributed=True) needs an initialised process group")
    distributed = initialised if distributed is None else distributed
    sampler = None
    if distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=train, seed=seed,
                                                      drop_last=False)
    return JobSignalSafeLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
        collate_fn=dataset.collate, num_workers=num_workers, drop_last=train,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed))
