"""predict.py: every command and Predictor method gives what the evaluation code computes for the
same inputs (zeroshot.py's embeddings, similarities and zero-shot scores; the fine-tuning
evaluation's heads and generated texts, through finetune.eval_batches / evaluate_split on the test
split), and every bad input gets its error. Tiny untrained checkpoints made here: equality does
not need a trained model, and random heads give input-dependent outputs."""
import dataclasses
import json
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import finetune as ft
import predict
import synth
from checkpoint import CheckpointError, save_checkpoint
from data import UnreadableImage, read_manifest, resolve_image
from metrics import class_aurocs, recall_at_k, vqa_accuracy
from model import PTUnifier
from predict import PredictError, Predictor
from recipes import RECIPES
from runtime import setup_runtime
from tokenizer import Tokenizer
from train import TrainConfig
from zeroshot import embed_retrieval, zero_shot_class_scores

N_TEST, BATCH = 12, 5  # BATCH: the Predictor's and the evaluation's, so that batches match
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny synthetic benchmark, an untrained tiny pre-training checkpoint whose metadata names
    the data folder (so the Predictor finds the tokenizer as the run did), and the model."""
    root = tmp_path_factory.mktemp("synth")
    synth.main(["--out", str(root), "--train", "8", "--val", "4", "--test", str(N_TEST),
                "--image-size", "64", "--vocab-size", "600", "--workers", "1"])
    tok = Tokenizer.load(root / "tokenizer.json")
    torch.manual_seed(0)
    model = PTUnifier(dataclasses.replace(RECIPES["tiny"].model, vocab_size=tok.vocab_size,
                                          pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                                          eos_token_id=tok.eos_id)).eval()
    save_checkpoint(root / "pre.safetensors", model, None, None, {"step": 0}, model.config,
                    TrainConfig(preset="tiny", data=str(root / "pretrain")))
    return root, tok, model


def paths_of(root, task, split="test") -> tuple[list, list[dict]]:
    records, meta = read_manifest(root / task, split)
    return [resolve_image(root / task, meta, r["image"]) for r in records], records


def load(path, **options) -> Predictor:
    return Predictor.load(path, device="cpu", batch_size=BATCH, progress=False, **options)


@pytest.fixture(scope="module")
def finetuned(bench):
    """task -> (path of a fine-tuned checkpoint with a random head, its model, the evaluation's
    context on the test split); written by finetune.save_finetuned as a run writes best.safetensors."""
    root, tok, _ = bench
    out = {}
    for task in ("ic", "tc", "vqa", "ts", "itg", "retrieval"):
        cfg = ft.FinetuneConfig(task=task, data=str(root / task), init=str(root / "pre.safetensors"),
                                eval_batch=BATCH, workers=0, device="cpu", max_gen_len=10).resolved()
        backbone, _, _ = ft.load_backbone(cfg, tok)
        names = ft.output_names(ft.TASKS[task], json.loads((root / task / "meta.json").read_text()))
        torch.manual_seed(1)
        model = ft.FinetuneModel(backbone, ft.TASKS[task], len(names)).eval()
        if task == "retrieval":  # its own ITC space: the pre-training checkpoint's, moved
            torch.nn.init.normal_(backbone.itc_image.proj.weight, std=0.1)
        if model.decoder is not None:  # texts that depend on the input: strong cross-attention
            for layer in model.decoder.layers:
                for weight in layer.cross_attn.parameters():
                    torch.nn.init.normal_(weight, std=0.5)
        path = root / f"{task}.safetensors"
        ft.save_finetuned(path, model, names, cfg, {"epoch": 1}, {})
        out[task] = (path, model, ft.EvalContext(root / task, tok, names, setup_runtime("cpu"), cfg))
    return out


def classifier_outputs(model, ctx, then=lambda logits: logits) -> tuple[torch.Tensor, list]:
    """then(head outputs) of each test batch of the evaluation (finetune.eval_batches), concatenated,
    and the batches. (A sigmoid or softmax goes per batch, as in the evaluation: over a longer
    tensor, the vectorised kernels can round the last bit differently.)"""
    batches = list(ft.eval_batches(model, ctx, "test"))
    with torch.no_grad():
        return torch.cat([then(model.outputs(b).float()) for b in batches]), batches


# ----------------------------------------------------------------------------- the ITC space


def test_embeddings_and_search_equal_zero_shot_retrieval(bench, tmp_path):
    root, tok, model = bench
    paths, records = paths_of(root, "retrieval")
    texts = [r["text"] for r in records]
    p = load(root / "pre.safetensors")  # no tokenizer given: found from the checkpoint's run
    images, reports = p.embed_images(paths), p.embed_texts(texts)
    ref_images, ref_texts, _, _ = embed_retrieval(model, root / "retrieval", "test", tok, CPU, BATCH, num_workers=0)
    assert images.items == [str(x) for x in paths] and reports.items == texts
    assert torch.equal(images.vectors, ref_images) and torch.equal(reports.vectors, ref_texts)

    # Each report's own image among its top k exactly as often as zero-shot t2i R@k says; i2t too.
    recall = recall_at_k(ref_images @ ref_texts.T, ks=(1, 5))
    found = p.search(reports, images, top=5)  # embedded above (the command line embeds, below)
    assert [r["query"] for r in found] == texts and [r["line"] for r in found] == list(range(1, N_TEST + 1))
    back = p.search_texts(images, reports, top=5)
    for k in (1, 5):
        hits = np.mean([str(paths[i]) in [h["path"] for h in r["hits"][:k]] for i, r in enumerate(found)])
        assert hits == pytest.approx(recall.t2i[k])
        hits = np.mean([i + 1 in [h["line"] for h in r["hits"][:k]] for i, r in enumerate(back)])
        assert hits == pytest.approx(recall.i2t[k])
    sim = ref_texts @ ref_images.T  # [Q, N]
    for r, row in zip(found, sim):
        assert [h["score"] for h in r["hits"]] == pytest.approx(sorted(row.tolist(), reverse=True)[:5])

    # The command line: a folder searched recursively, --queries from a file, JSONL, the contact sheet.
    scans = tmp_path / "scans"
    for i, path in enumerate(paths):
        (scans / f"part{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, scans / f"part{i % 2}" / path.name)
    (tmp_path / "scans" / "notes.txt").write_text("not an image, not searched")
    (tmp_path / "queries.txt").write_text("\n".join(texts[:3]) + "\n")
    predict.main(["search", "--checkpoint", str(root / "pre.safetensors"), "--images", str(scans),
                  "--queries", str(tmp_path / "queries.txt"), "--top", "3", "--batch-size", str(BATCH),
                  "--device", "cpu", "--jsonl", str(tmp_path / "hits.jsonl"), "--sheet", str(tmp_path / "sheet.png")])
    lines = [json.loads(line) for line in (tmp_path / "hits.jsonl").read_text().splitlines()]
    name = lambda hit: hit["path"].rsplit("/", 1)[-1]  # noqa: E731
    assert [[name(h) for h in r["hits"]] for r in lines] == [[name(h) for h in r["hits"][:3]] for r in found[:3]]
    assert [h["score"] for r in lines for h in r["hits"]] == \
        pytest.approx([h["score"] for r in found[:3] for h in r["hits"][:3]], abs=1e-6)
    sheet = Image.open(tmp_path / "sheet.png").convert("RGB")
    thumb, row = 112, 40 + 112 + 22
    assert sheet.size == (10 + 3 * (thumb + 10), 10 + 3 * row)
    first = lines[0]["hits"][1]  # query 1's second hit: row 0, column 1
    expected = Image.open(first["path"]).convert("RGB").resize((thumb, thumb))
    assert np.array_equal(np.asarray(sheet.crop((10 + thumb + 10, 44, 10 + 2 * thumb + 10, 44 + thumb))),
                          np.asarray(expected))


def test_a_dicom_embeds_as_the_png_of_its_display_pixels(bench, tmp_path, write_dicom):
    root, _, _ = bench
    paths, _ = paths_of(root, "retrieval")
    grey = np.asarray(Image.open(paths[0]).convert("L"), dtype=np.uint16)
    # stored 4p + 1000, slope 0.5, intercept -500: x = 2p; LINEAR_EXACT window c 255, w 510: p / 255
    write_dicom(tmp_path / "scans" / "a.dcm", grey * 4 + 1000, RescaleSlope=0.5, RescaleIntercept=-500,
                WindowCenter=255, WindowWidth=510, VOILUTFunction="LINEAR_EXACT")
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "a.png")
    p = load(root / "pre.safetensors")
    found = p.embed_images(tmp_path / "scans")  # a folder: the .dcm file is found
    assert found.items == [str(tmp_path / "scans" / "a.dcm")]
    assert torch.equal(found.vectors, p.embed_images([tmp_path / "a.png"]).vectors)


def test_a_retrieval_checkpoint_searches_its_own_itc_space(bench, finetuned):
    root, tok, pretrained = bench
    path, model, _ = finetuned["retrieval"]
    paths, records = paths_of(root, "retrieval")
    ref = embed_retrieval(model.backbone, root / "retrieval", "test", tok, CPU, BATCH, num_workers=0)
    p = load(path)
    images = p.embed_images(paths)
    assert torch.equal(images.vectors, ref[0])
    assert not torch.allclose(images.vectors, load(root / "pre.safetensors").embed_images(paths).vectors)
    found = p.search(records[0]["text"], images, top=N_TEST)[0]["hits"]  # one text: a batch of its own
    assert [h["score"] for h in found] == pytest.approx(sorted((ref[1][0] @ ref[0].T).tolist(), reverse=True),
                                                        abs=1e-6)


def test_images_as_queries_rank_the_texts_on_the_command_line(bench, tmp_path):
    root, _, _ = bench
    paths, records = paths_of(root, "retrieval")
    texts = [r["text"] for r in records]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    args = ["search", "--checkpoint", str(root / "pre.safetensors"), "--device", "cpu", "--batch-size", str(BATCH)]
    predict.main([*args, "--image-query", *map(str, paths[:2]), "--texts-file", str(tmp_path / "texts.txt"),
                  "--top", "3", "--jsonl", str(tmp_path / "back.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "back.jsonl").read_text().splitlines()]
    expected = load(root / "pre.safetensors").search_texts(paths[:2], texts, top=3)
    assert [r["path"] for r in rows] == [str(x) for x in paths[:2]]
    assert [[(h["line"], h["text"]) for h in r["hits"]] for r in rows] == \
        [[(h["line"], h["text"]) for h in r["hits"]] for r in expected]
    assert [h["score"] for r in rows for h in r["hits"]] == \
        pytest.approx([h["score"] for r in expected for h in r["hits"]], abs=1e-6)
    with pytest.raises(SystemExit, match="--image-query ranks the lines of --texts-file"):
        predict.main([*args, "--image-query", str(paths[0])])


def test_embed_command_writes_the_embeddings(bench, tmp_path, capsys):
    root, _, _ = bench
    paths, records = paths_of(root, "retrieval")
    p = load(root / "pre.safetensors")
    (tmp_path / "texts.txt").write_text("\n".join(r["text"] for r in records[:4]))
    args = ["--checkpoint", str(root / "pre.safetensors"), "--device", "cpu", "--batch-size", str(BATCH)]
    predict.main(["embed", *args, "--images", *map(str, paths[:4]), "--out", str(tmp_path / "i.safetensors")])
    predict.main(["embed", *args, "--texts-file", str(tmp_path / "texts.txt"),
                  "--out", str(tmp_path / "t.safetensors"), "--jsonl", str(tmp_path / "t.jsonl")])
    for name, expected in (("i", p.embed_images(paths[:4])), ("t", p.embed_texts([r["text"] for r in records[:4]]))):
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            assert torch.equal(f.get_tensor("embeddings"), expected.vectors)
            assert json.loads(f.metadata()["ptunifier-embeddings"])["items"] == expected.items
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4] and rows[2]["text"] == records[2]["text"]
    assert torch.tensor([r["embedding"] for r in rows]).allclose(expected.vectors)
    assert str(paths[3]) in capsys.readouterr().out  # the table names every image


def test_zero_shot_classify_equals_zero_shot_class_scores(bench, capsys):
    root, tok, model = bench
    paths, records = paths_of(root, "ic")
    p = load(root / "pre.safetensors")
    rows = p.zero_shot_classify(paths)
    scores, _, classes = zero_shot_class_scores(model, root / "ic", "test", tok, CPU, BATCH, num_workers=0)
    assert classes == synth.IC_CLASSES and [r["path"] for r in rows] == [str(x) for x in paths]
    assert np.array_equal(np.array([[r["scores"][c] for c in classes] for r in rows]), scores)

    custom = {c: (f"Findings show {c}.", f"No {c} is seen.") for c in classes}
    rows = p.zero_shot_classify(paths, [f"{pos} | {neg}" for pos, neg in custom.values()])
    scores, _, _ = zero_shot_class_scores(model, root / "ic", "test", tok, CPU, BATCH, prompts=custom, num_workers=0)
    assert np.array_equal(np.array([list(r["scores"].values()) for r in rows]), scores)

    # Plain sentences share one softmax: recomputed here one input at a time through the model.
    labels = ["There is a large effusion.", "The lungs are clear.", "A device is present."]
    rows = p.zero_shot_classify(paths[:3], labels)
    with torch.no_grad():
        text = torch.cat([model.itc_text(model(input_ids=tok.encode([s], 64)[0]).joint) for s in labels])  # [3, E]
        for r, path in zip(rows, paths):
            pixels = p.embed_images([path]).vectors
            expected = torch.softmax(model.logit_scale() * (pixels @ text.T), dim=1)[0]
            assert list(r["scores"]) == labels
            torch.testing.assert_close(torch.tensor(list(r["scores"].values())), expected, atol=1e-5, rtol=0)
    predict.main(["classify", "--checkpoint", str(root / "pre.safetensors"), "--device", "cpu",
                  "--images", str(paths[0])])
    out = capsys.readouterr().out
    assert "cardiomegaly" in out and f"{rows[0]['path']}" in out


# ----------------------------------------------------------------------------- fine-tuned heads


def test_classify_with_an_ic_head_equals_the_evaluation(bench, finetuned):
    root, _, _ = bench
    path, model, ctx = finetuned["ic"]
    rows = load(path).classify(paths_of(root, "ic")[0])
    scores, batches = classifier_outputs(model, ctx, torch.sigmoid)
    mine = torch.tensor([list(r["scores"].values()) for r in rows])
    assert list(rows[0]["scores"]) == ctx.names and torch.equal(mine, scores)
    labels = torch.cat([b.labels for b in batches]).numpy()
    assert class_aurocs(mine.numpy(), labels, ctx.names)[0] == ft.evaluate_split(model, ctx, "test")["per_class"]


def test_answer_equals_the_vqa_evaluation(bench, finetuned, tmp_path):
    root, _, _ = bench
    path, model, ctx = finetuned["vqa"]
    paths, records = paths_of(root, "vqa")
    rows = load(path).answer(paths, [r["question"] for r in records])
    probs, _ = classifier_outputs(model, ctx, torch.sigmoid)
    assert [r["answer"] for r in rows] == [ctx.names[i] for i in probs.argmax(1).tolist()]
    assert [r["probability"] for r in rows] == probs.max(1).values.tolist()
    accuracy = vqa_accuracy([r["answer"] for r in rows], [r["answer"] for r in records],
                            [r["answer_type"] for r in records], vocabulary=ctx.names)
    assert accuracy.overall == ft.evaluate_split(model, ctx, "test")["overall"]
    # One question for every image, on the command line.
    predict.main(["answer", "--checkpoint", str(path), "--device", "cpu", "--images", *map(str, paths[:2]),
                  "--question", records[0]["question"], "--jsonl", str(tmp_path / "a.jsonl")])
    lines = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    # a batch of 2 against the evaluation's batches: the kernels may round the last bit otherwise
    assert lines[0] == rows[0] | {"probability": pytest.approx(rows[0]["probability"], rel=1e-6)}
    assert lines[1]["question"] == records[0]["question"]


def test_nli_equals_the_tc_evaluation(bench, finetuned):
    root, _, _ = bench
    path, model, ctx = finetuned["tc"]
    records, _ = read_manifest(root / "tc", "test")
    rows = load(path).nli([r["text_a"] for r in records], [r["text_b"] for r in records])
    probs, _ = classifier_outputs(model, ctx, lambda logits: torch.softmax(logits, dim=1))
    assert [r["label"] for r in rows] == [ctx.names[i] for i in probs.argmax(1).tolist()]
    assert torch.equal(torch.tensor([list(r["probabilities"].values()) for r in rows]), probs)
    correct = [r["label"] == rec["label"] for r, rec in zip(rows, records)]
    assert np.mean(correct) == pytest.approx(ft.evaluate_split(model, ctx, "test")["accuracy"])


@pytest.mark.parametrize("task", ["itg", "ts"])
def test_report_and_summarize_equal_the_generation_evaluation(bench, finetuned, task):
    root, _, _ = bench
    path, model, ctx = finetuned[task]
    with torch.no_grad():
        generated = list(ft.generations(model, ctx, "test")[0].values())  # what score_generation scores
    assert len(set(generated)) >= len(generated) // 2  # each input's own text, so the order is checked too
    p = load(path)
    if task == "itg":
        rows = p.report(paths_of(root, "itg")[0])
        assert [r["report"] for r in rows] == generated
    else:
        rows = p.summarize([r["source"] for r in read_manifest(root / "ts", "test")[0]])
        assert [r["summary"] for r in rows] == generated


# ----------------------------------------------------------------------------- bad input


def bad_images(tmp_path, good) -> dict:
    """A missing, an empty, a truncated and a non-image file, each named .png."""
    data = good.read_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.png").write_text("a radiology report, not an image")
    return {name: tmp_path / f"{name}.png" for name in ("missing", "empty", "truncated", "text")}


def test_bad_images_are_named_or_skipped(bench, tmp_path, capsys):
    root, _, _ = bench
    paths, _ = paths_of(root, "ic")
    p = load(root / "pre.safetensors")
    for name, bad in bad_images(tmp_path, paths[0]).items():
        with pytest.raises(UnreadableImage, match=str(bad)):
            p.zero_shot_classify([paths[0], bad])
    with pytest.raises(SystemExit, match=f"predict.py search: {bad}: cannot decode image"):
        predict.main(["search", "--checkpoint", str(root / "pre.safetensors"), "--device", "cpu",
                      "--images", str(paths[0]), str(bad), "--query", "a left pleural effusion"])
    # --skip-bad: the readable images get exactly their results, the others are listed at the end.
    bad = list(bad_images(tmp_path, paths[0]).values())
    skipping = load(root / "pre.safetensors", skip_bad=True)
    mixed = [bad[0], paths[0], bad[1], paths[1], paths[2], bad[2], bad[3], paths[3]]
    kept, expected = skipping.zero_shot_classify(mixed), p.zero_shot_classify(paths[:4])  # batches differ: the last bits may
    assert [r["path"] for r in kept] == [r["path"] for r in expected]
    for a, b in zip(kept, expected):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-6)
    assert len(skipping.skipped) == 4 and all(str(b) in s for b, s in zip(bad, skipping.skipped))
    predict.main(["classify", "--checkpoint", str(root / "pre.safetensors"), "--device", "cpu", "--skip-bad",
                  "--images", *map(str, mixed)])
    err = capsys.readouterr().err
    assert "skipped 4 unreadable images" in err and all(str(b) in err for b in bad)
    (tmp_path / "no-images").mkdir()
    with pytest.raises(PredictError, match="no-images: a folder without image files"):
        p.embed_images([tmp_path / "no-images"])


def test_empty_texts_are_refused_by_name(bench, finetuned, tmp_path):
    root, _, _ = bench
    paths, _ = paths_of(root, "ic")
    p = load(root / "pre.safetensors")
    with pytest.raises(PredictError, match="query 2 is empty"):
        p.search(["a left effusion", " \t"], paths)
    with pytest.raises(PredictError, match="label 1 is empty"):
        p.zero_shot_classify(paths, ["", "There is a device."])
    with pytest.raises(SystemExit, match="query 1 is empty"):
        predict.main(["search", "--checkpoint", str(root / "pre.safetensors"), "--images", str(paths[0]),
                      "--query", ""])
    (tmp_path / "q.txt").write_text("a left effusion\n\nno pneumothorax\n")
    with pytest.raises(SystemExit, match=f"{tmp_path / 'q.txt'}:2: empty line"):
        predict.main(["search", "--checkpoint", str(root / "pre.safetensors"), "--images", str(paths[0]),
                      "--queries", str(tmp_path / "q.txt")])
    with pytest.raises(PredictError, match="question 1 is empty"):
        load(finetuned["vqa"][0]).answer(paths[:1], "\u200b")
    with pytest.raises(PredictError, match="hypothesis 1 is empty"):
        load(finetuned["tc"][0]).nli("The heart is normal.", "")


def test_a_too_long_text_is_truncated_with_a_warning(bench, finetuned):
    root, tok, _ = bench
    paths, _ = paths_of(root, "ic")
    p = load(root / "pre.safetensors")
    long = " ".join(["There is a small left pleural effusion."] * 20)
    n = tok.encode([long], 10_000)[0].shape[1]  # untruncated length, specials included
    limit = p.backbone.config.max_text_len
    message = rf"query 2 .* has {n} tokens; the model reads {limit}: truncated by {n - limit} tokens"
    with pytest.warns(UserWarning, match=message):
        rows = p.search(["no effusion", long], paths[:2])
    cut = tok.decode(tok.encode([long], limit)[0][0])  # what the model reads
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert p.search(["no effusion", cut], paths[:2])[1]["hits"] == rows[1]["hits"]
    premise = "The heart size is normal."
    pair = tok.encode([premise], 10_000, pair=[long])[0].shape[1]
    message = rf"premise 1 .* has {pair} tokens with its pair.*truncated by {pair - limit}"
    with pytest.warns(UserWarning, match=message):
        load(finetuned["tc"][0]).nli(premise, long)


def test_checkpoints_of_the_wrong_kind_are_refused(bench, finetuned):
    root, _, _ = bench
    paths, _ = paths_of(root, "ic")
    pre = str(root / "pre.safetensors")
    with pytest.raises(PredictError, match=r"answer needs a checkpoint fine-tuned for visual question answering "
                                           r"\(finetune.py --task vqa\); .*pre.safetensors is a pre-training"):
        load(pre).answer(paths, "Is there an effusion?")
    inputs = {"answer": ["--images", str(paths[0]), "--question", "Is there an effusion?"],
              "report": ["--images", str(paths[0])], "summarize": ["--text", "Heart size is normal."],
              "nli": ["--premise", "Heart size is normal.", "--hypothesis", "The heart is large."]}
    for (command, args), task in zip(inputs.items(), ("vqa", "itg", "ts", "tc")):
        message = rf"{command} needs a checkpoint fine-tuned .*--task {task}\).*is fine-tuned for ic"
        with pytest.raises(SystemExit, match=message):
            predict.main([command, "--checkpoint", str(finetuned["ic"][0]), "--device", "cpu", *args])
    with pytest.raises(PredictError, match="ITC space of a pre-training or retrieval checkpoint; .* for vqa"):
        load(finetuned["vqa"][0]).search("an effusion", paths)
    with pytest.raises(PredictError, match="zero-shot classify reads the ITC space .* fine-tuned for ic"):
        load(finetuned["ic"][0]).zero_shot_classify(paths, ["There is effusion. | There is no effusion."])
    with pytest.raises(PredictError, match=r"classify needs a checkpoint fine-tuned .*--task ic\).*pre-training"):
        load(root / "pre.safetensors").classify(paths)


def test_foreign_or_corrupt_checkpoints_get_the_loaders_error(bench, tmp_path):
    root, tok, _ = bench
    paths, _ = paths_of(root, "ic")
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    (tmp_path / "pickle.safetensors").write_bytes(pickle.dumps(Trap()))
    torch.save({"a": torch.zeros(3)}, tmp_path / "torch.pt")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    data = (root / "pre.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:len(data) // 3])
    cases = {"pickle.safetensors": "not a readable safetensors checkpoint", "torch.pt": "never loaded",
             "foreign.safetensors": "not a PTUnifier checkpoint", "truncated.safetensors": "truncated",
             "missing.safetensors": "does not exist"}
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load(tmp_path / name)
        with pytest.raises(SystemExit, match=f"predict.py report: .*{name}.*{message}"):
            predict.main(["report", "--checkpoint", str(tmp_path / name), "--images", str(paths[0])])
    assert not marker.exists()  # nothing was unpickled
    # A tokenizer with another vocabulary: the checkpoint cannot read its ids.
    other = Tokenizer.train([r["text"] for r in read_manifest(root / "retrieval", "train")[0]], 300,
                            tmp_path / "other.json")
    with pytest.raises(CheckpointError, match=rf"vocab_size={tok.vocab_size}.*vocab_size={other.vocab_size}"):
        load(root / "pre.safetensors", tokenizer=tmp_path / "other.json")


@pytest.mark.parametrize("flags, message", [
    (["--top", "0"], "argument --top: expected an integer of at least 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer of at least 1, got 0"),
    (["--batch-size", "-3"], "argument --batch-size: expected an integer of at least 1, got -3"),
])
def test_flags_out_of_range_are_refused_by_name(bench, capsys, flags, message):
    root, _, _ = bench
    paths, _ = paths_of(root, "ic")
    with pytest.raises(SystemExit):
        predict.main(["search", "--checkpoint", str(root / "pre.safetensors"), "--images", str(paths[0]),
                      "--query", "an effusion", *flags])
    assert message in capsys.readouterr().err


def test_device_cuda_without_cuda_says_so(bench, monkeypatch):
    root, _, _ = bench
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA
    paths, _ = paths_of(root, "ic")
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device is visible to torch .*use --device cpu or auto"):
        predict.main(["search", "--checkpoint", str(root / "pre.safetensors"), "--images", str(paths[0]),
                      "--query", "an effusion", "--device", "cuda"])
