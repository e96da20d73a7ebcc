"""prepare.py table: your own CSV / JSONL / folder-per-class tree -> the manifests train.py and
finetune.py read (loaded here with their readers, data.PretrainDataset / TaskDataset); bad rows are
named by file and line and counted, so that the summary adds up to every row read."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

import prepare
from data import PretrainDataset, TaskDataset, read_manifest
from tokenizer import Tokenizer


def image(path, value=90, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)
    return path


def table(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def convert(src, out, *flags):
    prepare.main(["table", "--src", str(src), "--out", str(out), "--image-size", "32", "--workers", "1", *flags])
    return read_manifest(out)


def bad_rows(out):
    return [line.split("\t") for line in (out / "bad_rows.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = ["the heart is normal in size", "no pleural effusion is seen", "is there a nodule", "yes no"] * 20
    return Tokenizer.train(corpus, 200, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_a_pretraining_csv_with_bad_rows_and_seeded_splits(tmp_path, tok, capsys):
    for i in range(10):
        image(tmp_path / "img" / f"{i}.png", 10 * i)
    rows = [[f"img/{i}.png", f"finding number {i} is seen"] for i in range(10)]
    rows += [["img/0.png", "a second caption here"],   # line 12: joins image 0's texts
             ["img/missing.png", "no such file here"],  # line 13
             ["img/1.png", "   "],                      # line 14: empty
             ["img/2.png", "too short"],                # line 15
             ["../outside.png", "an image outside root"]]  # line 16
    src = table(tmp_path / "mine.csv", ["path", "caption"], rows)
    records, meta = convert(src, tmp_path / "out", "--task", "pretrain", "--columns", "image=path", "text=caption")
    assert meta["rows"] == {"read": 15, "kept": 11, "empty_text": 1, "missing_image": 1,
                            "outside_image_root": 1, "short_text": 1}
    assert bad_rows(tmp_path / "out") == [[f"{src}:13", "missing_image"], [f"{src}:14", "empty_text"],
                                          [f"{src}:15", "short_text"], [f"{src}:16", "outside_image_root"]]
    assert "4 bad rows" in capsys.readouterr().out
    assert len(records) == 10 and meta["counts"] == {"train": 8, "val": 1, "test": 1}
    first = next(r for r in records if r["id"] == "img/0.png")
    assert first["texts"] == ["finding number 0 is seen", "a second caption here"]
    assert records == convert(src, tmp_path / "again", "--task", "pretrain", "--columns", "image=path",
                              "text=caption")[0]  # the same seeded split
    ds = PretrainDataset(tmp_path / "out", "train", tok, 32, 16, train=True)
    assert ds[0].image.shape == (3, 32, 32) and ds[0].skipped is None


def test_rows_of_an_unreadable_image_are_counted_too(tmp_path):
    image(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    src = table(tmp_path / "t.csv", ["image", "text", "split"],
                [["bad.png", "first text of bad", "train"], ["bad.png", "second text of bad", "train"],
                 ["good.png", "the only good one", "train"]])
    records, meta = convert(src, tmp_path / "out", "--task", "pretrain")
    assert meta["rows"] == {"read": 3, "kept": 1, "unreadable_image": 2} and len(records) == 1
    assert (tmp_path / "out" / "unreadable_images.txt").read_text().startswith("bad.png\t")


def test_a_vqa_jsonl_with_splits_answer_types_and_malformed_lines(tmp_path, tok):
    image(tmp_path / "a.png")
    lines = [{"image": "a.png", "question": "Is there a nodule?", "answer": "Yes", "split": "train"},
             {"image": "a.png", "question": "Which lobe?", "answer": "Left upper.", "split": "valid"},
             {"image": "a.png", "question": "Is it big?", "answer": "no", "split": "test", "answer_type": "open"},
             {"image": "a.png", "question": "x?", "answer": "no", "split": "holdout"},
             {"image": "a.png", "question": "What?"}]
    src = tmp_path / "q.jsonl"
    src.write_text("\n".join(map(json.dumps, lines[:3])) + "\n{not json\n" + "\n".join(map(json.dumps, lines[3:])) + "\n")
    records, meta = convert(src, tmp_path / "out", "--task", "vqa")
    assert meta["rows"] == {"read": 6, "kept": 3, "malformed_row": 1, "missing_field": 1, "unknown_split": 1}
    assert [r[0] for r in bad_rows(tmp_path / "out")] == [f"{src}:4", f"{src}:5", f"{src}:6"]
    assert [(r["split"], r["answer"], r["answer_type"]) for r in records] == [
        ("train", "yes", "closed"), ("val", "left upper", "open"), ("test", "no", "open")]
    assert meta["answers"] == ["left upper", "yes"] and meta["test_answers_outside_vocab"] == 1
    batch = TaskDataset(tmp_path / "out", "val", tok, 32, 16, train=False).collate(
        [TaskDataset(tmp_path / "out", "val", tok, 32, 16, train=False)[0]])
    assert batch.labels.tolist() == [[1.0, 0.0]]


def test_multi_label_ic_with_known_classes_and_text_tasks(tmp_path, tok):
    for i in range(4):
        image(tmp_path / f"{i}.png")
    src = table(tmp_path / "ic.csv", ["image", "labels", "split"],
                [["0.png", "edema|effusion", "train"], ["1.png", "normal", "train"], ["2.png", "fracture", "test"],
                 ["3.png", "", "test"], ["0.png", "edema", "test"]])
    records, meta = convert(src, tmp_path / "ic", "--task", "ic", "--classes", "edema", "effusion", "normal")
    assert meta["classes"] == ["edema", "effusion", "normal"]
    assert [r["labels"] for r in records] == [[1, 1, 0], [0, 0, 1]]
    assert meta["rows"] == {"read": 5, "kept": 2, "empty_label": 1, "split_conflict": 1, "unknown_label": 1}
    assert TaskDataset(tmp_path / "ic", "train", tok, 32, 16, train=True)[0].label == [1, 1, 0]

    tc = table(tmp_path / "tc.csv", ["premise", "hypothesis", "label"],
               [["the heart is normal", "no cardiomegaly", "entailment"]] * 6 + [["a", "", "neutral"]])
    records, meta = convert(tc, tmp_path / "tc", "--task", "tc", "--columns", "text_a=premise", "text_b=hypothesis",
                            "--holdout", "0.34", "0.34")
    assert meta["classes"] == ["entailment"] and meta["counts"] == {"train": 2, "val": 2, "test": 2}
    assert meta["rows"]["empty_text"] == 1 and "image_root" not in meta
    assert TaskDataset(tmp_path / "tc", "train", tok, 32, 16, train=True)[0].text_b == "no cardiomegaly"
    ts = table(tmp_path / "ts.csv", ["source", "target"], [["no pleural effusion is seen", "the heart is normal"]] * 5)
    records, meta = convert(ts, tmp_path / "ts", "--task", "ts", "--holdout", "0", "0")
    assert meta["counts"] == {"train": 5, "val": 0, "test": 0} and records[0]["target"] == "the heart is normal"


def test_a_folder_per_class_tree_with_split_folders(tmp_path, tok):
    for split, n in (("train", 3), ("test", 1)):
        for label in ("cat", "dog"):
            for i in range(n):
                image(tmp_path / "tree" / split / label / f"{i}.png")
    (tmp_path / "tree" / "train" / "dog" / "notes.txt").write_text("not an image")
    records, meta = convert(tmp_path / "tree", tmp_path / "out")
    assert meta["task"] == "ic" and meta["classes"] == ["cat", "dog"]
    assert meta["counts"] == {"train": 6, "val": 0, "test": 2}
    assert meta["rows"] == {"read": 9, "kept": 8, "not_an_image": 1}
    assert bad_rows(tmp_path / "out") == [["train/dog/notes.txt", "not_an_image"]]
    assert {r["id"]: r["labels"] for r in records}["test/dog/0.png"] == [0, 1]
    assert TaskDataset(tmp_path / "out", "test", tok, 32, 16, train=False)[0].image.shape == (3, 32, 32)


def test_dicom_rows_follow_their_window_in_the_copy(tmp_path, write_dicom):
    write_dicom(tmp_path / "scans" / "a.dcm", np.array([[0, 1024], [1064, 4095]], np.uint16), RescaleIntercept=-1024,
                WindowCenter=40, WindowWidth=400)  # tests/test_dicom.py computes these by hand
    src = table(tmp_path / "t.csv", ["image", "text", "split"], [["scans/a.dcm", "a chest film here", "train"]])
    records, meta = convert(src, tmp_path / "out", "--task", "retrieval")
    assert records[0]["image"] == "scans/a.dcm.tif"
    copy = np.asarray(Image.open(tmp_path / "out" / "images_32px" / "scans" / "a.dcm.tif"))
    assert copy.tolist() == [[0, 102], [128, 255]]


def test_table_flags_are_checked(tmp_path):
    src = table(tmp_path / "t.csv", ["file", "text"], [["a.png", "some text here"]])
    with pytest.raises(prepare.PrepareError, match=r"t.csv:1: header lacks columns \['image'\]"):
        convert(src, tmp_path / "out", "--task", "retrieval")
    with pytest.raises(SystemExit, match="--columns 'picture=file'"):
        convert(src, tmp_path / "out", "--task", "retrieval", "--columns", "picture=file")
    with pytest.raises(SystemExit, match="needs --task"):
        convert(src, tmp_path / "out")
