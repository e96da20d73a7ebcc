"""Tests for prepare.py: tiny fixture releases in each official layout (docs/DATASETS.md) are
converted and the manifests are read back with data.read_manifest and checked by hand."""
import csv
import gzip
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

import data
import prepare
from copies import copy_name
from data import read_manifest
from prepare import PrepareError
from tokenizer import clean_text


# ----------------------------------------------------------------------------- fixture helpers

def jpg(path):
    """A tiny real image file (JPEG or PNG by extension)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_csv(path, header, rows, gz=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    opener = gzip.open if gz else open
    with opener(path + (".gz" if gz else ""), "wt", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def run(name, src, out, *flags):
    """Run the converter and read back the first manifest it wrote."""
    prepare.main([name, "--src", str(src), "--out", str(out), *flags])
    return read_manifest(out)


def by_id(records):
    return {r["id"]: r for r in records}


def assert_disjoint(records, key):
    splits = {}
    for r in records:
        splits.setdefault(r[key], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values())


def assert_images_exist(records, meta):
    """Every record's image exists, and so does the original its training copy was made from."""
    for r in records:
        assert os.path.isfile(os.path.join(meta["image_root"], r["image"])), r["image"]
        if "originals" in meta:
            assert r["image"].endswith(".tif") and os.path.isfile(os.path.join(meta["originals"], r["image"][:-4]))


# ----------------------------------------------------------------------------- shared helpers

def test_clean_text_and_answer_normalisation():
    assert clean_text("  a\t b\n\nc  ") == "a b c"
    assert clean_text(None) == ""
    assert data.normalize_answer("  Left  Lung. ") == "left lung"
    assert data.normalize_answer("Yes") == "yes"
    assert data.normalize_answer(2) == "2"
    assert data.normalize_answer("Right\u200b lung?") == "right lung"


def test_seeded_holdout_is_deterministic_disjoint_and_sized():
    keys = [f"k{i}" for i in range(50)]
    a = prepare.seeded_holdout(keys, {"val": 5, "test": 7}, seed=1)
    assert a == prepare.seeded_holdout(list(reversed(keys)), {"val": 5, "test": 7}, seed=1)
    assert a != prepare.seeded_holdout(keys, {"val": 5, "test": 7}, seed=2)
    assert sorted(a) == sorted(keys)
    assert list(a.values()).count("val") == 5 and list(a.values()).count("test") == 7
    with pytest.raises(PrepareError, match="cannot hold out"):
        prepare.seeded_holdout(keys[:3], {"val": 2, "test": 2}, seed=1)


def test_check_disjoint_refuses_overlap():
    prepare.check_disjoint([{"image": "a", "split": "train"}, {"image": "a", "split": "train"}],
                           "image")
    with pytest.raises(AssertionError, match="'a' is in both train and test"):
        prepare.check_disjoint([{"image": "a", "split": "train"},
                                {"image": "a", "split": "test"}], "image")


def test_cli_refuses_unknown_flags_and_datasets(tmp_path):
    with pytest.raises(SystemExit):
        prepare.main(["roco", "--src", str(tmp_path), "--out", str(tmp_path), "--bogus", "1"])
    with pytest.raises(SystemExit):
        prepare.main(["imagenet", "--src", str(tmp_path), "--out", str(tmp_path)])


def test_rsna_without_pydicom_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` fail
    with pytest.raises(SystemExit, match="pip install pydicom"):
        prepare.main(["rsna", "--src", str(tmp_path), "--out", str(tmp_path / "out")])


# ----------------------------------------------------------------------------- ROCO

def make_roco(root):
    entries = {"train": [("ROCO_00001", " CT scan of the   chest."),
                         ("ROCO_00002", " Axial MRI brain"),
                         ("ROCO_00003", " Too short"), ("ROCO_00004", " image file is missing")],
               "validation": [(f"ROCO_1000{i}", f" Val caption number {i}") for i in range(3)],
               "test": [(f"ROCO_2000{i}", f" Test caption number {i}") for i in range(3)]}
    for leaf, rows in entries.items():
        folder = root / "data" / leaf / "radiology"
        write(folder / "captions.txt", "".join(f"{i}\t{c}\n" for i, c in rows))
        for roco_id, _ in rows:
            if roco_id != "ROCO_00004":
                jpg(folder / "images" / f"{roco_id}.jpg")
        # the non-radiology subset must be ignored
        write(root / "data" / leaf / "non-radiology" / "captions.txt", "ROCO_9\t a b c d\n")


def test_roco_pretrain(tmp_path):
    make_roco(tmp_path / "roco")
    records, meta = run("roco", tmp_path / "roco", tmp_path / "out")
    recs = by_id(records)
    assert recs["ROCO_00001"]["texts"] == ["CT scan of the chest."]
    assert recs["ROCO_00001"]["image"] == copy_name("data/train/radiology/images/ROCO_00001.jpg")
    assert {r["split"] for r in records if r["id"].startswith("ROCO_1")} == {"val"}
    assert meta["counts"] == {"train": 2, "val": 3, "test": 3}
    assert meta["dropped"] == {"missing_image": 1, "short_text": 1, "no_text": 1}
    assert meta["originals"] == str((tmp_path / "roco").resolve()) and meta["seed"] == 42
    assert meta["image_root"] == str((tmp_path / "out" / "images_512px").resolve()) and meta["image_size"] == 512
    assert_images_exist(records, meta)
    assert_disjoint(records, "image")


def test_roco_retrieval_caps_eval_splits_with_seed(tmp_path):
    make_roco(tmp_path / "roco")
    records, meta = run("roco-retrieval", tmp_path / "roco", tmp_path / "a", "--eval-cap", "2")
    again, _ = run("roco-retrieval", tmp_path / "roco", tmp_path / "b", "--eval-cap", "2")
    assert records == again
    assert meta["task"] == "retrieval" and meta["counts"] == {"train": 2, "val": 2, "test": 2}
    assert meta["dropped"]["over_cap_val"] == 1 and meta["dropped"]["over_cap_test"] == 1
    assert by_id(records)["ROCO_00002"]["text"] == "Axial MRI brain"


def test_roco_malformed_line_names_file_and_line(tmp_path):
    make_roco(tmp_path / "roco")
    path = tmp_path / "roco" / "data" / "test" / "radiology" / "captions.txt"
    write(path, "ROCO_20000\t fine caption here\nno tab on this line\n")
    with pytest.raises(PrepareError, match=r"captions.txt:2: "):
        run("roco", tmp_path / "roco", tmp_path / "out")


# ----------------------------------------------------------------------------- MedICaT

def test_medicat(tmp_path):
    src = tmp_path / "medicat"
    figs = [{"pdf_hash": f"h{i}", "fig_key": f"k{i}", "fig_uri": f"Figure{i}-1.png",
             "s2_caption": f"Caption of  radiology figure {i}", "s2orc_references": None,
             "radiology": True, "oa_info": {}} for i in range(6)]
    figs[0]["s2orc_references"] = ["As shown in Figure 1 the lesion", "ok"]
    figs[1]["radiology"] = False
    figs[2]["fig_uri"] = "missing.png"
    lines = [json.dumps(f) for f in figs]
    write(src / prepare.MEDICAT_JSONL, "\n".join(lines) + "\n")
    for f in figs:
        if f["fig_uri"] != "missing.png":
            jpg(src / "release" / "figures" / f"{f['pdf_hash']}_{f['fig_uri']}")
    records, meta = run("medicat", src, tmp_path / "out", "--val-size", "1", "--test-size", "1")
    assert meta["counts"] == {"train": 2, "val": 1, "test": 1}
    assert meta["dropped"] == {"not_radiology": 1, "missing_image": 1, "short_text": 1}
    assert by_id(records)["h0_Figure0-1.png"]["texts"] == [
        "Caption of radiology figure 0", "As shown in Figure 1 the lesion"]
    assert_images_exist(records, meta)
    assert_disjoint(records, "image")

    write(src / prepare.MEDICAT_JSONL, lines[0] + "\n{not json\n")
    with pytest.raises(PrepareError, match=r"public.jsonl:2: malformed JSON"):
        run("medicat", src, tmp_path / "out2", "--val-size", "0", "--test-size", "0")


# ----------------------------------------------------------------------------- MIMIC-CXR

def make_mimic(root):
    """Subjects 10000001 (train, 2 studies), 10000002 (validate), 10000003 (test)."""
    split_rows, meta_rows, sections = [], [], []
    # (subject, study, split, view, findings, impression)
    studies = [("10000001", "50000001", "train", "PA", "The lungs are clear.",
                "No acute disease."),
               ("10000001", "50000002", "train", "AP", "Short one",
                "Stable  cardiomegaly is seen."),
               ("10000002", "50000003", "validate", "PA", "Heart size is normal.",
                "Normal chest radiograph."),
               ("10000003", "50000004", "test", "AP", "Small left effusion noted.",
                "Small effusion")]
    for subject, study, split, view, findings, impression in studies:
        for view_k, dicom in ((view, f"d{study}"), ("LATERAL", f"lat{study}")):
            split_rows.append((dicom, study, subject, split))
            meta_rows.append((dicom, subject, study, view_k))
            jpg(root / prepare.mimic_image_path(subject, study, dicom))
        sections.append((f"s{study}", impression, findings, "", ""))
    split_rows.append(("dmissing", "50000001", "10000001", "train"))  # no image file
    meta_rows.append(("dmissing", "10000001", "50000001", "PA"))
    write_csv(str(root / "mimic-cxr-2.0.0-split.csv"),  # gzipped, as in the real release
              ["dicom_id", "study_id", "subject_id", "split"], split_rows, gz=True)
    write_csv(str(root / "mimic-cxr-2.0.0-metadata.csv"),
              ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta_rows)
    write_csv(str(root / "mimic_cxr_sectioned.csv"),
              ["study", "impression", "findings", "last_paragraph", "comparison"], sections)


def test_mimic_cxr_pretrain(tmp_path):
    make_mimic(tmp_path / "mimic")
    records, meta = run("mimic-cxr", tmp_path / "mimic", tmp_path / "out")
    recs = by_id(records)
    assert set(recs) == {"d50000001", "d50000002", "d50000003", "d50000004"}
    assert recs["d50000001"]["texts"] == ["The lungs are clear.", "No acute disease."]
    assert recs["d50000002"]["texts"] == ["Stable cardiomegaly is seen."]
    assert [recs[f"d5000000{i}"]["split"] for i in (1, 3, 4)] == ["train", "val", "test"]
    assert recs["d50000004"]["image"] == copy_name("files/p10/p10000003/s50000004/d50000004.jpg")
    assert meta["dropped"] == {"not_frontal": 4, "missing_image": 1, "short_text": 2}
    assert_images_exist(records, meta)
    assert_disjoint(records, "image")


def test_mimic_cxr_summarization(tmp_path):
    make_mimic(tmp_path / "mimic")
    records, meta = run("mimic-cxr-ts", tmp_path / "mimic", tmp_path / "out")
    assert by_id(records) == {
        "s50000001": {"id": "s50000001", "split": "train", "source": "The lungs are clear.",
                      "target": "No acute disease."},
        "s50000003": {"id": "s50000003", "split": "val", "source": "Heart size is normal.",
                      "target": "Normal chest radiograph."}}
    assert meta["dropped"] == {"short_findings": 1, "short_impression": 1}
    assert "image_root" not in meta


def test_mimic_bad_csv_row_names_file_and_line(tmp_path):
    make_mimic(tmp_path / "mimic")
    path = tmp_path / "mimic" / "mimic-cxr-2.0.0-metadata.csv"
    with open(path, "a") as f:
        f.write("x,1,2,PA,extra\n")
    with pytest.raises(PrepareError, match=r"metadata.csv:11: expected 4 fields"):
        run("mimic-cxr", tmp_path / "mimic", tmp_path / "out")


def test_mimic_cxr_report_generation(tmp_path):
    src = tmp_path / "r2gen"
    ann = {s: [{"id": f"{s}{i}", "study_id": i, "subject_id": i, "split": s,
                "report": f"The {s}  report number {i} .",
                "image_path": [f"p10/p1/s{i}/{s}{i}.jpg"]}
               for i in range(2)] for s in ("train", "val", "test")}
    ann["train"][1]["report"] = "normal."
    ann["test"][1]["image_path"] = ["p10/p1/s9/absent.jpg"]
    write(src / "annotation.json", json.dumps(ann))
    for s in ann:
        for e in ann[s]:
            if "absent" not in e["image_path"][0]:
                jpg(src / "images" / e["image_path"][0])
    records, meta = run("mimic-cxr-itg", src, tmp_path / "out")
    assert meta["counts"] == {"train": 1, "val": 2, "test": 1}
    assert meta["dropped"] == {"short_text": 1, "missing_image": 1}
    assert by_id(records)["val1"]["report"] == "The val report number 1 ."
    assert meta["originals"] == str((src / "images").resolve())
    assert_images_exist(records, meta)


# ----------------------------------------------------------------------------- CheXpert

CHEX_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Atelectasis",
               "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def chex_row(root, split, i, view="Frontal", labels=("", "", "", "", "")):
    path = f"CheXpert-v1.0-small/{split}/patient{i:05d}/study1/view1_frontal.jpg"
    jpg(root / path.split("/", 1)[1])
    return [path, "Male", "60", view, "PA", ""] + list(labels)


def test_chexpert_labels_splits_and_subsets(tmp_path):
    src = tmp_path / "CheXpert-v1.0-small"
    # labels in column order Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion
    train = [chex_row(src, "train", 0, labels=("-1.0", "-1.0", "-1.0", "-1.0", "-1.0")),
             chex_row(src, "train", 1, labels=("1.0", "0.0", "", "1.0", "0.0")),
             chex_row(src, "train", 2, view="Lateral")]
    train += [chex_row(src, "train", i, labels=("0.0", "1.0", "1.0", "", "")) for i in range(3, 23)]
    missing = chex_row(src, "train", 99)
    os.remove(src / "train/patient00099/study1/view1_frontal.jpg")
    write_csv(str(src / "train.csv"), CHEX_HEADER, train + [missing])
    write_csv(str(src / "valid.csv"), CHEX_HEADER,
              [chex_row(src, "valid", i, labels=("1.0", "", "", "", "-1.0")) for i in range(3)])

    records, meta = run("chexpert", src, tmp_path / "chexpert", "--val-size", "4")
    recs = by_id(records)
    assert meta["classes"] == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                               "Pleural Effusion"]
    assert recs["train_patient00000_study1_view1_frontal"]["labels"] == [1, 0, 0, 1, 1]
    assert recs["train_patient00001_study1_view1_frontal"]["labels"] == [1, 0, 0, 1, 0]
    assert recs["valid_patient00000_study1_view1_frontal"]["labels"] == [1, 0, 0, 0, 1]
    assert meta["counts"] == {"train": 18, "val": 4, "test": 3}
    assert meta["dropped"] == {"not_frontal": 1, "missing_image": 1}
    assert all(r["image"].startswith("valid/") for r in records if r["split"] == "test")
    assert_images_exist(records, meta)
    assert_disjoint(records, "image")

    train_ids = {r["id"] for r in records if r["split"] == "train"}
    held = {r["id"] for r in records if r["split"] != "train"}
    sub1, m1 = read_manifest(tmp_path / "chexpert_1pct")
    sub10, m10 = read_manifest(tmp_path / "chexpert_10pct")
    t1 = {r["id"] for r in sub1 if r["split"] == "train"}
    t10 = {r["id"] for r in sub10 if r["split"] == "train"}
    assert len(t1) == 1 and len(t10) == 2 and t1 <= t10 <= train_ids
    assert {r["id"] for r in sub10 if r["split"] != "train"} == held
    assert m10["train_percent"] == 10 and m10["dropped"]["outside_10pct_subset"] == 16


def test_chexpert_unknown_label_names_file_and_line(tmp_path):
    src = tmp_path / "CheXpert-v1.0-small"
    write_csv(str(src / "train.csv"), CHEX_HEADER,
              [chex_row(src, "train", 0), chex_row(src, "train", 1, labels=("2", "", "", "", ""))])
    write_csv(str(src / "valid.csv"), CHEX_HEADER, [])
    with pytest.raises(PrepareError, match=r"train.csv:3: column 'Atelectasis' is '2'"):
        run("chexpert", src, tmp_path / "out", "--val-size", "0")


# ----------------------------------------------------------------------------- RSNA

def test_rsna(tmp_path, write_dicom):
    src, out = tmp_path / "rsna", tmp_path / "out"
    pixels = np.array([[0, 50], [100, 200]])
    rows = []
    for i in range(20):
        pid = f"pat{i:02d}"
        target = "1" if i % 4 == 0 else "0"
        rows.append((pid, "1", "2", "3", "4", "1") if target == "1" else (pid, "", "", "", "", "0"))
        if i == 0:
            rows.append((pid, "5", "6", "7", "8", "1"))  # a second box of the same patient
        write_dicom(src / "stage_2_train_images" / f"{pid}.dcm", pixels,
                    "MONOCHROME1" if i == 1 else "MONOCHROME2")
    rows.append(("ghost", "", "", "", "", "0"))  # no DICOM
    write_csv(str(src / prepare.RSNA_CSV),
              ["patientId", "x", "y", "width", "height", "Target"], rows)
    records, meta = run("rsna", src, out)
    recs = by_id(records)
    assert meta["counts"] == {"train": 14, "val": 3, "test": 3}
    assert meta["dropped"] == {"missing_image": 1} and meta["classes"] == ["Pneumonia"]
    assert [recs[f"pat{i:02d}"]["labels"] for i in range(5)] == [[1], [0], [0], [0], [1]]
    assert meta["image_root"] == str((out / "images_512px").resolve())
    assert recs["pat00"]["image"] == "stage_2_train_images/pat00.dcm.tif"
    # hand computation, no window in the file: round((p - min) / (max - min) * 255), inverted for MONOCHROME1
    copies = out / "images_512px" / "stage_2_train_images"
    assert np.array(Image.open(copies / "pat00.dcm.tif")).tolist() == [[0, 64], [128, 255]]
    assert np.array(Image.open(copies / "pat01.dcm.tif")).tolist() == [[255, 191], [128, 0]]
    assert_disjoint(records, "image")

    with open(src / prepare.RSNA_CSV, "a") as f:
        f.write("pat00,,,,,yes\n")
    with pytest.raises(PrepareError, match=r"stage_2_train_labels.csv:24: Target 'yes'"):
        run("rsna", src, tmp_path / "out2")


# ----------------------------------------------------------------------------- RadNLI

def nli_lines(n, label="entailment"):
    return "".join(json.dumps({"sentence1": f"Premise  {i} here.", "sentence2": f"No {i}.",
                               "gold_label": label}) + "\n" for i in range(n))


def test_radnli(tmp_path):
    src = tmp_path / "radnli"
    write(src / "radnli_dev_v1.jsonl", nli_lines(2, "neutral"))
    write(src / "radnli_test_v1.jsonl", nli_lines(3, "contradiction"))
    write(tmp_path / "mednli" / "mli_train_v1.jsonl", nli_lines(4))
    write(tmp_path / "pseudo.jsonl", nli_lines(1))
    records, meta = run("radnli", src, tmp_path / "out",
                        "--mednli", str(tmp_path / "mednli" / "mli_train_v1.jsonl"),
                        "--pseudo-train", str(tmp_path / "pseudo.jsonl"))
    assert meta["counts"] == {"train": 5, "val": 2, "test": 3}
    assert meta["classes"] == ["contradiction", "entailment", "neutral"]
    assert by_id(records)["radnli-test-1"] == {"id": "radnli-test-1", "split": "test",
                                               "text_a": "Premise 0 here.", "text_b": "No 0.",
                                               "label": "contradiction"}
    assert_disjoint(records, "id")

    write(src / "radnli_test_v1.jsonl", nli_lines(2) + json.dumps(
        {"sentence1": "a", "sentence2": "b", "gold_label": "unsure"}) + "\n")
    with pytest.raises(PrepareError, match=r"radnli_test_v1.jsonl:3: gold_label 'unsure'"):
        run("radnli", src, tmp_path / "out2", "--mednli", str(tmp_path / "pseudo.jsonl"))
    with pytest.raises(SystemExit):
        run("radnli", src, tmp_path / "out3")


# ----------------------------------------------------------------------------- VQA

def vqa_rad_entry(qid, image, answer, phrase, kind="CLOSED"):
    return {"qid": qid, "image_name": image, "question": f"Is  there question {qid}?",
            "answer": answer, "answer_type": kind, "phrase_type": phrase,
            "question_type": "PRES", "image_organ": "CHEST"}


def test_vqa_rad(tmp_path):
    src = tmp_path / "vqarad"
    for name in ("a.jpg", "b.jpg"):
        jpg(src / "VQA_RAD Image Folder" / name)
    entries = [vqa_rad_entry(i, "a.jpg", "Yes" if i % 2 else "No.", "freeform") for i in range(8)]
    entries[1]["answer"] = "Yes?"  # the metric's rule (data.normalize_answer): the same class as "yes"
    entries += [vqa_rad_entry(8, "b.jpg", "Left  Lung", "para", "OPEN"),
                vqa_rad_entry(9, "a.jpg", "yes", "test_freeform"),
                vqa_rad_entry(10, "b.jpg", "left lung.", "test_para", "OPEN"),
                vqa_rad_entry(11, "b.jpg", "Right kidney", "test_freeform", "OPEN"),
                vqa_rad_entry(12, "gone.jpg", "yes", "freeform")]
    write(src / "VQA_RAD Dataset Public.json", json.dumps(entries))
    records, meta = run("vqa-rad", src, tmp_path / "out", "--val-size", "2")
    recs = by_id(records)
    assert meta["counts"] == {"train": 7, "val": 2, "test": 3}
    assert meta["dropped"] == {"missing_image": 1}
    assert meta["answers"] == ["left lung", "no", "yes"]
    assert meta["test_answers_outside_vocab"] == 1  # "right kidney" only occurs in test
    assert recs["8"]["answer"] == "left lung" and recs["8"]["answer_type"] == "open"
    assert recs["1"]["question"] == "Is there question 1?" and recs["1"]["answer"] == "yes"
    assert {recs[q]["split"] for q in ("9", "10", "11")} == {"test"}
    assert_disjoint(records, "id")

    entries[3]["answer_type"] = "MAYBE"
    write(src / "VQA_RAD Dataset Public.json", json.dumps(entries))
    with pytest.raises(PrepareError, match=r"Public.json: entry 3: answer_type 'MAYBE'"):
        run("vqa-rad", src, tmp_path / "out2", "--val-size", "2")


def test_slake(tmp_path):
    src = tmp_path / "slake"
    jpg(src / "imgs" / "xmlab1" / "source.jpg")

    def entry(qid, answer, lang="en"):
        return {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Which organ?",
                "answer": answer, "q_lang": lang, "answer_type": "OPEN", "content_type": "Organ",
                "location": "Chest", "modality": "CT", "qid": qid}
    write(src / "train.json", json.dumps([entry(1, "Lung"), entry(2, "肺", "zh")]))
    write(src / "validate.json", json.dumps([entry(3, "Heart")]))
    write(src / "test.json", json.dumps([entry(4, "Liver"), entry(5, "lung")]))
    records, meta = run("slake", src, tmp_path / "out")
    assert meta["counts"] == {"train": 1, "val": 1, "test": 2}
    assert meta["dropped"] == {"not_english": 1}
    assert meta["answers"] == ["heart", "lung"] and meta["test_answers_outside_vocab"] == 1
    assert_disjoint(records, "id")


def make_vqa_med(root):
    train_dir = root / "ImageClef-2019-VQA-Med-Training"
    val_dir = root / "ImageClef-2019-VQA-Med-Validation"
    test_dir = root / "VQAMed2019Test"
    for d, sub, ids in ((train_dir, "Train_images", ["t1", "t2"]), (val_dir, "Val_images", ["v1"]),
                        (test_dir, "VQAMed2019_Test_Images", ["s1", "s2"])):
        for i in ids:
            jpg(d / sub / f"{i}.jpg")
    write(train_dir / "All_QA_Pairs_train.txt",
          "t1|what modality is shown?|CT\nt2|is this an mri?|Yes\nt1|what is abnormal?|cyst\n"
          "t9|which plane?|axial\n")
    write(train_dir / "QAPairsByCategory" / "C4_Abnormality_train.txt",
          "t1|what is abnormal?|cyst\n")
    write(val_dir / "All_QA_Pairs_val.txt", "v1|which plane?|Sagittal\n")
    write(val_dir / "QAPairsByCategory" / "C4_Abnormality_val.txt", "")
    write(test_dir / "VQAMed2019_Test_Questions_w_Ref_Answers.txt",
          "s1|modality|what modality?|ct#computed tomography\ns2|plane|which plane?|coronal\n"
          "s1|abnormality|what is abnormal?|cyst\n")


def test_vqa_med_2019(tmp_path):
    make_vqa_med(tmp_path / "med19")
    records, meta = run("vqa-med-2019", tmp_path / "med19", tmp_path / "out")
    recs = by_id(records)
    assert meta["counts"] == {"train": 2, "val": 1, "test": 2}
    assert meta["dropped"] == {"abnormality": 2, "missing_image": 1}
    assert meta["answers"] == ["ct", "sagittal", "yes"]
    assert meta["test_answers_outside_vocab"] == 1  # "coronal"; "ct" is an alternative of s1
    assert recs["test-1"]["answers"] == ["ct", "computed tomography"]
    assert recs["test-1"]["image"] == copy_name("VQAMed2019Test/VQAMed2019_Test_Images/s1.jpg")
    assert recs["train-2"]["answer_type"] == "closed" and recs["train-1"]["answer_type"] == "open"
    assert_images_exist(records, meta)

    kept, meta = run("vqa-med-2019", tmp_path / "med19", tmp_path / "keep", "--keep-abnormality")
    assert meta["counts"] == {"train": 3, "val": 1, "test": 3}
    assert "abnormality" not in meta["dropped"]
    assert "cyst" in meta["answers"]

    write(tmp_path / "med19" / "VQAMed2019Test" / "VQAMed2019_Test_Questions_w_Ref_Answers.txt",
          "s1|modality|what modality?|ct\ns2|colour|which colour?|red\n")
    with pytest.raises(PrepareError, match=r"Answers.txt:2: category 'colour'"):
        run("vqa-med-2019", tmp_path / "med19", tmp_path / "out2")
