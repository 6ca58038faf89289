"""BM25 history selection (SPEC section 4): which of a user's posts the prompt shows.

Okapi BM25 over jieba words with the non-negative idf
``ln((N - df + 0.5) / (df + 0.5) + 1)``, so a term present in every post still counts a
little instead of pushing scores negative. Query terms are counted with multiplicity
(each occurrence in the news adds its term's score), as rank_bm25 does.

Bounded work per text (issue 19: a 1 MB news text once stalled a build for minutes):
retrieval reads at most the first `MAX_QUERY_CHARS` characters of the news and
`MAX_DOC_CHARS` of each post (far above a Weibo post's 2,000 and typical news lengths, so
real data is unaffected), each distinct text is tokenised once (an LRU cache: the news
is shared by every case of its event, a post by every case of its user), and scoring is
linear in the number of distinct query terms.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections import Counter
from typing import Sequence

import numpy as np

from socialalign_jax.data.records import HistoryPost

K1 = 1.5
B = 0.75

MAX_QUERY_CHARS = 20_000  # of the news: retrieval reads no further
MAX_DOC_CHARS = 5_000  # of each history post (with what it retweets)

_HASHTAG_ONLY = re.compile(r"^\s*(#[^#]*#\s*)+$")
_HAS_WORD = re.compile(r"\w")


def tokenize(text: str) -> list[str]:
    """jieba words (accurate mode), keeping only tokens with a letter or digit."""
    return list(_tokenize_cached(text))


@functools.lru_cache(maxsize=8192)
def _tokenize_cached(text: str) -> tuple[str, ...]:
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return tuple(w for w in jieba.lcut(text) if _HAS_WORD.search(w))


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
        """Sum over query occurrences of the term's score: each distinct term once, times its count."""
        out = np.zeros(self.n, dtype=np.float64)  # [N]
        norm = self.k1 * (1.0 - self.b + self.b * self.len / self.avgdl)  # [N]
        for t, count in Counter(query).items():
            idf = self.idf.get(t)
            if idf is None:
                continue
            f = np.array([tf.get(t, 0) for tf in self.tf], dtype=np.float64)
            out += count * (idf * f * (self.k1 + 1.0) / (f + norm))
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
    news: str | Sequence[str],
    k: int = 5,
    exclude_text: str | None = None,
    k1: float = K1,
    b: float = B,
) -> list[HistoryPost]:
    """Top-``k`` posts by BM25 against ``news``, best first (ties keep timeline order).

    ``news`` may be several wordings of one news item: a post's score is then the sum of its
    scores against each wording, so one history serves every wording and no wording (nor
    their order) is favoured; one wording is the plain BM25 ranking. Dropped before ranking:
    hashtag-only posts, and every post whose text equals ``exclude_text`` (the target post
    must never appear in its own history). Fewer than ``k`` survivors are all returned.
    Reads at most MAX_QUERY_CHARS of each wording and MAX_DOC_CHARS of each post (see the
    module docstring).
    """
    wordings = [news] if isinstance(news, str) else list(news)
    target = exclude_text.strip() if exclude_text is not None else None
    kept = [p for p in posts if not is_hashtag_only(p) and (target is None or p.text.strip() != target)]
    if not kept:
        return []
    docs = [_tokenize_cached(post_document(p)[:MAX_DOC_CHARS]) for p in kept]
    index = BM25(docs, k1, b)
    scores = sum(index.scores(_tokenize_cached(w[:MAX_QUERY_CHARS])) for w in wordings)
    order = sorted(range(len(kept)), key=lambda i: (-scores[i], i))
    return [kept[i] for i in order[:k]]
