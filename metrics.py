"""Metrics of the paper's Table 2, written from scratch on numpy and the standard library.

- image classification (CheXpert, RSNA): AUROC, macro AUROC over labels;
- text classification (RadNLI): accuracy;
- VQA (VQA-RAD, SLAKE, MedVQA-2019): exact-match accuracy, open / closed / overall;
- retrieval (ROCO ITR/TIR): Recall@K in both directions;
- generation (MIMIC-CXR ITG and TS): BLEU-1..4, ROUGE-L, CIDEr-D, METEOR, and the clinical
  efficacy of generated reports.

Conventions. Every score is a fraction (AUROC, accuracy, recall, BLEU, ROUGE-L and METEOR in
[0, 1]; CIDEr-D in [0, 10]); the paper's tables print 100 x score. BLEU, ROUGE-L and CIDEr-D give
the same numbers as pycocoevalcap 1.2 (Bleu(4) with option 'closest', Rouge, Cider) on text
normalised by `normalize_text`; METEOR is the reference METEOR 1.5 jar shipped inside
pycocoevalcap, run with Java, and is reported unavailable (None plus a reason), never 0, when
either is missing. AUROC equals scikit-learn's roc_auc_score, ties included. Inputs may be numpy
arrays, lists or tensors (read through `.detach().cpu()` without importing torch here).
"""
import importlib.util
import math
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from data import normalize_answer



def _to_numpy(x, name: str) -> np.ndarray:
    """Tensor (any device, any grad state), array or nested list -> numpy float64/int array."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"metrics.py: {name} contains NaN")
    return arr


# ---- classification: AUROC, accuracy --------------------------------------------------------


def auroc(scores, labels) -> float:
    """Binary ROC AUC, identical to sklearn.metrics.roc_auc_score (ties included).

    scores[N] (any real, higher = more positive), labels[N] in {0, 1}.
    The ROC curve has one point per *distinct* score threshold t (descending):
        TPR(t) = #{positives with score >= t} / P,   FPR(t) = #{negatives with score >= t} / Q,
    starting at (0, 0); AUC is the trapezoid area under it. Tied scores therefore move TPR and FPR
    together in one diagonal step, which counts a tied positive/negative pair as 1/2 (the
    Mann-Whitney U statistic). Raises ValueError when only one label value is present
    (the AUC is undefined; scikit-learn raises too).
    """
    s = _to_numpy(scores, "scores").astype(np.float64).reshape(-1)
    y = _to_numpy(labels, "labels").reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"metrics.py auroc: scores {s.shape} and labels {y.shape} differ in shape")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("metrics.py auroc: labels must be 0/1")
    y = y.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("metrics.py auroc: only one class present in labels; AUROC is undefined")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_threshold = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # end index of each tie group
    tpr = np.r_[0.0, np.cumsum(y)[last_of_threshold] / n_pos]
    fpr = np.r_[0.0, np.cumsum(~y)[last_of_threshold] / n_neg]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def macro_auroc(scores, labels) -> float:
    """Unweighted mean of `auroc` over classes (CheXpert / RSNA metric).

    scores[N, C], labels[N, C] in {0, 1}. A class whose labels hold a single value has no AUROC:
    raises ValueError naming the class index (as scikit-learn's roc_auc_score(average="macro")
    does) instead of silently skipping it.
    """
    s = _to_numpy(scores, "scores")
    y = _to_numpy(labels, "labels")
    if s.ndim != 2 or s.shape != y.shape:
        raise ValueError(f"metrics.py macro_auroc: expected scores and labels [N, C], got {s.shape}, {y.shape}")
    per_class, excluded = class_aurocs(s, y, list(range(s.shape[1])))
    if excluded:
        raise ValueError(f"metrics.py macro_auroc: class {excluded[0]} has a single label value; AUROC is undefined")
    return float(np.mean(list(per_class.values())))


def class_aurocs(scores, labels, names: list[str]) -> tuple[dict[str, float], list[str]]:
    """Per-class `auroc` of scores[N, C] against labels[N, C], for the classes whose labels take
    both values: ({name: AUROC}, [names of the classes left out, which have no AUROC])."""
    s, y = _to_numpy(scores, "scores"), _to_numpy(labels, "labels")
    per_class, excluded = {}, []
    for c, name in enumerate(names):
        if np.unique(y[:, c]).size < 2:
            excluded.append(name)
        else:
            per_class[name] = auroc(s[:, c], y[:, c])
    return per_class, excluded


def accuracy(pred, target) -> float:
    """Fraction of exact matches. pred[N] class ids, or pred[N, C] scores (argmax is taken);
    target[N] class ids."""
    p = _to_numpy(pred, "pred")
    t = _to_numpy(target, "target").reshape(-1)
    if p.ndim == 2:
        p = p.argmax(axis=1)
    if p.shape != t.shape or t.size == 0:
        raise ValueError(f"metrics.py accuracy: pred {p.shape} and target {t.shape} must be equal, non-empty")
    return float(np.mean(p == t))


def clinical_efficacy(pred, target, classes: Sequence[str]) -> dict:
    """Clinical efficacy of generated reports (as R2Gen and later report-generation papers score
    MIMIC-CXR with the CheXpert labeler): pred / target [N, C] 0/1 labels read from the generated
    and the reference reports. Micro precision, recall and F1 over all N x C cells, macro F1 (mean
    of the per-class F1) and each class's F1; a ratio with a zero denominator is 0 (scikit-learn's
    zero_division=0)."""
    p = _to_numpy(pred, "pred").astype(bool)
    t = _to_numpy(target, "target").astype(bool)
    if p.shape != t.shape or p.ndim != 2 or p.shape[1] != len(classes) or p.shape[0] == 0:
        raise ValueError(f"metrics.py clinical_efficacy: pred {p.shape} and target {t.shape} must both be "
                         f"[N > 0, {len(classes)}] (one column per class)")
    ratio = lambda a, b: float(a / b) if b else 0.0  # noqa: E731
    tp, fp, fn = (p & t).sum(0), (p & ~t).sum(0), (~p & t).sum(0)  # [C] each
    f1 = [ratio(2 * a, 2 * a + b + c) for a, b, c in zip(tp, fp, fn)]
    return dict(ce_precision=ratio(tp.sum(), tp.sum() + fp.sum()), ce_recall=ratio(tp.sum(), tp.sum() + fn.sum()),
                ce_f1=ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum()), ce_macro_f1=float(np.mean(f1)),
                ce_f1_per_class=dict(zip(classes, f1)))


# ---- VQA --------------------------------------------------------------------------------------


@dataclass
class VQAScores:
    overall: float                # correct / all questions
    open: float | None            # correct / open questions; None when there are none
    closed: float | None          # correct / closed questions; None when there are none
    n_open: int
    n_closed: int
    n_gold_out_of_vocab: int      # questions whose gold answer is not in the vocabulary (counted wrong)


def vqa_accuracy(pred_answers: Sequence[str], gold_answers: Sequence[str],
                 answer_types: Sequence[str], vocabulary: Sequence[str] | None = None) -> VQAScores:
    """Exact-match VQA accuracy after `normalize_answer`, split by answer type.

    A question is correct when normalize(pred) == normalize(gold) and, when a vocabulary is given
    (the classifier's answer list, built from train+val), the gold answer is in it: a classifier
    can never output an out-of-vocabulary gold, so such questions are counted wrong and reported
    in n_gold_out_of_vocab rather than dropped (dropping them inflates the score).
    answer_types[i] must be "open" or "closed".
    """
    if not len(pred_answers) == len(gold_answers) == len(answer_types) > 0:
        raise ValueError("metrics.py vqa_accuracy: pred_answers, gold_answers, answer_types must "
                         f"have equal non-zero length, got {len(pred_answers)}, {len(gold_answers)}, {len(answer_types)}")
    bad = sorted(set(answer_types) - {"open", "closed"})
    if bad:
        raise ValueError(f"metrics.py vqa_accuracy: answer_types must be 'open' or 'closed', got {bad}")
    vocab = None if vocabulary is None else {normalize_answer(a) for a in vocabulary}
    correct = {"open": 0, "closed": 0}
    count = {"open": 0, "closed": 0}
    n_oov = 0
    for pred, gold, kind in zip(pred_answers, gold_answers, answer_types):
        gold = normalize_answer(gold)
        in_vocab = vocab is None or gold in vocab
        n_oov += not in_vocab
        count[kind] += 1
        correct[kind] += in_vocab and normalize_answer(pred) == gold
    return VQAScores(
        overall=(correct["open"] + correct["closed"]) / len(gold_answers),
        open=correct["open"] / count["open"] if count["open"] else None,
        closed=correct["closed"] / count["closed"] if count["closed"] else None,
        n_open=count["open"], n_closed=count["closed"], n_gold_out_of_vocab=n_oov)


# ---- retrieval: Recall@K ----------------------------------------------------------------------


@dataclass
class RecallAtK:
    i2t: dict[int, float]   # image -> text (ITR): k -> fraction of images with a true text in the top k
    t2i: dict[int, float]   # text -> image (TIR): k -> fraction of texts with their image in the top k


def _recall_rows(sim: np.ndarray, relevant: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Recall@K for queries = rows. sim[Q, M], relevant[Q, M] bool (>= 1 True per row).

    rank(q) = #{irrelevant m : sim[q, m] >= max_{relevant m'} sim[q, m']}  (pessimistic ties)
    hit@k(q) = rank(q) < k.
    """
    best = np.where(relevant, sim, -np.inf).max(axis=1)                # [Q]
    rank = ((sim >= best[:, None]) & ~relevant).sum(axis=1)              # [Q]
    return {k: float(np.mean(rank < k)) for k in ks}


def recall_at_k(sim, ks: Sequence[int] = (1, 5, 10),
                img_to_txt_gt: Sequence[Sequence[int]] | None = None) -> RecallAtK:
    """Image->text and text->image Recall@K from a similarity matrix sim[N_img, N_txt].

    Ground truth: img_to_txt_gt=None means one caption per image, text i belongs to image i
    (N_img == N_txt, the diagonal). Otherwise img_to_txt_gt[i] lists the text indices of image i;
    every text must belong to exactly one image.
    A query is a hit at k when its best-scoring true match is ranked < k, where the rank counts
    the *wrong* candidates scoring >= that match. Ties are pessimistic: a wrong candidate with a
    score equal to the true one is ranked ahead of it, so a collapsed model (constant similarity)
    gets chance-level recall rather than 100%. Other true texts of the same image never push a
    true text down.
    """
    s = _to_numpy(sim, "sim").astype(np.float64)
    if s.ndim != 2:
        raise ValueError(f"metrics.py recall_at_k: sim must be [N_img, N_txt], got {s.shape}")
    n_img, n_txt = s.shape
    relevant = np.zeros((n_img, n_txt), dtype=bool)                      # [N_img, N_txt]
    if img_to_txt_gt is None:
        if n_img != n_txt:
            raise ValueError(f"metrics.py recall_at_k: one-to-one ground truth needs a square sim, got {s.shape}")
        np.fill_diagonal(relevant, True)
    else:
        if len(img_to_txt_gt) != n_img:
            raise ValueError(f"metrics.py recall_at_k: img_to_txt_gt has {len(img_to_txt_gt)} images, sim has {n_img}")
        for i, texts in enumerate(img_to_txt_gt):
            if len(texts) == 0:
                raise ValueError(f"metrics.py recall_at_k: image {i} has no ground-truth text")
            relevant[i, list(texts)] = True
        owners = relevant.sum(axis=0)
        if (owners != 1).any():
            j = int(np.flatnonzero(owners != 1)[0])
            raise ValueError(f"metrics.py recall_at_k: text {j} belongs to {owners[j]} images, expected exactly 1")
    return RecallAtK(i2t=_recall_rows(s, relevant, ks), t2i=_recall_rows(s.T, relevant.T, ks))


# ---- generation: text normalisation, BLEU, ROUGE-L, CIDEr-D, METEOR ---------------------------

# Characters stripped from both ends of every word: the punctuation that pycocoevalcap's
# PTBTokenizer splits off and then deletes (. , ? ! : ; - -- ... quotes, brackets).
_EDGE_PUNCTUATION = ".,?!:;-'\"`()[]{}"


def normalize_text(text: str) -> list[str]:
    """Tokens used by every NLG metric: a light, Java-free stand-in for PTBTokenizer.

    1. lower-case;  2. replace '|' by a space (it would clash with METEOR's '|||' separator);
    3. split on whitespace;  4. strip the characters . , ? ! : ; - ' " ` ( ) [ ] { } from both
    ends of each word;  5. drop words that became empty.
    Inner punctuation is kept, so "x-ray", "1.5" and "t12-l1" stay one token; "effusion." becomes
    "effusion" and a lone "-" disappears. Differences from PTBTokenizer: no contraction split
    ("don't" stays one token) and "a,b" written without spaces stays one token.
    """
    words = text.lower().replace("|", " ").split()
    return [t for t in (w.strip(_EDGE_PUNCTUATION) for w in words) if t]


def _ngrams(tokens: list[str], max_n: int) -> Counter:
    """Counts of every k-gram (tuple of k tokens), k = 1..max_n; repeats are counted."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, max_n + 1) for i in range(len(tokens) - k + 1))


def corpus_bleu(hyps: list[list[str]], refs: list[list[list[str]]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n, as pycocoevalcap Bleu (option 'closest'). Returns [BLEU-1, ..., BLEU-n].

    For sentence i with hypothesis h_i (length c_i) and references r_ij:
      matched_k = sum_i sum_{k-gram g} min(count_{h_i}(g), max_j count_{r_ij}(g))   (clipped counts)
      total_k   = sum_i max(0, c_i - k + 1)
      c = sum_i c_i,   r = sum_i len(r_ij*) with r_ij* the reference closest in length to h_i
          (ties -> the shorter one)
      p_k = (matched_k + 1e-15) / (total_k + 1e-9)              (tiny / small epsilons)
      BLEU-n = (p_1 * ... * p_n) ** (1/n) * BP,
      BP = exp(1 - (r + 1e-9) / (c + 1e-15)) if (c + 1e-15) / (r + 1e-9) < 1 else 1.
    """
    matched, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for h, rs in zip(hyps, refs):
        h_counts = _ngrams(h, max_n)
        ref_max = Counter()
        for r in rs:
            ref_max |= _ngrams(r, max_n)  # element-wise max over references
        for g, n in h_counts.items():
            matched[len(g) - 1] += min(n, ref_max[g])
        for k in range(1, max_n + 1):
            total[k - 1] += max(0, len(h) - k + 1)
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
    ratio = (hyp_len + 1e-15) / (ref_len + 1e-9)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for k in range(max_n):
        product *= (matched[k] + 1e-15) / (total[k] + 1e-9)
        scores.append(product ** (1 / (k + 1)) * brevity)
    return scores


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one-row dynamic programme)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hyps: list[list[str]], refs: list[list[list[str]]], beta: float = 1.2) -> float:
    """Mean sentence ROUGE-L, as pycocoevalcap Rouge.

    Per sentence: P = max_j LCS(h, r_j) / |h|,  R = max_j LCS(h, r_j) / |r_j|  (the two maxima may
    come from different references), F = (1 + beta^2) P R / (R + beta^2 P), or 0 if P or R is 0.
    An empty hypothesis scores 0.
    """
    scores = []
    for h, rs in zip(hyps, refs):
        lcs = [_lcs_length(h, r) for r in rs]
        p = max(m / len(h) for m in lcs) if h else 0.0
        r = max(m / len(ref) for m, ref in zip(lcs, rs))
        scores.append((1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p > 0 and r > 0 else 0.0)
    return float(np.mean(scores))


def _tfidf(counts: Counter, doc_freq: Counter, log_n_docs: float, max_n: int):
    """Per n-gram order: {g: count(g) * (log N - log max(1, df(g)))} and its L2 norm."""
    vectors = [{} for _ in range(max_n)]
    for g, n in counts.items():
        vectors[len(g) - 1][g] = n * (log_n_docs - math.log(max(1.0, doc_freq[g])))
    norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vectors]
    return vectors, norms


def cider_d(hyps: list[list[str]], refs: list[list[list[str]]], max_n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D, as pycocoevalcap Cider (n=4, sigma=6). Range [0, 10].

    N = number of sentences; df(g) = number of sentences whose reference set contains n-gram g.
    Weight vector of a text x for order n: w_x(g) = count_x(g) * (log N - log max(1, df(g))).
    For hypothesis h and one reference r, per order n:
      s_n(h, r) = sum_g min(w_h(g), w_r(g)) * w_r(g) / (|w_h| |w_r|)      (0 if a norm is 0)
                  * exp(-(len(h) - len(r))^2 / (2 sigma^2))              (length penalty, words)
    CIDEr-D(h) = 10 * mean_r mean_n s_n(h, r);  corpus score = mean over sentences.
    (pycocoevalcap measures the length difference in bigrams; that equals the word difference
    whenever both texts are non-empty, and an empty hypothesis scores 0 either way.)
    """
    ref_counts = [[_ngrams(r, max_n) for r in rs] for rs in refs]
    doc_freq = Counter(g for rc in ref_counts for g in set().union(*rc))
    log_n_docs = math.log(len(refs))
    scores = []
    for h, rs, rc in zip(hyps, refs, ref_counts):
        h_vec, h_norm = _tfidf(_ngrams(h, max_n), doc_freq, log_n_docs, max_n)
        total = 0.0
        for r, counts in zip(rs, rc):
            r_vec, r_norm = _tfidf(counts, doc_freq, log_n_docs, max_n)
            penalty = math.exp(-((len(h) - len(r)) ** 2) / (2 * sigma ** 2))
            for n in range(max_n):
                dot = sum(min(w, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, w in h_vec[n].items())
                if h_norm[n] > 0 and r_norm[n] > 0:
                    total += dot / (h_norm[n] * r_norm[n]) * penalty / max_n
        scores.append(10.0 * total / len(rs))
    return float(np.mean(scores))


def _meteor_jar() -> str | None:
    """Path of meteor-1.5.jar inside the installed pycocoevalcap (without importing it), or None."""
    spec = importlib.util.find_spec("pycocoevalcap")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        jar = os.path.join(folder, "meteor", "meteor-1.5.jar")
        if os.path.isfile(jar):
            return jar
    return None


def _meteor_protocol(proc: subprocess.Popen, hyps: list[str], refs: list[list[str]]) -> float:
    """Talk to a running METEOR jar in -stdio mode; returns the corpus score."""
    def ask(line: str) -> str:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    stats = [ask(" ||| ".join(["SCORE", " ||| ".join(rs), h])) for h, rs in zip(hyps, refs)]
    ask(" ||| ".join(["EVAL"] + stats))                      # answer 1: score of sentence 1
    for _ in range(len(hyps) - 1):                            # answers 2..N: sentences 2..N
        proc.stdout.readline()
    return float(proc.stdout.readline().strip())              # last answer: corpus score


def meteor(hyps: list[str], refs: list[list[str]]) -> tuple[float | None, str | None]:
    """Corpus METEOR 1.5 from the reference jar: (score, None), or (None, reason) if unavailable.

    Runs `java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm` (pycocoevalcap's command) and
    speaks its stdio protocol: one "SCORE ||| ref_1 ||| ... ||| ref_m ||| hyp" line per sentence
    answered by a statistics line, then one "EVAL ||| stats_1 ||| ... ||| stats_N" line answered by
    N sentence scores and the corpus score (computed by the jar from the summed statistics).
    Inputs must be normalised text without '|' (see normalize_text).
    """
    java, jar = shutil.which("java"), _meteor_jar()
    if java is None:
        return None, "METEOR unavailable: java not found on PATH"
    if jar is None:
        return None, "METEOR unavailable: pycocoevalcap (which ships meteor-1.5.jar) is not installed"
    command = [java, "-jar", "-Xmx2G", jar, "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile() as stderr:
        try:
            proc = subprocess.Popen(command, cwd=os.path.dirname(jar), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=stderr, text=True, encoding="utf-8")
        except OSError as error:
            return None, f"METEOR unavailable: could not start java ({error})"
        try:
            score = _meteor_protocol(proc, hyps, refs)
        except (OSError, ValueError) as error:
            stderr.seek(0)
            tail = stderr.read().decode("utf-8", "replace")[-500:]
            return None, f"METEOR unavailable: the jar failed ({error}); stderr: {tail}"
        finally:
            proc.kill()
            proc.wait()
    return score, None


@dataclass
class NLGScores:
    bleu_1: float
    bleu_2: float
    bleu_3: float
    bleu_4: float
    rouge_l: float
    cider: float                     # CIDEr-D, range [0, 10]
    meteor: float | None             # None when METEOR could not run (see meteor_error)
    meteor_error: str | None         # why METEOR is missing; None when it was computed


def nlg_metrics(hypotheses: dict[str, str], references: dict[str, list[str]],
                with_meteor: bool = True) -> NLGScores:
    """BLEU-1..4, ROUGE-L, CIDEr-D and METEOR of generated texts (report generation, summarisation).

    hypotheses: id -> generated text; references: id -> list of reference texts (>= 1). Both get
    `normalize_text` first. The id sets must be equal; a reference that is empty after
    normalisation is an error (an empty hypothesis is allowed and simply scores low).
    with_meteor=False skips the jar (a few seconds of JVM start-up), e.g. during validation.
    """
    if set(hypotheses) != set(references):
        missing = sorted(set(hypotheses) ^ set(references))[:5]
        raise ValueError(f"metrics.py nlg_metrics: hypotheses and references have different ids, e.g. {missing}")
    if not hypotheses:
        raise ValueError("metrics.py nlg_metrics: no hypotheses")
    ids = list(hypotheses)
    hyps = [normalize_text(hypotheses[i]) for i in ids]
    refs = []
    for i in ids:
        if not isinstance(references[i], (list, tuple)) or not references[i]:
            raise ValueError(f"metrics.py nlg_metrics: references[{i!r}] must be a non-empty list of str")
        tokenised = [normalize_text(r) for r in references[i]]
        if not all(tokenised):
            raise ValueError(f"metrics.py nlg_metrics: references[{i!r}] holds an empty text after normalisation")
        refs.append(tokenised)
    bleu = corpus_bleu(hyps, refs)
    score, error = (None, "METEOR skipped: with_meteor=False")
    if with_meteor:
        score, error = meteor([" ".join(h) for h in hyps], [[" ".join(r) for r in rs] for rs in refs])
    return NLGScores(bleu_1=bleu[0], bleu_2=bleu[1], bleu_3=bleu[2], bleu_4=bleu[3],
                     rouge_l=rouge_l(hyps, refs), cider=cider_d(hyps, refs),
                     meteor=score, meteor_error=error)
