"""copies.py and prepare.py's copies: a copy equals full decode + the same resize within the stated
bound (JPEG draft mode: at most 2 grey levels, mean < 0.35), the conversion is resumable (finished
copies skipped, a temp file never taken for a copy, none left half-written under the final name),
unreadable sources are listed and not fatal, originals are never changed, and training at a size
above the prepared one is refused with the command that re-prepares."""
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

import copies
import data
import prepare
from data import read_manifest
from test_prepare import make_roco


def big_jpeg(path, width=1000, height=1200, seed=0):
    """A grey JPEG (quality 95) with smooth structure and film-like noise."""
    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.uniform(0, 255, (24, 20)).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(smooth, np.float32) + rng.normal(0, 6, (height, width))
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=95)


def test_a_big_jpeg_copy_equals_full_decode_and_resize_within_the_bound(tmp_path):
    path = tmp_path / "big.jpg"
    big_jpeg(path)
    assert data.load_image(path, draft_side=400).size == (500, 600)  # draft mode decoded at 1/2
    got = np.asarray(copies.training_copy(str(path), 200), np.float64)
    full = np.asarray(copies.shrink(data.load_image(path, keep_grey=True), 200), np.float64)
    assert got.shape == full.shape == (240, 200)
    diff = np.abs(got - full)
    assert diff.max() <= 2 and diff.mean() < 0.35
    small = tmp_path / "small.png"
    Image.new("L", (50, 80), 7).save(small)
    assert copies.training_copy(str(small), 200).size == (50, 80)  # never enlarged


def sources(root) -> dict:
    return {p: hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(str(x) for x in root.rglob("*") if x.is_file())}


def test_roco_prepared_twice_with_a_truncated_jpeg_and_untouched_sources(tmp_path, capsys):
    src, out = tmp_path / "roco", tmp_path / "out"
    make_roco(src)
    big_jpeg(src / "data/train/radiology/images/ROCO_00001.jpg", 300, 400)
    bad = src / "data/test/radiology/images/ROCO_20001.jpg"
    bad.write_bytes(open(src / "data/train/radiology/images/ROCO_00001.jpg", "rb").read()[:3000])
    before = sources(src)
    prepare.main(["roco", "--src", str(src), "--out", str(out), "--image-size", "64", "--workers", "2"])
    records, meta = read_manifest(out)
    assert sources(src) == before
    assert meta["image_size"] == 64 and meta["dropped"]["unreadable_image"] == 1
    assert meta["counts"] == {"train": 2, "val": 3, "test": 2}
    listed = (out / "unreadable_images.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith("data/test/radiology/images/ROCO_20001.jpg\t")
    assert "1 unreadable images" in capsys.readouterr().out
    copy = out / "images_64px" / copies.copy_name("data/train/radiology/images/ROCO_00001.jpg")
    assert Image.open(copy).size == (64, 85)

    # A second run skips what is done: a finished copy is not rewritten, a temp file left by an
    # interrupted run is not taken for a copy (its copy is made), the same manifest comes out.
    stamp = os.stat(copy).st_mtime_ns
    other = out / "images_64px" / copies.copy_name("data/validation/radiology/images/ROCO_10000.jpg")
    os.unlink(other)
    leftover = f"{other}.999.tmp"
    open(leftover, "wb").write(b"half a png")
    manifest = (out / "manifest.jsonl").read_text()
    prepare.main(["roco", "--src", str(src), "--out", str(out), "--image-size", "64", "--workers", "1"])
    assert os.stat(copy).st_mtime_ns == stamp and Image.open(other).size == (4, 4)
    assert (out / "manifest.jsonl").read_text() == manifest and sources(src) == before


def test_an_interrupted_copy_leaves_no_file_under_its_final_name(tmp_path, monkeypatch):
    Image.new("L", (8, 8)).save(tmp_path / "a.png")

    def interrupted(self, fp, *args, **kwargs):
        open(fp, "wb").write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        copies.make_copies(str(tmp_path), ["a.png"], str(tmp_path / "c"), 4, workers=1)
    assert os.listdir(tmp_path / "c") == []


def test_training_above_the_prepared_size_is_refused_with_the_command(tmp_path):
    src, out = tmp_path / "roco", tmp_path / "out"
    make_roco(src)
    prepare.main(["roco", "--src", str(src), "--out", str(out), "--image-size", "64", "--workers", "1"])
    data.check_image_size(out, 64)
    with pytest.raises(SystemExit, match=r"prepared at a shorter side of 64 px.*"
                                         r"python prepare.py roco --src .* --image-size 288"):
        data.check_image_size(out, 288)
    prepare.main(["roco", "--src", str(src), "--out", str(tmp_path / "orig"), "--image-size", "0"])
    records, meta = read_manifest(tmp_path / "orig")
    assert "image_size" not in meta and meta["image_root"] == str(src.resolve())
    assert records[0]["image"].endswith(".jpg")
    data.check_image_size(tmp_path / "orig", 384)  # the originals: any size
