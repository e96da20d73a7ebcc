"""Convert a local copy of each official dataset release, or one's own table, into task manifests
(data.py format), with the images prepared once at training size (copies.py).

Implements the data preparation behind PTUnifier (ICCV 2023) section 5.1 (pre-training corpora:
ROCO, MedICaT, MIMIC-CXR) and section 5.2 (downstream: CheXpert, RSNA Pneumonia, RadNLI,
MIMIC-CXR summarization, ROCO retrieval, MIMIC-CXR report generation, VQA-RAD, SLAKE,
VQA-Med 2019). Release layouts are described in docs/DATASETS.md. Nothing is downloaded.

Usage:  python prepare.py DATASET --src RAW_DIR --out data/DATASET [--seed 42] [flags]
        python prepare.py --help        (lists every dataset and the flags each one reads)

Datasets (DATASET: --src folder -> task; splits):
  roco            ROCO root (holds data/)         -> pretrain;  official train/validation/test
  roco-retrieval  ROCO root                       -> retrieval; val/test capped (--eval-cap 2000)
  medicat         MedICaT root (holds release/)   -> pretrain;  seeded --val-size/--test-size 1000
  mimic-cxr       MIMIC-CXR-JPG root (files/, CSVs, mimic_cxr_sectioned.csv or --sections)
                                                  -> pretrain (PA/AP); official split
  mimic-cxr-ts    same root                       -> ts (findings -> impression); official split
  mimic-cxr-itg   R2Gen folder (annotation.json, images/) -> itg; R2Gen train/val/test
  chexpert        CheXpert-v1.0-small folder      -> ic (5 labels); valid.csv = test, seeded
                  --val-size 5000 of train; also <out>_1pct and <out>_10pct (--fractions)
  rsna            folder with stage_2_train_labels.csv and stage_2_train_images/ -> ic
                  (1 label); PNGs written to <out>/images; seeded 70/15/15
  radnli          folder with radnli_{dev,test}_v1.jsonl, --mednli mli_train_v1.jsonl
                  [--pseudo-train FILE] -> tc; MedNLI (+pseudo) = train, dev = val, test = test
  vqa-rad         folder with "VQA_RAD Dataset Public.json" and "VQA_RAD Image Folder/" -> vqa;
                  test = phrase_type contains "test"; no official val, so a seeded
                  --val-size 300 questions are held out of train
  slake           Slake1.0 folder (train/validate/test.json, imgs/) -> vqa; English only
  vqa-med-2019    folder holding the three unzipped releases (searched recursively) -> vqa;
                  C4 abnormality dropped (via QAPairsByCategory/C4_Abnormality_*.txt and the
                  test category column) unless --keep-abnormality
  table           your own CSV / JSONL (--task, --columns FIELD=NAME) or folder-per-class tree
                  -> any task; its split column, else seeded --holdout; bad rows listed by line

Conventions (docs/DATASETS.md, the PTUnifier/M3AE preprocessing):
- texts: runs of whitespace collapsed, trimmed; pre-training, retrieval, report and
  summarization texts with fewer than 3 words are dropped. NLI sentences and VQA questions are
  kept whatever their length (dropping them would change the official benchmarks).
- texts are grouped by image; a record whose image file is missing is dropped and counted.
- every seeded choice uses random.Random(--seed) on a sorted list, so reruns give the same split.
- splits are checked disjoint (by image for image-level tasks, by id otherwise) before writing.
- VQA answers are normalised by `data.normalize_answer`, the rule the VQA metric applies too:
  lower-case, control characters and whitespace runs collapsed, trimmed, trailing '.?!' removed.
  The answer vocabulary comes from train + val only; meta.json counts the test answers outside it
  ("test_answers_outside_vocab"); they can only be scored as wrong.
- meta.json holds "counts" (per split), "dropped" ({reason: n}; "short_text" counts texts,
  "no_text" the records left without any text, other reasons count records), "seed", "source",
  "image_root" (absolute); image paths in records are relative to image_root.
- images: copies at a shorter side of --image-size px (default 512) in OUT/images_<size>px, made
  by --workers processes, resumable; image_root is that folder, "image_size" the size,
  "originals" the release folder; unreadable sources are dropped ("unreadable_image") and listed
  in OUT/unreadable_images.txt. --image-size 0: image_root is the release folder (no copies).
Malformed input (bad CSV row, bad JSON line, unknown label value) raises PrepareError naming the
file and the line (or, inside a JSON array, the entry index).
"""
import argparse
import json
import os
import random
from collections import Counter, defaultdict
from pathlib import Path

from copies import copy_name, make_copies
from data import IMAGE_SUFFIXES, MIN_WORDS, atomic_write, normalize_answer, write_manifest
from dicom import import_pydicom, is_dicom
from tables import (Output, PrepareError, check_disjoint, csv_rows, find_file, image_exists, json_entries, keep_texts,
                    long_enough, open_text, read_csv, read_json, read_jsonl, require_keys, seeded_holdout,
                    vqa_output, wrong_length)
from tokenizer import clean_text


# ----------------------------------------------------------------------------- pre-training

ROCO_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def read_roco(src: str, dropped: Counter) -> list[tuple]:
    """(split, roco_id, image, caption) for every radiology entry whose image exists."""
    rows = []
    for leaf, split in ROCO_SPLITS.items():
        folder = f"data/{leaf}/radiology"
        path = os.path.join(src, folder, "captions.txt")
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                roco_id, tab, caption = line.rstrip("\n").partition("\t")
                if not tab or not roco_id.strip():
                    raise PrepareError(f"{path}:{lineno}: expected 'ROCO_ID<TAB>caption'")
                image = f"{folder}/images/{roco_id.strip()}.jpg"
                if image_exists(src, image, dropped):
                    rows.append((split, roco_id.strip(), image, clean_text(caption)))
    return rows


def convert_roco(args) -> list[Output]:
    """ROCO radiology subset -> pretrain manifest, official train/validation/test splits.
    Each ROCO image has one caption, so texts is a one-element list."""
    dropped, records = Counter(), []
    for split, roco_id, image, caption in read_roco(args.src, dropped):
        texts = keep_texts([caption], dropped)
        if texts:
            records.append({"id": roco_id, "split": split, "image": image, "texts": texts})
        else:
            dropped["no_text"] += 1
    return [Output(args.out, "pretrain", records, dropped, args.src)]


def convert_roco_retrieval(args) -> list[Output]:
    """ROCO radiology -> retrieval pairs; val/test capped at --eval-cap pairs chosen with seed."""
    dropped, by_split = Counter(), defaultdict(list)
    for split, roco_id, image, caption in read_roco(args.src, dropped):
        if long_enough(caption):
            by_split[split].append({"id": roco_id, "split": split, "image": image,
                                    "text": caption})
        else:
            dropped["short_text"] += 1
    records = by_split["train"]
    for split in ("val", "test"):
        pairs = sorted(by_split[split], key=lambda r: r["id"])
        random.Random(args.seed).shuffle(pairs)
        records += sorted(pairs[:args.eval_cap], key=lambda r: r["id"])
        dropped[f"over_cap_{split}"] += max(0, len(pairs) - args.eval_cap)
    return [Output(args.out, "retrieval", records, dropped, args.src,
                   {"eval_cap": args.eval_cap})]


MEDICAT_JSONL = "release/s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"


def convert_medicat(args) -> list[Output]:
    """MedICaT radiology figures -> pretrain (caption + inline references), seeded val/test."""
    dropped, kept = Counter(), []
    path = os.path.join(args.src, MEDICAT_JSONL)
    for lineno, fig in read_jsonl(path, ["pdf_hash", "fig_uri", "s2_caption", "radiology"]):
        if not isinstance(fig["radiology"], bool):
            raise PrepareError(f"{path}:{lineno}: 'radiology' is {fig['radiology']!r}: "
                               "expected true or false")
        refs = fig.get("s2orc_references") or []
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise PrepareError(f"{path}:{lineno}: 's2orc_references': expected a list of "
                               "strings or null")
        if not fig["radiology"]:
            dropped["not_radiology"] += 1
            continue
        name = f"{fig['pdf_hash']}_{fig['fig_uri']}"
        image = f"release/figures/{name}"
        texts = keep_texts([fig["s2_caption"], *refs], dropped)
        if not texts:
            dropped["no_text"] += 1
        elif image_exists(args.src, image, dropped):
            kept.append({"id": name, "image": image, "texts": texts})
    split_of = seeded_holdout([r["id"] for r in kept],
                              {"val": args.val_size, "test": args.test_size}, args.seed)
    records = [{"id": r["id"], "split": split_of[r["id"]], **r} for r in kept]
    return [Output(args.out, "pretrain", records, dropped, args.src,
                   {"val_size": args.val_size, "test_size": args.test_size})]


# ----------------------------------------------------------------------------- MIMIC-CXR

MIMIC_SPLITS = {"train": "train", "validate": "val", "test": "test"}


def mimic_image_path(subject_id: str, study_id: str, dicom_id: str) -> str:
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


def read_mimic_split(src: str) -> dict:
    """dicom_id -> (subject_id, study_id, split) from the official split CSV."""
    path = os.path.join(src, "mimic-cxr-2.0.0-split.csv")
    out = {}
    for line, row in read_csv(path, ["dicom_id", "study_id", "subject_id", "split"]):
        if row["split"] not in MIMIC_SPLITS:
            raise PrepareError(f"{path}:{line}: split {row['split']!r}: "
                               f"expected one of {list(MIMIC_SPLITS)}")
        out[row["dicom_id"]] = (row["subject_id"], row["study_id"], MIMIC_SPLITS[row["split"]])
    return out


def read_mimic_sections(path: str) -> dict:
    """study_id (digits, no 's') -> (findings, impression), cleaned."""
    out = {}
    for line, row in read_csv(path, ["study", "findings", "impression"]):
        if not row["study"].startswith("s"):
            raise PrepareError(f"{path}:{line}: study {row['study']!r}: expected 's<digits>'")
        out[row["study"][1:]] = (clean_text(row["findings"]), clean_text(row["impression"]))
    return out


def sections_path(args) -> str:
    return args.sections or os.path.join(args.src, "mimic_cxr_sectioned.csv")


def convert_mimic_cxr(args) -> list[Output]:
    """MIMIC-CXR-JPG frontal (PA/AP) images -> pretrain, findings and impression as texts."""
    dropped, records = Counter(), []
    splits, sections = read_mimic_split(args.src), read_mimic_sections(sections_path(args))
    path = os.path.join(args.src, "mimic-cxr-2.0.0-metadata.csv")
    for line, row in read_csv(path, ["dicom_id", "ViewPosition"]):
        dicom = row["dicom_id"]
        if row["ViewPosition"] not in ("PA", "AP"):
            dropped["not_frontal"] += 1
        elif dicom not in splits:
            dropped["no_split"] += 1
        elif splits[dicom][1] not in sections:
            dropped["no_report"] += 1
        else:
            subject, study, split = splits[dicom]
            texts = keep_texts(sections[study], dropped)
            image = mimic_image_path(subject, study, dicom)
            if not texts:
                dropped["no_text"] += 1
            elif image_exists(args.src, image, dropped):
                records.append({"id": dicom, "split": split, "image": image, "texts": texts})
    return [Output(args.out, "pretrain", records, dropped, args.src)]


def convert_mimic_cxr_ts(args) -> list[Output]:
    """MIMIC-CXR summarization: findings -> impression per study (both >= 3 words)."""
    dropped, records = Counter(), []
    study_split = {}
    for subject, study, split in read_mimic_split(args.src).values():
        if study_split.setdefault(study, split) != split:
            raise PrepareError(f"study {study} is in two official splits")
    for study, (findings, impression) in sorted(read_mimic_sections(sections_path(args)).items()):
        if study not in study_split:
            dropped["no_split"] += 1
        elif not long_enough(findings):
            dropped["short_findings"] += 1
        elif not long_enough(impression):
            dropped["short_impression"] += 1
        else:
            records.append({"id": f"s{study}", "split": study_split[study],
                            "source": findings, "target": impression})
    return [Output(args.out, "ts", records, dropped, None)]


R2GEN_SPLITS = {"train": "train", "val": "val", "test": "test"}


def convert_mimic_cxr_itg(args) -> list[Output]:
    """R2Gen annotation.json -> report generation pairs (one record per image path)."""
    dropped, records = Counter(), []
    path = args.annotation or os.path.join(args.src, "annotation.json")
    root = os.path.abspath(args.images or os.path.join(args.src, "images"))
    annotation = read_json(path)
    if not isinstance(annotation, dict) or set(annotation) - set(R2GEN_SPLITS):
        raise PrepareError(f"{path}: expected an object with keys {list(R2GEN_SPLITS)}")
    for key, entries in annotation.items():
        for i, entry in enumerate(entries):
            where = f"{path}: {key}[{i}]"
            require_keys(entry, ["id", "report", "image_path"], where)
            if not isinstance(entry["image_path"], list) or not entry["image_path"]:
                raise PrepareError(f"{where}: 'image_path': expected a non-empty list")
            report = clean_text(entry["report"])
            if not long_enough(report):
                dropped["short_text"] += 1
                continue
            for k, image in enumerate(entry["image_path"]):
                if image_exists(root, image, dropped):
                    rid = str(entry["id"]) if k == 0 else f"{entry['id']}_{k}"
                    records.append({"id": rid, "split": R2GEN_SPLITS[key], "image": image,
                                    "report": report})
    return [Output(args.out, "itg", records, dropped, root)]


# ----------------------------------------------------------------------------- classification

CHEXPERT_CLASSES = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
# Uncertain (-1) -> 1 ("U-Ones") or 0 ("U-Zeros"), the usual CheXpert competition mapping.
CHEXPERT_UNCERTAIN = {"Atelectasis": 1, "Cardiomegaly": 0, "Consolidation": 0, "Edema": 1,
                      "Pleural Effusion": 1}
CHEXPERT_VALUES = {"": 0, "0": 0, "0.0": 0, "1": 1, "1.0": 1, "-1": -1, "-1.0": -1}


def chexpert_labels(row: dict, where: str) -> list[int]:
    """5 competition labels: blank -> 0, -1 -> CHEXPERT_UNCERTAIN, else 0/1."""
    labels = []
    for name in CHEXPERT_CLASSES:
        value = CHEXPERT_VALUES.get(row[name].strip())
        if value is None:
            raise PrepareError(f"{where}: column '{name}' is {row[name]!r}: "
                               "expected 1, 0, -1 or blank")
        labels.append(CHEXPERT_UNCERTAIN[name] if value == -1 else value)
    return labels


def read_chexpert(src: str, csv_name: str, dropped: Counter) -> list[dict]:
    """Frontal images of train.csv / valid.csv with their labels; paths relative to src."""
    path, kept = os.path.join(src, csv_name), []
    for line, row in read_csv(path, ["Path", "Frontal/Lateral", *CHEXPERT_CLASSES]):
        if row["Frontal/Lateral"] != "Frontal":
            dropped["not_frontal"] += 1
            continue
        labels = chexpert_labels(row, f"{path}:{line}")
        prefix, slash, image = row["Path"].partition("/")  # drop 'CheXpert-v1.0-small/'
        if not slash:
            raise PrepareError(f"{path}:{line}: Path {row['Path']!r}: expected "
                               "'CheXpert-v1.0-small/train|valid/...'")
        if image_exists(src, image, dropped):
            rid = os.path.splitext(image)[0].replace("/", "_")
            kept.append({"id": rid, "image": image, "labels": labels})
    return kept


def convert_chexpert(args) -> list[Output]:
    """CheXpert v1.0-small -> ic; valid.csv = test, seeded val of --val-size train images,
    plus nested 1% / 10% training subsets written to <out>_1pct and <out>_10pct."""
    dropped = Counter()
    train = read_chexpert(args.src, "train.csv", dropped)
    test = [{**r, "split": "test"} for r in read_chexpert(args.src, "valid.csv", dropped)]
    split_of = seeded_holdout([r["id"] for r in train], {"val": args.val_size}, args.seed)
    train = [{**r, "split": split_of[r["id"]]} for r in train]
    val = [r for r in train if r["split"] == "val"]
    train = sorted((r for r in train if r["split"] == "train"), key=lambda r: r["id"])
    random.Random(args.seed).shuffle(train)  # one order, so the 1% subset is inside the 10% one
    extra = {"classes": CHEXPERT_CLASSES, "uncertain_to": CHEXPERT_UNCERTAIN,
             "val_size": args.val_size}
    outputs = [Output(args.out, "ic", train + val + test, dropped, args.src, extra)]
    for pct in args.fractions:
        n = max(1, round(len(train) * pct / 100))
        subset = sorted(train[:n], key=lambda r: r["id"])
        sub_dropped = dropped + Counter({f"outside_{pct}pct_subset": len(train) - n})
        outputs.append(Output(f"{args.out.rstrip('/')}_{pct}pct", "ic", subset + val + test,
                              sub_dropped, args.src, {**extra, "train_percent": pct}))
    return outputs


RSNA_CSV = "stage_2_train_labels.csv"


def convert_rsna(args) -> list[Output]:
    """RSNA Pneumonia stage 2 -> ic (label = any box), seeded 70/15/15 split; the DICOMs are read
    by dicom.read_dicom (as training copies, or directly with --image-size 0)."""
    import_pydicom()
    dropped, positive = Counter(), {}
    path = os.path.join(args.src, RSNA_CSV)
    for line, row in read_csv(path, ["patientId", "Target"]):
        if row["Target"] not in ("0", "1"):
            raise PrepareError(f"{path}:{line}: Target {row['Target']!r}: expected 0 or 1")
        positive[row["patientId"]] = positive.get(row["patientId"], False) or row["Target"] == "1"
    kept = [pid for pid in sorted(positive)
            if image_exists(args.src, f"stage_2_train_images/{pid}.dcm", dropped)]
    n_held = round(0.15 * len(kept))
    split_of = seeded_holdout(kept, {"val": n_held, "test": n_held}, args.seed)
    records = [{"id": pid, "split": split_of[pid], "image": f"stage_2_train_images/{pid}.dcm",
                "labels": [int(positive[pid])]} for pid in kept]
    return [Output(args.out, "ic", records, dropped, args.src, {"classes": ["Pneumonia"]})]


NLI_CLASSES = ["contradiction", "entailment", "neutral"]


def read_nli(path: str, prefix: str, split: str, dropped: Counter) -> list[dict]:
    records = []
    for line, obj in read_jsonl(path, ["sentence1", "sentence2", "gold_label"]):
        if obj["gold_label"] not in NLI_CLASSES:
            raise PrepareError(f"{path}:{line}: gold_label {obj['gold_label']!r}: "
                               f"expected one of {NLI_CLASSES}")
        a, b = clean_text(obj["sentence1"]), clean_text(obj["sentence2"])
        if a and b:
            records.append({"id": f"{prefix}-{line}", "split": split, "text_a": a, "text_b": b,
                            "label": obj["gold_label"]})
        else:
            dropped["empty_text"] += 1
    return records


def convert_radnli(args) -> list[Output]:
    """RadNLI dev -> val, test -> test; MedNLI train (+ optional pseudo-train file) -> train."""
    if not args.mednli:
        raise SystemExit("radnli needs --mednli PATH/mli_train_v1.jsonl for its training split")
    dropped = Counter()
    records = read_nli(args.mednli, "mednli", "train", dropped)
    if args.pseudo_train:
        records += read_nli(args.pseudo_train, "pseudo", "train", dropped)
    records += read_nli(os.path.join(args.src, "radnli_dev_v1.jsonl"), "radnli-dev", "val",
                        dropped)
    records += read_nli(os.path.join(args.src, "radnli_test_v1.jsonl"), "radnli-test", "test",
                        dropped)
    extra = {"classes": NLI_CLASSES, "mednli": os.path.abspath(args.mednli),
             "pseudo_train": args.pseudo_train and os.path.abspath(args.pseudo_train)}
    return [Output(args.out, "tc", records, dropped, None, extra)]


# ----------------------------------------------------------------------------- VQA

ANSWER_TYPES = {"CLOSED": "closed", "OPEN": "open"}


def answer_type(value, where: str) -> str:
    kind = ANSWER_TYPES.get(str(value).strip().upper())
    if kind is None:
        raise PrepareError(f"{where}: answer_type {value!r}: expected OPEN or CLOSED")
    return kind


def vqa_record(rid, split, image, question, answer, kind, dropped: Counter) -> dict | None:
    """A normalised VQA record, or None (counted) when question or answer is empty."""
    question, answer = clean_text(question), normalize_answer(answer)
    if not question or not answer:
        dropped["empty_text"] += 1
        return None
    return {"id": rid, "split": split, "image": image, "question": question, "answer": answer,
            "answer_type": kind}


def convert_vqa_rad(args) -> list[Output]:
    """VQA-RAD: test = phrase_type contains 'test'; a seeded --val-size questions held out of
    train as validation (the release has no validation set). Ids are the qids."""
    dropped, records, seen = Counter(), [], set()
    path = os.path.join(args.src, "VQA_RAD Dataset Public.json")
    keys = ["qid", "image_name", "question", "answer", "answer_type", "phrase_type"]
    for where, e in json_entries(path, keys):
        if str(e["qid"]) in seen:
            raise PrepareError(f"{where}: qid {e['qid']!r} repeats an earlier entry")
        seen.add(str(e["qid"]))
        split = "test" if "test" in str(e["phrase_type"]) else "train"
        image = f"{args.image_dir}/{e['image_name']}"
        kind = answer_type(e["answer_type"], where)
        r = vqa_record(str(e["qid"]), split, image, e["question"], e["answer"], kind, dropped)
        if r and image_exists(args.src, image, dropped):
            records.append(r)
    train_ids = [r["id"] for r in records if r["split"] == "train"]
    split_of = seeded_holdout(train_ids, {"val": args.val_size}, args.seed)
    records = [{**r, "split": split_of.get(r["id"], r["split"])} for r in records]
    return [vqa_output(args.out, args.src, records, dropped, {"val_size": args.val_size,
                                                "val_note": "seeded hold-out of train"})]


SLAKE_FILES = {"train": "train.json", "val": "validate.json", "test": "test.json"}


def convert_slake(args) -> list[Output]:
    """SLAKE English questions; official train / validate / test files."""
    dropped, records = Counter(), []
    for split, name in SLAKE_FILES.items():
        keys = ["qid", "img_name", "question", "answer", "q_lang", "answer_type"]
        for where, e in json_entries(os.path.join(args.src, name), keys):
            if e["q_lang"] != "en":
                dropped["not_english"] += 1
                continue
            image = f"imgs/{e['img_name']}"
            kind = answer_type(e["answer_type"], where)
            r = vqa_record(f"{split}-{e['qid']}", split, image, e["question"], e["answer"],
                           kind, dropped)
            if r and image_exists(args.src, image, dropped):
                records.append(r)
    return [vqa_output(args.out, args.src, records, dropped, {})]


MED19_CATEGORIES = ("modality", "plane", "organ", "abnormality")


def read_pipe_file(path: str, n_fields: int):
    """Yield (line, fields) of a '|'-separated text file with exactly n_fields per line."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                fields = line.rstrip("\r\n").split("|")
                if len(fields) != n_fields:
                    raise PrepareError(f"{path}:{lineno}: expected {n_fields} '|'-separated "
                                       f"fields, got {len(fields)}")
                yield lineno, fields


def med19_answer_type(answer: str) -> str:
    """VQA-Med 2019 has no answer types: yes/no answers are 'closed', the rest 'open'."""
    return "closed" if answer in ("yes", "no") else "open"


def convert_vqa_med_2019(args) -> list[Output]:
    """VQA-Med 2019: All_QA_Pairs_{train,val}.txt and the test file with '#' alternatives;
    abnormality (C4) questions dropped unless --keep-abnormality."""
    dropped, records = Counter(), []
    for split, images in (("train", "Train_images"), ("val", "Val_images")):
        image_dir = os.path.relpath(find_file(args.src, images), args.src)
        c4 = set()
        if not args.keep_abnormality:
            c4_path = find_file(args.src, f"C4_Abnormality_{split}.txt")
            c4 = {(f[0], f[1]) for _, f in read_pipe_file(c4_path, 3)}
        path = find_file(args.src, f"All_QA_Pairs_{split}.txt")
        for line, (image_id, question, answer) in read_pipe_file(path, 3):
            if (image_id, question) in c4:
                dropped["abnormality"] += 1
                continue
            image = f"{image_dir}/{image_id}.jpg"
            r = vqa_record(f"{split}-{line}", split, image, question, answer,
                           med19_answer_type(normalize_answer(answer)), dropped)
            if r and image_exists(args.src, image, dropped):
                records.append(r)
    records += med19_test(args, dropped)
    return [vqa_output(args.out, args.src, records, dropped, {"keep_abnormality": args.keep_abnormality})]


def med19_test(args, dropped: Counter) -> list[dict]:
    """Test lines image|category|question|answer; 'answers' keeps every '#' alternative."""
    path = find_file(args.src, args.test_file)
    image_dir = os.path.relpath(find_file(args.src, args.test_images), args.src)
    records = []
    for line, (image_id, category, question, answer) in read_pipe_file(path, 4):
        if category not in MED19_CATEGORIES:
            raise PrepareError(f"{path}:{line}: category {category!r}: "
                               f"expected one of {list(MED19_CATEGORIES)}")
        if category == "abnormality" and not args.keep_abnormality:
            dropped["abnormality"] += 1
            continue
        answers = [a for a in map(normalize_answer, answer.split("#")) if a]
        first = answers[0] if answers else ""
        image = f"{image_dir}/{image_id}.jpg"
        r = vqa_record(f"test-{line}", "test", image, question, first,
                       med19_answer_type(first), dropped)
        if r and image_exists(args.src, image, dropped):
            records.append({**r, "answers": answers})
    return records


# ----------------------------------------------------------------------------- your own data

TABLE_COLUMNS = {  # task -> the table columns it needs (--columns FIELD=NAME renames them)
    "pretrain": ("image", "text"), "retrieval": ("image", "text"), "itg": ("image", "report"),
    "ic": ("image", "labels"), "vqa": ("image", "question", "answer"), "tc": ("text_a", "text_b", "label"),
    "ts": ("source", "target")}
OPTIONAL_COLUMNS = ("id", "split", "answer_type")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
               "test": "test"}


class BadRow(ValueError):
    """A row that cannot become a record; its message is the reason counted in meta["rows"]."""


def table_rows(path: str, names: list[str]):
    """Yield (line, row) of a CSV (header line) or JSONL table, row = {column: str}, or (line, BadRow)
    for a malformed line; a CSV header without the `names` columns raises PrepareError."""
    if path.endswith((".jsonl", ".jsonl.gz")):
        with open_text(path) as f:
            for line, text in enumerate(f, start=1):
                if text.strip():
                    try:
                        obj = json.loads(text)
                        yield line, obj if isinstance(obj, dict) else BadRow("malformed_row")
                    except json.JSONDecodeError:
                        yield line, BadRow("malformed_row")
        return
    with open_text(path) as f:
        reader = csv_rows(f, path, names, " (name them with --columns FIELD=NAME)")
        for row in reader:
            yield reader.line_num, BadRow("malformed_row") if wrong_length(row) else row


def folder_rows(root: str):
    """Yield (path, row) for each file of a folder-per-class tree ROOT/[SPLIT/]CLASS/...; a row is
    {image, labels, split?} (BadRow for a file that is not an image)."""
    top = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    splits = [d for d in top if d in SPLIT_NAMES]
    for split_dir in splits or [""]:
        for label in sorted(os.listdir(os.path.join(root, split_dir))):
            for folder, _, files in sorted(os.walk(os.path.join(root, split_dir, label))):
                for name in sorted(files):
                    rel = os.path.relpath(os.path.join(folder, name), root)
                    row = {"image": rel, "labels": label, **({"split": split_dir} if split_dir else {})}
                    yield rel, row if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES else BadRow("not_an_image")


def table_text(row: dict, column: str, min_words: int = 1) -> str:
    text = clean_text(str(row[column]))
    if not text:
        raise BadRow("empty_text")
    if len(text.split()) < min_words:
        raise BadRow("short_text")
    return text


def table_label(value, classes: set | None, many: bool, sep: str) -> list[str]:
    """The class names of one row: one (`many` False) or several (a list, or `sep`-separated)."""
    names = value if isinstance(value, list) else str(value).split(sep) if many else [value]
    names = [clean_text(str(n)) for n in names if clean_text(str(n))]
    if not names:
        raise BadRow("empty_label")
    if classes is not None and not set(names) <= classes:
        raise BadRow("unknown_label")
    return names


def table_record(task: str, row: dict, col: dict, args) -> dict:
    """The task fields of one good row (image relative to --image-root); BadRow otherwise."""
    missing = [f for f in TABLE_COLUMNS[task] if col[f] not in row]
    if missing:
        raise BadRow("missing_field")
    fields = {}
    if "image" in TABLE_COLUMNS[task]:
        path = str(row[col["image"]]).strip()
        rel = os.path.relpath(os.path.join(args.image_root, path), args.image_root) if path else ""
        if rel.startswith(".."):
            raise BadRow("outside_image_root")
        if not path or not os.path.isfile(os.path.join(args.image_root, rel)):
            raise BadRow("missing_image")
        fields["image"] = rel.replace(os.sep, "/")
    classes = set(args.classes) if args.classes else None
    if task in ("pretrain", "retrieval", "itg"):
        fields["report" if task == "itg" else "text"] = table_text(row, col[TABLE_COLUMNS[task][1]], MIN_WORDS)
    elif task == "ts":
        fields.update(source=table_text(row, col["source"], MIN_WORDS), target=table_text(row, col["target"], MIN_WORDS))
    elif task == "tc":
        fields.update(text_a=table_text(row, col["text_a"]), text_b=table_text(row, col["text_b"]),
                      label=table_label(row[col["label"]], classes, False, "")[0])
    elif task == "ic":
        fields["labels"] = table_label(row[col["labels"]], classes, True, args.label_sep)
    elif task == "vqa":
        answer = normalize_answer(row[col["answer"]])
        if not answer:
            raise BadRow("empty_text")
        kind = row.get(col["answer_type"]) or ("CLOSED" if answer in ("yes", "no") else "OPEN")
        if str(kind).strip().upper() not in ANSWER_TYPES:
            raise BadRow("unknown_answer_type")
        fields.update(question=table_text(row, col["question"]), answer=answer,
                      answer_type=ANSWER_TYPES[str(kind).strip().upper()])
    split = row.get(col["split"], "")
    if split not in ("", None) and str(split).strip().lower() not in SPLIT_NAMES:
        raise BadRow("unknown_split")
    fields["split"] = SPLIT_NAMES.get(str(split).strip().lower()) if split else None
    return fields


def table_outputs(task: str, kept: list[dict], args) -> list[dict]:
    """Records from the good rows: pre-training texts grouped by image, a class list made, splits
    given or seeded (--holdout: by image for image tasks, by row otherwise)."""
    if task == "pretrain":
        by_image = {}
        for r in kept:
            by_image.setdefault(r["image"], {"id": r["image"], "split": r["split"], "image": r["image"], "texts": []})
            by_image[r["image"]]["texts"].append(r.pop("text"))
        kept = list(by_image.values())
    key = "image" if task in IMAGE_TASKS else "id"
    unsplit = [r[key] for r in kept if r["split"] is None]
    if unsplit:
        n = len(set(unsplit))
        sizes = {"val": round(args.holdout[0] * n), "test": round(args.holdout[1] * n)}
        split_of = seeded_holdout(unsplit, sizes, args.seed)
        kept = [{**r, "split": r["split"] or split_of[r[key]]} for r in kept]
    return kept


def convert_table(args) -> list[Output]:
    """Your own CSV / JSONL table (one row per example, columns by --columns) or folder-per-class
    tree -> the manifest of --task; every bad row is counted by reason and listed, file:line, in
    OUT/bad_rows.txt; meta["rows"] adds up to every row read."""
    is_folder = os.path.isdir(args.src)
    task = "ic" if is_folder and args.task is None else args.task
    if task not in TABLE_COLUMNS or (is_folder and task != "ic"):
        raise SystemExit(f"prepare.py table needs --task {'ic (a folder of class folders)' if is_folder else 'one of ' + str(list(TABLE_COLUMNS))}")
    col = {f: f for f in (*TABLE_COLUMNS[task], *OPTIONAL_COLUMNS)}
    for pair in args.columns:
        field_name, eq, name = pair.partition("=")
        if not eq or field_name not in col:
            raise SystemExit(f"--columns {pair!r}: expected FIELD=NAME with FIELD one of {list(col)}")
        col[field_name] = name
    args.image_root = os.path.abspath(args.image_root or (args.src if is_folder else os.path.dirname(args.src)))
    rows = folder_rows(args.src) if is_folder else table_rows(args.src, [col[f] for f in TABLE_COLUMNS[task]])
    kept, bad, seen, split_of_image = [], [], set(), {}
    for where, row in rows:
        try:
            if isinstance(row, BadRow):
                raise row
            fields = table_record(task, row, col, args)
            rid = str(row.get(col["id"]) or where)
            if rid in seen:
                raise BadRow("duplicate_id")
            if task in IMAGE_TASKS and split_of_image.setdefault(fields["image"], fields["split"]) != fields["split"]:
                raise BadRow("split_conflict")
        except BadRow as reason:
            bad.append((f"{args.src}:{where}" if not is_folder else where, str(reason)))
            continue
        seen.add(rid)
        kept.append({"id": rid, **fields})
    records = table_outputs(task, kept, args)
    reasons = Counter(reason for _, reason in bad)
    summary = {"read": len(kept) + len(bad), "kept": len(kept), **dict(sorted(reasons.items()))}
    write_bad_rows(args.out, bad, summary)
    extra = {"rows": summary, "columns": col, "table": os.path.abspath(args.src)}
    if task in ("ic", "tc"):
        key = "labels" if task == "ic" else "label"
        classes = args.classes or sorted({c for r in records for c in (r[key] if task == "ic" else [r[key]])})
        if task == "ic":
            records = [{**r, "labels": [int(c in r["labels"]) for c in classes]} for r in records]
        extra["classes"] = classes
    root = args.image_root if "image" in TABLE_COLUMNS[task] else None
    if task == "vqa":
        return [vqa_output(args.out, root, records, reasons, extra)]
    return [Output(args.out, task, records, reasons, root, extra)]


def write_bad_rows(out: str, bad: list[tuple[str, str]], summary: dict) -> None:
    """OUT/bad_rows.txt ('file:line<TAB>reason' a line; removed when none) and the summary printed."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "bad_rows.txt")
    if bad:
        atomic_write(Path(path), "".join(f"{where}\t{reason}\n" for where, reason in bad))
        shown = "; ".join(f"{w}: {r}" for w, r in bad[:5])
        print(f"{len(bad)} bad rows (listed in {path}), first: {shown}")
    elif os.path.exists(path):
        os.unlink(path)
    print(f"rows: {summary}")


# ----------------------------------------------------------------------------- writing / CLI

CONVERTERS = {
    "roco": convert_roco,
    "roco-retrieval": convert_roco_retrieval,
    "medicat": convert_medicat,
    "mimic-cxr": convert_mimic_cxr,
    "mimic-cxr-ts": convert_mimic_cxr_ts,
    "mimic-cxr-itg": convert_mimic_cxr_itg,
    "chexpert": convert_chexpert,
    "rsna": convert_rsna,
    "radnli": convert_radnli,
    "vqa-rad": convert_vqa_rad,
    "slake": convert_slake,
    "vqa-med-2019": convert_vqa_med_2019,
    "table": convert_table,
}
IMAGE_TASKS = ("pretrain", "ic", "retrieval", "itg")


def write_output(out: Output, name: str, args) -> dict:
    """Check split disjointness, print the counts and write manifest.jsonl + meta.json."""
    check_disjoint(out.records, "image" if out.task in IMAGE_TASKS else "id")
    counts = {s: sum(r["split"] == s for r in out.records) for s in ("train", "val", "test")}
    meta = {"task": out.task, "name": name, "seed": args.seed,
            "source": os.path.abspath(args.src), "counts": counts,
            "dropped": dict(sorted(out.dropped.items()))}
    if out.image_root:
        meta["image_root"] = os.path.abspath(out.image_root)
    meta.update(out.extra)
    write_manifest(out.folder, out.records, meta)
    print(f"{name} -> {out.folder}: kept {counts}, dropped {meta['dropped']}")
    return meta


def use_copies(outputs: list[Output], args) -> list[Output]:
    """Make the training-size copies of every image the outputs reference (copies.py) in
    <out>/images_<size>px and point the outputs at them; unreadable sources are dropped, counted
    ('unreadable_image') and listed in <out>/unreadable_images.txt."""
    roots = {os.path.abspath(o.image_root) for o in outputs if o.image_root}
    if not roots:
        return outputs
    (root,) = roots  # every converter reads one image folder
    rels = sorted({r["image"] for o in outputs if o.image_root for r in o.records})
    if any(map(is_dicom, rels)):
        import_pydicom()
    folder = os.path.abspath(os.path.join(args.out, f"images_{args.image_size}px"))
    failed = make_copies(root, rels, folder, args.image_size, args.workers)
    listing = os.path.join(args.out, "unreadable_images.txt")
    if failed:
        os.makedirs(args.out, exist_ok=True)
        atomic_write(Path(listing), "".join(f"{rel}\t{why}\n" for rel, why in sorted(failed.items())))
        print(f"{len(failed)} unreadable images left out, listed in {listing}")
    elif os.path.exists(listing):
        os.unlink(listing)
    for o in outputs:
        if o.image_root:
            kept = [{**r, "image": copy_name(r["image"])} for r in o.records if r["image"] not in failed]
            if len(kept) < len(o.records):
                o.dropped["unreadable_image"] += len(o.records) - len(kept)
            if "rows" in o.extra:  # `table`: its rows of unreadable images leave "kept" too
                lost = sum(len(r.get("texts", [r])) for r in o.records if r["image"] in failed)
                o.extra["rows"] = {**o.extra["rows"], "kept": o.extra["rows"]["kept"] - lost,
                                   **({"unreadable_image": lost} if lost else {})}
            o.records, o.image_root = kept, folder
            o.extra = {**o.extra, "image_size": args.image_size, "originals": root}
    return outputs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/DATASETS.md for each release layout.")
    p.add_argument("dataset", choices=sorted(CONVERTERS), help="which release to convert")
    p.add_argument("--src", required=True, help="root folder of the raw release")
    p.add_argument("--out", required=True, help="task folder to write, e.g. data/roco")
    p.add_argument("--seed", type=int, default=42, help="seed of every random split / sample")
    p.add_argument("--image-size", type=int, default=512,
                   help="write copies of the images with this shorter side (pixels) into "
                        "OUT/images_<size>px and train from them (512 serves the 288-px pre-training "
                        "and 384-px fine-tuning crops); 0: point at the originals (every epoch then "
                        "decodes full-size files)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes making the copies (default: one per core)")
    g = p.add_argument_group("roco-retrieval")
    g.add_argument("--eval-cap", type=int, default=2000, help="max val and test pairs each")
    g = p.add_argument_group("medicat / chexpert / vqa-rad hold-out sizes")
    g.add_argument("--val-size", type=int, default=None,
                   help="validation items held out of train (default: medicat 1000, "
                        "chexpert 5000, vqa-rad 300)")
    g.add_argument("--test-size", type=int, default=1000, help="medicat test figures")
    g = p.add_argument_group("mimic-cxr, mimic-cxr-ts, mimic-cxr-itg")
    g.add_argument("--sections",
                   help="mimic_cxr_sectioned.csv (default: SRC/mimic_cxr_sectioned.csv)")
    g.add_argument("--annotation", help="R2Gen annotation.json (default: SRC/annotation.json)")
    g.add_argument("--images", help="R2Gen image folder (default: SRC/images)")
    g = p.add_argument_group("chexpert")
    g.add_argument("--fractions", type=int, nargs="*", default=[1, 10],
                   help="also write <out>_<P>pct folders training on P%% of train (nested, "
                        "seeded; same val/test); pass no value to skip")
    g = p.add_argument_group("radnli")
    g.add_argument("--mednli", help="MedNLI mli_train_v1.jsonl (the training split)")
    g.add_argument("--pseudo-train", help="optional extra training JSONL (sentence1, sentence2, "
                                          "gold_label), e.g. the 6,000-pair pseudo-train set")
    g = p.add_argument_group("vqa-rad")
    g.add_argument("--image-dir", default="VQA_RAD Image Folder", help="image folder under SRC")
    g = p.add_argument_group("table: your own CSV / JSONL (SRC is the file) or folder-per-class tree (SRC/CLASS/...)")
    g.add_argument("--task", choices=sorted(TABLE_COLUMNS),
                   help="the manifest to write; a table's columns: " + "; ".join(
                       f"{t}: {', '.join(c)}" for t, c in TABLE_COLUMNS.items()) + " (optional: id, split, answer_type)")
    g.add_argument("--columns", nargs="*", default=[], metavar="FIELD=NAME",
                   help="the table's name of a column, e.g. image=path text=caption split=fold")
    g.add_argument("--classes", nargs="+", help="ic / tc: the known class names (others are bad rows; "
                                                "default: every label seen, sorted)")
    g.add_argument("--label-sep", default="|", help="ic: separator of several labels in one cell")
    g.add_argument("--image-root", help="folder the image paths are relative to (default: the table's)")
    g.add_argument("--holdout", type=float, nargs=2, default=[0.1, 0.1], metavar=("VAL", "TEST"),
                   help="fractions held out, seeded, when the table has no split column")
    g = p.add_argument_group("vqa-med-2019")
    g.add_argument("--keep-abnormality", action="store_true",
                   help="keep C4 abnormality questions (M3AE/PTUnifier drop them)")
    g.add_argument("--test-file", default="VQAMed2019_Test_Questions_w_Ref_Answers.txt",
                   help="name of the test file (image|category|question|answer) under SRC")
    g.add_argument("--test-images", default="VQAMed2019_Test_Images",
                   help="name of the test image folder under SRC")
    return p


DEFAULT_VAL_SIZE = {"medicat": 1000, "chexpert": 5000, "vqa-rad": 300}


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.val_size is None:
        args.val_size = DEFAULT_VAL_SIZE.get(args.dataset, 0)
    outputs = CONVERTERS[args.dataset](args)
    if args.image_size:
        outputs = use_copies(outputs, args)
    return [write_output(out, args.dataset, args) for out in outputs]


if __name__ == "__main__":
    main()
