"""Use a trained PTUnifier on your own images and texts: one command, one Python object.

    python predict.py search   --checkpoint runs/pretrain/checkpoint.safetensors --images scans/ \
                               --query "left pleural effusion" --sheet hits.png
    python predict.py classify --checkpoint runs/pretrain/checkpoint.safetensors --images scans/
    python predict.py answer   --checkpoint runs/ft-vqa/best.safetensors --images scans/a.png \
                               --question "Is there a pleural effusion?"
    python predict.py report   --checkpoint runs/ft-itg/best.safetensors --images scans/

In a notebook: `p = Predictor.load("runs/pretrain/checkpoint.safetensors")`, then `p.search("left
pleural effusion", ["scans/"])`, `p.zero_shot_classify(["scans/"])` (an `ic` checkpoint:
`p.classify`), ... (the commands call these methods).

Every answer is computed by the evaluation code's own pieces, so that it is what the evaluation
computes for the same inputs (tests/test_predict.py checks it):

| command     | checkpoint             | computed by                                                   |
|-------------|------------------------|---------------------------------------------------------------|
| embed       | pre-training/retrieval | ITC embeddings of the image-only / text-only pass (Eq. 3-4,   |
|             |                        | 9-10): zeroshot.image_embeddings / text_embeddings            |
| search      | pre-training/retrieval | their dot products, as zero-shot retrieval ranks              |
| classify    | pre-training/retrieval | zero-shot: zeroshot.present_probabilities of "There is        |
|             |                        | {finding}." against "There is no {finding}."                  |
| classify    | ic                     | the head's sigmoid per finding (as finetune.score_ic)         |
| answer      | vqa                    | the head's best answer (as finetune.score_vqa)                |
| report      | itg                    | the decoder, with the run's search settings                   |
| summarize   | ts                     |   (finetune.generate_texts, as finetune.score_generation)     |
| nli         | tc                     | the head's softmax over the classes (as finetune.score_tc)    |

Images: files, or folders searched recursively for the formats PIL opens (PNG, JPEG, TIFF, ...;
`data.load_image`) and DICOM (.dcm, read by `dicom.read_dicom`: its window, MONOCHROME1 inverted;
needs pydicom). Each is read as the evaluation reads it: the shorter side resized to the model's
size, the centre crop, CLIP colours.
Bad input: an unreadable image raises `data.UnreadableImage` naming it (or, with skip_bad, is
listed in `Predictor.skipped` and left out); an empty text raises `PredictError` naming it; a text
longer than the model reads is truncated with a warning that says by how many tokens; a checkpoint
that is not this project's, or is corrupt, raises `checkpoint.CheckpointError` (nothing is
unpickled).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import synth
from checkpoint import CheckpointError, atomic_save, load_pretrained
from data import IMAGE_SUFFIXES, Batch, UnreadableImage, image_to_tensor, load_image
from runtime import Runtime, setup_runtime
from tasks import Decoding, generate_texts, load_finetuned, vocabulary_mismatch
from tokenizer import Tokenizer, clean_text, locate_tokenizer
from zeroshot import default_label_sentences, image_embeddings, present_probabilities, text_embeddings

TASK_NAMES = {"ic": "image classification", "tc": "natural-language inference", "ts": "summarization",
              "itg": "report generation", "vqa": "visual question answering", "retrieval": "retrieval"}


class PredictError(ValueError):
    """An input or a checkpoint that the asked-for prediction cannot use; the message names it."""


@dataclass
class Embeddings:
    """Unit-norm ITC embeddings and what they embed."""
    items: list[str]       # the image paths (unreadable ones skipped), or the texts
    vectors: torch.Tensor  # [N, E] float32, on the CPU


def image_files(paths) -> list[Path]:
    """The image files named, and those under the folders named (recursive, sorted), in order."""
    files = []
    for path in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if not path.is_dir():
            files.append(path)  # a missing or non-image file: load_image names it
            continue
        found = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not found:
            raise PredictError(f"{path}: a folder without image files (looked for "
                               f"{', '.join(sorted(IMAGE_SUFFIXES)[:12])}, ...)")
        files += found
    return files


def load_tokenizer(checkpoint, meta: dict, explicit=None) -> tuple[Tokenizer, Path]:
    """(tokenizer, its path): --tokenizer, else the one the checkpoint's run read, found as that
    run found it (its --tokenizer, --text-init, or tokenizer.json beside its data)."""
    run = (meta.get("finetune") or {}).get("config") or meta.get("train_config") or {}
    try:
        if not (explicit or run.get("data") or run.get("tokenizer")):
            raise SystemExit("its run recorded no data folder")
        path = locate_tokenizer(run.get("data") or "", explicit or run.get("tokenizer") or "",
                                run.get("text_init") or "")
        return Tokenizer.load(path), path
    except SystemExit:
        raise PredictError(f"{checkpoint}: no tokenizer where its run read it (beside {run.get('data')!r}): "
                           "pass --tokenizer") from None
    except Exception as e:  # tokenizers raises its own errors for a broken file
        raise PredictError(f"cannot load the tokenizer {explicit or path}: {e}") from None


class Predictor:
    """A trained checkpoint, ready for images and texts. `Predictor.load(path)`; then the methods
    below (lists of rows, one dict per input, JSON-ready). Runs in eval mode without gradients."""

    def __init__(self, model, tokenizer: Tokenizer, meta: dict, rt: Runtime, name: str,
                 batch_size: int = 64, skip_bad: bool = False, progress: bool = True):
        self.model = model  # finetune.FinetuneModel, or the PTUnifier of a pre-training checkpoint
        self.backbone = getattr(model, "backbone", model)
        self.tokenizer, self.rt, self.device, self.name = tokenizer, rt, rt.device, name
        saved = meta.get("finetune") or {}
        self.kind = saved.get("task", "pretrain")     # pretrain, or the fine-tuned task
        self.outputs = list(saved.get("outputs", []))  # the head's classes or answers
        self.run = Decoding.of(saved["config"]) if saved else None  # its decoding settings
        self.batch_size, self.skip_bad, self.progress = batch_size, skip_bad, progress
        self.skipped: list[str] = []  # every unreadable image skipped so far (with skip_bad)

    @classmethod
    def load(cls, checkpoint, tokenizer=None, device: str = "auto", **options) -> "Predictor":
        """The model of a pre-training or fine-tuned checkpoint and its tokenizer (--tokenizer, else
        the one its run read). device: auto (CUDA when present, with the evaluation's autocast) |
        cpu | cuda; options: batch_size, skip_bad, progress."""
        backbone, meta, tensors = load_pretrained(checkpoint)
        tok, tokenizer_path = load_tokenizer(checkpoint, meta, tokenizer)
        mismatch = vocabulary_mismatch(checkpoint, backbone.config, tok, tokenizer_path)
        if mismatch:
            raise CheckpointError(mismatch)
        model = load_finetuned(checkpoint, backbone, meta, tensors) if meta.get("finetune") else backbone
        rt = setup_runtime(device)
        return cls(model.to(rt.device).eval(), tok, meta, rt, str(checkpoint), **options)

    def describe(self) -> str:
        if self.kind == "pretrain":
            return f"{self.name} is a pre-training checkpoint"
        return f"{self.name} is fine-tuned for {self.kind} ({TASK_NAMES[self.kind]})"

    # -- the ITC space: embeddings, search, zero-shot classification --------------------------

    @torch.no_grad()
    def embed_images(self, images) -> Embeddings:
        """ITC embeddings of the image-only pass (image + textual prompts)."""
        self._require_itc("embed_images")
        paths, chunks = image_files(images), []
        for _, batch in self._image_batches(paths):
            chunks.append((batch.ids, image_embeddings(self.backbone, batch.pixel_values)[0].float().cpu()))
        return Embeddings([p for ids, _ in chunks for p in ids], self._stack(c for _, c in chunks))

    @torch.no_grad()
    def embed_texts(self, texts, what: str = "text") -> Embeddings:
        """ITC embeddings of the text-only pass (text + visual prompts); `what` names the texts in errors."""
        self._require_itc("embed_texts")
        texts = self._checked(texts, what)
        chunks = [text_embeddings(self.backbone, b.input_ids, b.attention_mask)[0].float().cpu()
                  for b in self._text_batches(texts, what)]
        return Embeddings(texts, self._stack(chunks))

    def search(self, queries, images, top: int = 5) -> list[dict]:
        """The `top` images most similar to each text query: {line, query, hits: [{rank, score, path}]}.
        queries: texts; images: files or folders; either may be Embeddings already computed."""
        text = queries if isinstance(queries, Embeddings) else self.embed_texts(queries, "query")
        found = images if isinstance(images, Embeddings) else self.embed_images(images)
        return [dict(line=i + 1, query=q, hits=_hits(row, top, path=found.items))
                for i, (q, row) in enumerate(zip(text.items, text.vectors @ found.vectors.T))]  # [Q, N]

    def search_texts(self, images, texts, top: int = 5) -> list[dict]:
        """The `top` texts most similar to each image: {path, hits: [{rank, score, line, text}]}
        (images, texts: as for `search`)."""
        found = images if isinstance(images, Embeddings) else self.embed_images(images)
        text = texts if isinstance(texts, Embeddings) else self.embed_texts(texts)
        lines = list(range(1, len(text.items) + 1))
        return [dict(path=p, hits=_hits(row, top, line=lines, text=text.items))
                for p, row in zip(found.items, found.vectors @ text.vectors.T)]  # [N, T]

    @torch.no_grad()
    def zero_shot_classify(self, images, labels=None) -> list[dict]:
        """{path, scores: {label: probability}} per image from the ITC space: with no labels,
        P(present) of each synthetic finding ("There is {finding}." against "There is no
        {finding}."); a label "positive | negative" is scored the same way; plain label sentences
        (two or more) share a softmax."""
        self._require_itc("zero-shot classify")
        names, positives, negatives = _labels(labels)
        self._nonempty(positives + negatives, "label")  # before the images are read
        found = self.embed_images(images)
        label_emb = self.embed_texts(positives + negatives, "label").vectors  # [C or 2C, E]
        scale = float(self.backbone.logit_scale())
        if negatives:
            probs = present_probabilities(found.vectors, label_emb, scale)       # [N, C]
        else:
            probs = torch.softmax(scale * found.vectors.double() @ label_emb.double().T, dim=1)  # [N, C]
        return [dict(path=p, scores=dict(zip(names, row.tolist()))) for p, row in zip(found.items, probs)]

    # -- fine-tuned heads -----------------------------------------------------------------------

    @torch.no_grad()
    def classify(self, images) -> list[dict]:
        """{path, scores: {finding: probability}} per image: the `ic` head's sigmoid per finding."""
        self._require("classify", "ic")
        return [dict(path=path, scores=dict(zip(self.outputs, p.tolist())))
                for _, batch in self._image_batches(image_files(images))
                for path, p in zip(batch.ids, torch.sigmoid(self._head(batch)))]

    @torch.no_grad()
    def answer(self, images, questions) -> list[dict]:
        """{path, question, answer, probability} per image: the `vqa` head's best answer; `questions`
        is one question for every image, or one per image."""
        self._require("answer", "vqa")
        paths = image_files(images)
        questions = [questions] * len(paths) if isinstance(questions, str) else list(questions)
        if len(questions) != len(paths):
            raise PredictError(f"{len(questions)} questions for {len(paths)} images: give one, or one per image")
        questions, rows = self._checked(questions, "question"), []
        for kept, batch in self._image_batches(paths, questions):
            best_p, best = torch.sigmoid(self._head(batch)).max(dim=1)  # [b] each
            rows += [dict(path=str(paths[i]), question=questions[i], answer=self.outputs[a], probability=p)
                     for i, a, p in zip(kept, best.tolist(), best_p.tolist())]
        return rows

    @torch.no_grad()
    def report(self, images) -> list[dict]:
        """{path, report} per image: the `itg` decoder's findings."""
        self._require("report", "itg")
        return [dict(path=path, report=text) for _, batch in self._image_batches(image_files(images))
                for path, text in zip(batch.ids, self._generate(batch))]

    @torch.no_grad()
    def summarize(self, texts) -> list[dict]:
        """{line, text, summary} per text: the `ts` decoder's impression of the findings."""
        self._require("summarize", "ts")
        texts = self._checked(texts, "text")
        summaries = [s for batch in self._text_batches(texts, "texts") for s in self._generate(batch)]
        return [dict(line=i + 1, text=t, summary=s) for i, (t, s) in enumerate(zip(texts, summaries))]

    @torch.no_grad()
    def nli(self, premises, hypotheses) -> list[dict]:
        """{premise, hypothesis, label, probabilities} per pair: the `tc` head's softmax."""
        self._require("nli", "tc")
        premises, hypotheses = ([t] if isinstance(t, str) else list(t) for t in (premises, hypotheses))
        if len(premises) != len(hypotheses):
            raise PredictError(f"{len(premises)} premises for {len(hypotheses)} hypotheses: give pairs")
        hypotheses = self._nonempty(hypotheses, "hypothesis")
        premises = self._checked(premises, "premise", pair=hypotheses)
        probabilities = [p for batch in self._text_batches(premises, "pairs", pairs=hypotheses)
                         for p in torch.softmax(self._head(batch), dim=1).tolist()]
        return [dict(premise=p, hypothesis=h, label=self.outputs[max(range(len(probs)), key=probs.__getitem__)],
                     probabilities=dict(zip(self.outputs, probs)))
                for p, h, probs in zip(premises, hypotheses, probabilities)]

    # -- the pieces -----------------------------------------------------------------------------

    def _require(self, action: str, task: str) -> None:
        if self.kind != task:
            raise PredictError(f"{action} needs a checkpoint fine-tuned for {TASK_NAMES[task]} "
                               f"(finetune.py --task {task}); {self.describe()}")

    def _require_itc(self, action: str) -> None:
        if self.kind not in ("pretrain", "retrieval"):
            raise PredictError(f"{action} reads the ITC space of a pre-training or retrieval checkpoint; "
                               f"{self.describe()}")

    def _head(self, batch: Batch) -> torch.Tensor:
        """The fine-tuned classifier's logits [b, outputs] (fp32, CPU), under the evaluation's autocast."""
        with self.rt.autocast():
            return self.model.outputs(batch).float().cpu()

    def _generate(self, batch: Batch) -> list[str]:
        """The fine-tuned decoder's text for each input of the batch, searched as its run scored it."""
        with self.rt.autocast():
            return generate_texts(self.model, batch, self.tokenizer, self.run)

    def _image_batches(self, paths: list[Path], questions: list[str] | None = None):
        """The one image adapter: (indices into paths, Batch on the device: ids = the paths, pixels
        [b, 3, S, S] as the evaluation reads them, with `questions` each one's question tokenised)
        per batch of `batch_size` paths. An unreadable image raises UnreadableImage, or with
        skip_bad joins self.skipped."""
        size = self.backbone.config.image_size
        bar = self._bar(len(paths), "images")
        for start in range(0, len(paths), self.batch_size):
            kept, pixels = [], []
            for i in range(start, min(start + self.batch_size, len(paths))):
                try:
                    pixels.append(image_to_tensor(load_image(paths[i], keep_grey=True), size, train=False))
                    kept.append(i)
                except UnreadableImage as e:
                    if not self.skip_bad:
                        raise
                    self.skipped.append(str(e))
            bar.update(min(self.batch_size, len(paths) - start))
            if kept:
                batch = Batch(ids=[str(paths[i]) for i in kept], pixel_values=torch.stack(pixels).to(self.device))
                yield kept, batch if questions is None else self._tokens(batch, [questions[i] for i in kept])
        bar.close()

    def _text_batches(self, texts: list[str], desc: str, pairs: list[str] | None = None):
        """The one text adapter: a Batch per slice of `batch_size` texts (ids = the texts, tokens on
        the device; with `pairs`, each text with its pair), with a progress bar on long inputs."""
        bar = self._bar(len(texts), desc)
        for start in range(0, len(texts), self.batch_size):
            part = texts[start:start + self.batch_size]
            yield self._tokens(Batch(ids=part), part, None if pairs is None else pairs[start:start + self.batch_size])
            bar.update(len(part))
        bar.close()

    def _tokens(self, batch: Batch, texts: list[str], pair: list[str] | None = None) -> Batch:
        """`batch` with `texts` (and their pairs) tokenised as the evaluation does, on the device."""
        ids, mask = self.tokenizer.encode(texts, self.backbone.config.max_text_len, pair=pair)
        return dataclasses.replace(batch, input_ids=ids.to(self.device), attention_mask=mask.to(self.device))

    def _bar(self, total: int, desc: str) -> tqdm:
        """A progress bar on stderr for inputs longer than one batch (shown on a terminal only)."""
        return tqdm(total=total, desc=desc, file=sys.stderr,
                    disable=True if not self.progress or total <= self.batch_size else None)

    @staticmethod
    def _nonempty(texts, what: str) -> list[str]:
        """`texts` (a list, or one str) as a list; an empty one raises, naming it (what + 1-based position)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise PredictError(f"no {what} given")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not clean_text(t):
                raise PredictError(f"{what} {i + 1} is empty ({t!r})")
        return texts

    def _checked(self, texts, what: str, pair: list[str] | None = None) -> list[str]:
        """`_nonempty`, and a warning for each text longer than the model reads (with its pair),
        saying by how many tokens it is cut."""
        texts = self._nonempty(texts, what)
        longest = self.backbone.config.max_text_len
        cut = [(i, n) for i, n in enumerate(self.tokenizer.count(texts, pair)) if n > longest]
        if len(cut) == 1:
            (i, n), = cut
            warnings.warn(f"{what} {i + 1} ({textwrap.shorten(texts[i], 40)!r}) has {n} tokens"
                          f"{' with its pair' if pair else ''}; the model reads {longest}: "
                          f"truncated by {n - longest} tokens", stacklevel=2)
        elif cut:  # one warning for the lot
            shown = ", ".join(f"{what} {i + 1} by {n - longest}" for i, n in cut[:5])
            warnings.warn(f"{len(cut)} of {len(texts)} texts are longer than the model reads "
                          f"({longest} tokens{' with the pair' if pair else ''}) and were truncated: "
                          f"{shown}{', ...' if len(cut) > 5 else ''} tokens", stacklevel=2)
        return texts

    def _stack(self, chunks) -> torch.Tensor:
        chunks = list(chunks)
        return torch.cat(chunks) if chunks else torch.zeros(0, self.backbone.config.embed_dim)


def _hits(scores: torch.Tensor, top: int, **items: list) -> list[dict]:
    """The `top` best of scores [N] (ties: the earlier item first): {rank, score, <item fields>}."""
    order = torch.sort(scores, descending=True, stable=True).indices[:top].tolist()
    return [dict(rank=r + 1, score=float(scores[j]), **{k: v[j] for k, v in items.items()})
            for r, j in enumerate(order)]


def _labels(labels) -> tuple[list[str], list[str], list[str]]:
    """(names, positive sentences, negative sentences or []) of classify's labels."""
    if not labels:
        sentences = default_label_sentences(synth.IC_CLASSES)
        return list(sentences), [p for p, _ in sentences.values()], [n for _, n in sentences.values()]
    labels = [labels] if isinstance(labels, str) else list(labels)
    pairs = [[part.strip() for part in label.split("|")] for label in labels]
    if all(len(p) == 2 for p in pairs):
        return [p for p, _ in pairs], [p for p, _ in pairs], [n for _, n in pairs]
    if any(len(p) != 1 for p in pairs) or len(pairs) < 2:
        raise PredictError(f"labels {labels}: give two or more sentences (one softmax over them), or "
                           "'positive | negative' pairs (a probability each); not a mix")
    return labels, labels, []


# ----------------------------------------------------------------------------- the command line


def read_lines(path) -> list[str]:
    """The texts of a file, one a line; an empty line is an error naming file:line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PredictError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    for n, line in enumerate(lines, start=1):
        if not clean_text(line):
            raise PredictError(f"{path}:{n}: empty line (one text per line)")
    if not lines:
        raise PredictError(f"{path}: no texts in it")
    return lines


def save_embeddings(path, found: Embeddings, modality: str, checkpoint: str) -> None:
    """safetensors: "embeddings" [N, E]; metadata: what each row is, the modality and checkpoint."""
    meta = dict(items=found.items, modality=modality, checkpoint=checkpoint)
    atomic_save(Path(path), {"embeddings": found.vectors.contiguous()},
                {"ptunifier-embeddings": json.dumps(meta)})


def contact_sheet(results: list[dict], path, thumb: int = 112, most: int = 6) -> None:
    """A PNG of the first `most` text queries of `search`: the query, then its hits as thumbnails
    with rank and similarity."""
    results = results[:most]
    columns = max(1, max(len(r["hits"]) for r in results))
    width, row = 10 + columns * (thumb + 10), 40 + thumb + 22
    sheet = Image.new("RGB", (width, 10 + len(results) * row), "white")
    draw = ImageDraw.Draw(sheet)
    for i, result in enumerate(results):
        y = 10 + i * row
        lines = textwrap.wrap(f"query {result['line']}: {result['query']}", width // 6 - 2)
        draw.text((10, y), "\n".join(lines[:2]) + (" ..." if len(lines) > 2 else ""), fill="black")
        for hit in result["hits"]:
            x = 10 + (hit["rank"] - 1) * (thumb + 10)
            sheet.paste(load_image(hit["path"]).resize((thumb, thumb)), (x, y + 34))
            draw.text((x, y + 36 + thumb), f"#{hit['rank']}  {hit['score']:.3f}", fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def print_table(rows: list[dict], columns: list[str], width: int = 48) -> None:
    """Aligned columns; texts (not paths) cut to `width` characters, but in the last column."""
    def cell(value, column: str, last: bool) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return text if last or column == "path" or len(text) <= width else text[:width - 3] + "..."
    cells = [[cell(r[c], c, j == len(columns) - 1) for j, c in enumerate(columns)] for r in rows]
    sizes = [max([len(c)] + [len(line[j]) for line in cells]) for j, c in enumerate(columns)]
    for line in [columns] + cells:
        print("  ".join(text.ljust(size) for text, size in zip(line, sizes)).rstrip())


def run_embed(p: Predictor, a) -> list[dict]:
    if a.images:
        found = p.embed_images(a.images)
        rows = [dict(path=item) for item in found.items]
    else:
        found = p.embed_texts(read_lines(a.texts_file))
        rows = [dict(line=i + 1, text=item) for i, item in enumerate(found.items)]
    save_embeddings(a.out, found, "image" if a.images else "text", p.name)
    print(f"{tuple(found.vectors.shape)} embeddings written to {a.out}", file=sys.stderr)
    return [dict(row, embedding=v) for row, v in zip(rows, found.vectors.tolist())]


def run_search(p: Predictor, a) -> list[dict]:
    if a.image_query:
        if not a.texts_file or a.sheet:
            raise PredictError("--image-query ranks the lines of --texts-file (and --sheet draws ranked images: "
                               "use it with --query / --queries)")
        return p.search_texts(a.image_query, read_lines(a.texts_file), a.top)
    if not a.images:
        raise PredictError("--query / --queries rank the images of --images")
    results = p.search(a.query if a.query is not None else read_lines(a.queries), a.images, a.top)
    if a.sheet:
        contact_sheet(results, a.sheet)
    return results


COMMANDS = {
    "embed": run_embed,
    "search": run_search,
    "classify": lambda p, a: p.classify(a.images) if p.kind == "ic" and not a.labels else
                             p.zero_shot_classify(a.images, a.labels),
    "answer": lambda p, a: p.answer(a.images, a.question),
    "report": lambda p, a: p.report(a.images),
    "summarize": lambda p, a: p.summarize([a.text] if a.text is not None else read_lines(a.texts_file)),
    "nli": lambda p, a: p.nli(a.premise, a.hypothesis),
}


def show(command: str, rows: list[dict], args) -> None:
    """The rows as a readable table on stdout."""
    if command == "embed":
        print_table(rows, ["path"] if args.images else ["line", "text"])
    elif command == "search":
        for r in rows:
            print(f"query {r['line']}: {r['query']}" if "query" in r else f"image {r['path']}")
            print_table(r["hits"], ["rank", "score", "path" if "path" in r["hits"][0] else "text"])
    elif command == "classify":
        names = list(rows[0]["scores"]) if rows else []
        short = {n: n if len(n) <= 14 else f"label {i + 1}" for i, n in enumerate(names)}
        for n in names:
            if short[n] != n:
                print(f"{short[n]}: {n}")
        print_table([dict(path=r["path"], **{short[n]: s for n, s in r["scores"].items()}) for r in rows],
                    ["path", *short.values()])
    else:
        print_table(rows, {"answer": ["path", "question", "probability", "answer"], "report": ["path", "report"],
                           "summarize": ["line", "text", "summary"],
                           "nli": ["premise", "hypothesis", "label"]}[command])


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="a pre-training checkpoint (checkpoint.safetensors) or "
                        "a fine-tuned one (best.safetensors of finetune.py)")
    common.add_argument("--tokenizer", help="tokenizer.json or folder (default: the one the checkpoint's run read)")
    common.add_argument("--jsonl", help="write one JSON object per input to this file instead of printing a table")
    common.add_argument("--batch-size", type=positive, default=64, help="inputs per forward pass; lower it (16, 4) "
                        "if you run out of memory")
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    common.add_argument("--skip-bad", action="store_true", help="skip unreadable images and list them at the "
                        "end (default: stop at the first, naming it)")
    images = dict(nargs="+", metavar="P", help="image files or folders (searched recursively)")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("embed", parents=[common], help="ITC embeddings of images or texts, to a safetensors file")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", **images)
    what.add_argument("--texts-file", metavar="F", help="texts, one a line")
    p.add_argument("--out", required=True, help="the embeddings file (safetensors: 'embeddings' [N, E])")

    p = sub.add_parser("search", parents=[common], help="the images closest to texts (or the texts closest "
                       "to images) in the ITC space")
    p.add_argument("--images", **images)
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--query", help="one text query")
    query.add_argument("--queries", metavar="F", help="text queries, one a line (one model load for all)")
    query.add_argument("--image-query", nargs="+", metavar="P", help="images as queries, against --texts-file")
    p.add_argument("--texts-file", metavar="F", help="with --image-query: the texts to rank, one a line")
    p.add_argument("--top", type=positive, default=5, help="hits per query")
    p.add_argument("--sheet", metavar="S.png", help="draw the hits of the first 6 queries as a contact sheet")

    p = sub.add_parser("classify", parents=[common], help="findings per image: zero-shot, or a fine-tuned ic head")
    p.add_argument("--images", required=True, **images)
    p.add_argument("--labels", nargs="+", metavar="SENTENCE", help="zero-shot labels: two or more sentences "
                   "(one softmax), or 'positive | negative' pairs; default: the synthetic benchmark's findings")

    p = sub.add_parser("answer", parents=[common], help="answer a question about each image (vqa checkpoint)")
    p.add_argument("--images", required=True, **images)
    p.add_argument("--question", required=True, help="the question, asked of every image")

    p = sub.add_parser("report", parents=[common], help="write the findings of each image (itg checkpoint)")
    p.add_argument("--images", required=True, **images)

    p = sub.add_parser("summarize", parents=[common], help="the impression of findings (ts checkpoint)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="findings to summarise")
    what.add_argument("--texts-file", metavar="F", help="findings, one a line")

    p = sub.add_parser("nli", parents=[common], help="entailment, contradiction or neutral (tc checkpoint)")
    p.add_argument("--premise", required=True)
    p.add_argument("--hypothesis", required=True)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            predictor = Predictor.load(args.checkpoint, args.tokenizer, args.device, batch_size=args.batch_size,
                                       skip_bad=args.skip_bad)
            rows = COMMANDS[args.command](predictor, args)
        except (PredictError, UnreadableImage, CheckpointError) as e:
            raise SystemExit(f"predict.py {args.command}: {e}") from None
        finally:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
    if args.jsonl:
        Path(args.jsonl).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{len(rows)} lines written to {args.jsonl}", file=sys.stderr)
    else:
        show(args.command, rows, args)
    if predictor.skipped:
        print(f"skipped {len(predictor.skipped)} unreadable images:\n  " + "\n  ".join(predictor.skipped),
              file=sys.stderr)


if __name__ == "__main__":
    main()
