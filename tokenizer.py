"""The text side's tokenizer: RoBERTa byte-level BPE or BERT WordPiece on the `tokenizers` library.

- `clean_text`: the one text normalisation (control characters become spaces, whitespace runs
  collapse, ends are trimmed) used by manifests, prepare.py and the tokenizer alike.
- `Tokenizer`: loads tokenizer.json, vocab.json + merges.txt (RoBERTa) or vocab.txt (BERT),
  trains a small BPE for the synthetic benchmark (synth.py), encodes with specials, truncation
  and padding to a few bucket lengths (a compiled step meets few shapes), decodes.
- `locate_tokenizer`: which tokenizer a run reads; `round_up`: the bucket lengths (data.py's MLM
  positions use them too).
"""
import re
import unicodedata
from pathlib import Path

import tokenizers
import torch
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]")


def clean_text(text: str | None) -> str:
    """Replace control/format characters by spaces, collapse whitespace runs, trim; None -> ''."""
    text = _CONTROL.sub(" ", unicodedata.normalize("NFC", text or ""))
    return " ".join(text.split())


def round_up(n: int, multiple: int, cap: int) -> int:
    """n rounded up to a multiple of `multiple`, at most `cap` (and never below n)."""
    return max(n, min(cap, -(-n // multiple) * multiple))


def locate_tokenizer(data, explicit: str = "", text_encoder: str = "") -> Path:
    """The tokenizer of a run: `explicit` (--tokenizer), else the text encoder's Hugging Face folder
    (--text-init), else tokenizer.json in the task folder `data` or its parent (data/synth)."""
    if explicit:
        return Path(explicit)
    if text_encoder:
        return Path(text_encoder)
    for folder in (Path(data), Path(data).parent):
        if (folder / "tokenizer.json").exists():
            return folder / "tokenizer.json"
    raise SystemExit(f"no tokenizer.json in {data} or beside it: pass --tokenizer (or --text-init)")


SPECIALS_BPE = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0..4, RoBERTa order
SPECIALS_WORDPIECE = ("[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]")


class Tokenizer:
    """RoBERTa byte-level BPE or BERT lower-case WordPiece on the `tokenizers` library.

    Attributes: kind ("bpe" | "wordpiece"), vocab_size, bos_id, pad_id, eos_id, unk_id, mask_id
    (<s> <pad> </s> <unk> <mask>, or [CLS] [PAD] [SEP] [UNK] [MASK]), special_ids.
    """

    def __init__(self, backend: tokenizers.Tokenizer, kind: str):
        self.backend, self.kind = backend, kind
        names = SPECIALS_BPE if kind == "bpe" else SPECIALS_WORDPIECE
        ids = [backend.token_to_id(n) for n in names]
        if None in ids:
            raise ValueError(f"tokenizer lacks special tokens {names} (got ids {ids})")
        self.bos_id, self.pad_id, self.eos_id, self.unk_id, self.mask_id = ids
        self.special_ids = sorted(set(ids))
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Load tokenizer.json (file or folder), vocab.json+merges.txt, or vocab.txt."""
        path = Path(path)
        if path.is_file() and path.suffix == ".json":
            return cls._from_json(path)
        if (path / "tokenizer.json").is_file():
            return cls._from_json(path / "tokenizer.json")
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return cls(_bpe_backend(models.BPE.from_file(
                str(path / "vocab.json"), str(path / "merges.txt"))), "bpe")
        if (path / "vocab.txt").is_file():
            return cls(_wordpiece_backend(path / "vocab.txt"), "wordpiece")
        raise FileNotFoundError(f"{path}: expected tokenizer.json, vocab.json+merges.txt or "
                                "vocab.txt")

    @classmethod
    def _from_json(cls, path: Path) -> "Tokenizer":
        backend = tokenizers.Tokenizer.from_file(str(path))
        kind = "wordpiece" if isinstance(backend.model, models.WordPiece) else "bpe"
        return cls(backend, kind)

    @classmethod
    def train(cls, corpus: list[str], vocab_size: int, path) -> "Tokenizer":
        """Train a RoBERTa-style byte-level BPE (specials <s>=0 <pad>=1 </s>=2 <unk>=3
        <mask>=4) on `corpus` and save it as the tokenizer.json file `path`."""
        backend = _bpe_backend(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                      special_tokens=list(SPECIALS_BPE), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator([clean_text(t) for t in corpus], trainer=trainer)
        backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        backend.save(str(path))
        return cls._from_json(Path(path))

    def encode(self, texts: list[str], max_length: int, pair: list[str] | None = None, pad_to_multiple_of: int = 1):
        """Clean and tokenise `texts` (and `pair`, as second segments) with specials, truncate
        (longest first) to `max_length` and pad to the longest in the batch, rounded up to a
        multiple of `pad_to_multiple_of` (at most max_length: a few shapes for a compiled step).

        Returns (input_ids LongTensor[B, L], attention_mask LongTensor[B, L]), L <= max_length.
        Raises ValueError for a text that is empty after cleaning.
        """
        self.backend.enable_truncation(max_length, strategy="longest_first")
        self.backend.no_padding()
        encodings = self.backend.encode_batch(self._inputs(texts, pair))
        length = round_up(max(len(e.ids) for e in encodings), pad_to_multiple_of, max_length)
        ids = torch.full((len(encodings), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encodings), length), dtype=torch.long)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            mask[row, : len(e.ids)] = 1
        return ids, mask

    def count(self, texts: list[str], pair: list[str] | None = None) -> list[int]:
        """Tokens of each text (or pair), specials included, before `encode` truncates it."""
        self.backend.no_truncation()
        self.backend.no_padding()
        return [len(e.ids) for e in self.backend.encode_batch(self._inputs(texts, pair))]

    def _inputs(self, texts: list[str], pair: list[str] | None):
        """Cleaned texts, or (text, pair) tuples; an empty text raises."""
        firsts = [self._checked(t) for t in texts]
        return firsts if pair is None else list(zip(firsts, [self._checked(t) for t in pair]))

    @staticmethod
    def _checked(text: str) -> str:
        cleaned = clean_text(text)
        if not cleaned:
            raise ValueError(f"empty text after cleaning: {text!r}")
        return cleaned

    def decode(self, ids) -> str:
        """Token ids (list or 1-D tensor) -> text, special tokens removed."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        special = set(self.special_ids)
        return self.backend.decode([i for i in ids if i not in special]).strip()


def _bpe_backend(model) -> tokenizers.Tokenizer:
    """A RoBERTa pipeline: byte-level pre-tokenizer without prefix space, <s> A </s></s> B </s>."""
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if backend.token_to_id("</s>") is not None:
        backend.post_processor = processors.RobertaProcessing(
            ("</s>", backend.token_to_id("</s>")), ("<s>", backend.token_to_id("<s>")))
    return backend


def _wordpiece_backend(vocab_txt: Path) -> tokenizers.Tokenizer:
    """A BERT uncased pipeline: [CLS] A [SEP] B [SEP], lower-casing and accent stripping."""
    backend = tokenizers.Tokenizer(models.WordPiece.from_file(str(vocab_txt), unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.BertProcessing(
        ("[SEP]", backend.token_to_id("[SEP]")), ("[CLS]", backend.token_to_id("[CLS]")))
    return backend
