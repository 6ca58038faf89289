"""BM25 history selection (SPEC section 4): which of a user's posts the prompt shows.

Okapi BM25 over jieba words with the non-negative idf
``ln((N - df + 0.5) / (df + 0.5) + 1)``, so a term present in every post still counts a
little instead of pushing scores negative. Query terms are counted with multiplicity
(each occurrence in the news adds its term's score), as rank_bm25 does.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from typing import Sequence

import numpy as np

from socialalign_jax.data.records import HistoryPost

K1 = 1.5
B = 0.75

_HASHTAG_ONLY = re.compile(r"^\s*(#[^#]*#\s*)+$")
_HAS_WORD = re.compile(r"\w")


def tokenize(text: str) -> list[str]:
    """jieba words (accurate mode), keeping only tokens with a letter or digit."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return [w for w in jieba.lcut(text) if _HAS_WORD.search(w)]


class BM25:
    """Scores one tokenised corpus against queries; documents may be empty."""

    def __init__(self, docs: Sequence[Sequence[str]], k1: float = K1, b: float = B):
        self.k1, self.b = k1, b
        self.tf = [Counter(d) for d in docs]
        self.len = np.array([len(d) for d in docs], dtype=np.float64)  # [N]
        self.n = len(docs)
        self.avgdl = float(self.len.mean()) if self.n and self.len.sum() > 0 else 1.0
        df = Counter(t for d in self.tf for t in d)
        self.idf = {t: math.log((self.n - c + 0.5) / (c + 0.5) + 1.0) for t, c in df.items()}

    def scores(self, query: Sequence[str]) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.float64)  # [N]
        norm = self.k1 * (1.0 - self.b + self.b * self.len / self.avgdl)  # [N]
        for t in query:
            idf = self.idf.get(t)
            if idf is None:
                continue
            f = np.array([tf.get(t, 0) for tf in self.tf], dtype=np.float64)
            out += idf * f * (self.k1 + 1.0) / (f + norm)
        return out


def bm25_scores(docs: Sequence[str], query: str, k1: float = K1, b: float = B) -> np.ndarray:
    """BM25 score of each raw document string for a raw query string (jieba-tokenised)."""
    return BM25([tokenize(d) for d in docs], k1, b).scores(tokenize(query))


def is_hashtag_only(post: HistoryPost) -> bool:
    """A post whose own text is nothing but ``#...#`` tags (or empty) and retweets nothing."""
    if post.retweet and post.retweet.strip():
        return False
    return not post.text.strip() or bool(_HASHTAG_ONLY.match(post.text))


def post_document(post: HistoryPost) -> str:
    """The text BM25 indexes for a post: its comment plus what it retweets."""
    return post.text if not post.retweet else f"{post.text} {post.retweet}"


def select_history(
    posts: Sequence[HistoryPost],
    news: str,
    k: int = 5,
    exclude_text: str | None = None,
    k1: float = K1,
    b: float = B,
) -> list[HistoryPost]:
    """Top-``k`` posts by BM25 against ``news``, best first (ties keep timeline order).

    Dropped before ranking: hashtag-only posts, and every post whose text equals
    ``exclude_text`` (the target post must never appear in its own history). Fewer than
    ``k`` survivors are all returned.
    """
    target = exclude_text.strip() if exclude_text is not None else None
    kept = [p for p in posts if not is_hashtag_only(p) and (target is None or p.text.strip() != target)]
    if not kept:
        return []
    scores = BM25([tokenize(post_document(p)) for p in kept], k1, b).scores(tokenize(news))
    order = sorted(range(len(kept)), key=lambda i: (-scores[i], i))
    return [kept[i] for i in order[:k]]
