"""Micro-level (per response) metrics: character ROUGE, BLEU, distinct-n, head accuracy, perplexity.

Chinese has no spaces, so every text metric here works on characters (whitespace dropped).
The common `rouge-score` tokenizer keeps only [a-z0-9] and would score every Chinese pair 0,
which is why ROUGE is computed here from first principles.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

__all__ = [
    "chars", "ngrams", "rouge_n", "rouge_l", "corpus_rouge", "corpus_bleu", "distinct_n",
    "accuracy", "macro_f1", "macro_f1_confusion", "perplexity",
]


def chars(text: str) -> list[str]:
    """Characters of `text` with all whitespace removed (Latin words are split into letters too)."""
    return [c for c in text if not c.isspace()]


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _prf(overlap: float, n_hyp: int, n_ref: int) -> dict[str, float]:
    # Empty hypothesis or reference: nothing can match, so every score is 0 (as rouge-score does).
    p = overlap / n_hyp if n_hyp else 0.0
    r = overlap / n_ref if n_ref else 0.0
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {"precision": p, "recall": r, "f": f}


def rouge_n(reference: str, hypothesis: str, n: int) -> dict[str, float]:
    """ROUGE-N on characters with clipped n-gram counts; F is the balanced F1 of P and R."""
    ref = Counter(ngrams(chars(reference), n))
    hyp = Counter(ngrams(chars(hypothesis), n))
    overlap = sum((ref & hyp).values())  # min count per n-gram
    return _prf(overlap, sum(hyp.values()), sum(ref.values()))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # O(len(a) * len(b)) time, O(len(b)) memory: responses are at most a few hundred characters.
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: str, hypothesis: str) -> dict[str, float]:
    """ROUGE-L (sentence level) on characters: P = LCS/|hyp|, R = LCS/|ref|, F1."""
    ref, hyp = chars(reference), chars(hypothesis)
    return _prf(_lcs_length(ref, hyp), len(hyp), len(ref))


def corpus_rouge(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Mean over pairs of the per-pair F scores (the usual way ROUGE is reported for generation)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        return {"rouge1": math.nan, "rouge2": math.nan, "rougeL": math.nan}
    n = len(references)
    pairs = list(zip(references, hypotheses))
    return {
        "rouge1": sum(rouge_n(r, h, 1)["f"] for r, h in pairs) / n,
        "rouge2": sum(rouge_n(r, h, 2)["f"] for r, h in pairs) / n,
        "rougeL": sum(rouge_l(r, h)["f"] for r, h in pairs) / n,
    }


def corpus_bleu(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus BLEU (0..100) from sacrebleu with its Chinese tokenizer (one character per CJK token)."""
    import sacrebleu  # imported lazily: only this metric needs it

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        return math.nan
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize="zh").score)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus distinct-n: unique character n-grams / all character n-grams, n-grams never span two texts."""
    grams = [g for t in texts for g in ngrams(chars(t), n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    return sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else math.nan


def macro_f1(gold: Sequence[str], pred: Sequence[str]) -> tuple[float, list[str]]:
    """Unweighted mean of per-class F1 over the classes present in gold or predictions.

    Classes absent from both would contribute an undefined 0/0; leaving them out (as
    scikit-learn does with labels=None) keeps the score comparable across event subsets.
    Returns (score, the classes averaged over, sorted).
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    classes = sorted(set(gold) | set(pred))
    if not classes:
        return math.nan, []
    f1s = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s), classes


def macro_f1_confusion(conf):
    """`macro_f1` from (possibly weighted) confusion matrices conf [..., K, K] (rows gold, columns
    predicted), vectorised over the leading axes: the bootstrap evaluates thousands of resamples
    at once. Same definition: the mean per-class F1 over classes present in gold or predictions."""
    import numpy as np

    conf = np.asarray(conf, np.float64)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)  # [..., K]
    gold, pred = conf.sum(-1), conf.sum(-2)  # [..., K]
    present = (gold + pred) > 0
    denom = gold + pred  # 2tp + fp + fn
    f1 = np.where(present, 2 * tp / np.where(present, denom, 1.0), 0.0)
    n = present.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, f1.sum(-1) / np.maximum(n, 1), np.nan)


def perplexity(logprob_sums: Sequence[float], num_tokens: Sequence[int]) -> float:
    """Corpus perplexity exp(-sum log p / sum tokens): token-weighted, not a mean of per-text perplexities."""
    if len(logprob_sums) != len(num_tokens):
        raise ValueError(f"{len(logprob_sums)} log-prob sums but {len(num_tokens)} token counts")
    total = sum(num_tokens)
    if total <= 0:
        return math.nan
    return math.exp(-sum(logprob_sums) / total)
