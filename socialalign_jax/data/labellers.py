"""Sentiment labellers for text: silver labels for unlabelled sources (CED) and labels for generated
posts, so the macro metric can also be read off the text.

The head's probabilities say what the model *thinks* the crowd feels; labelling the posts it
actually wrote checks whether the generations carry that sentiment. All labellers share one
interface so the evaluation code does not care which one is used.

Named labellers (`LABELLERS`, `make_labeller(name)`, `describe(name)`): "snownlp" (alias
"lexicon", the LexiconLabeller every default still uses) and "ngram" (NgramLabeller, a char
n-gram classifier fitted on human-labelled Weibo text). docs/labellers.md compares them on
human-labelled test files and gives the class mapping.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from socialalign_jax.data.records import DEFAULT_LABELS, visible

__all__ = ["DEFAULT_LABELS", "LABELLERS", "LABELLER_ALIASES", "Labeller", "LexiconLabeller", "MAX_LABEL_CHARS",
           "NGRAM_MODEL", "NgramLabeller", "ZeroShotLabeller", "ZERO_SHOT_PROMPT", "ZERO_SHOT_WORDS", "clip_text",
           "describe", "make_labeller", "normalize_weibo"]

# Bounded work per text: a labeller reads at most this many characters of each post (SnowNLP's
# cost grows faster than linearly: an 80k-character post once took minutes). A Weibo post is at
# most 2,000 characters and a generated one a few hundred, so real posts are read whole.
MAX_LABEL_CHARS = 2_000


def clip_text(text: str) -> str:
    """The part of a post a labeller reads (the first MAX_LABEL_CHARS characters)."""
    return text[:MAX_LABEL_CHARS]


class Labeller:
    """`labels`: class names; `probs(texts)` -> [N, K] rows summing to 1; `label(texts)` -> names."""

    labels: tuple[str, ...] = DEFAULT_LABELS

    def probs(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def label(self, texts: Sequence[str]) -> list[str]:
        p = self.probs(texts)
        return [self.labels[i] for i in np.argmax(p, axis=-1)] if len(texts) else []


class LexiconLabeller(Labeller):
    """Offline labeller on top of SnowNLP's bundled naive-Bayes sentiment model.

    SnowNLP gives s = P(positive) in [0, 1] (trained on product reviews, so it is only a rough
    guide on Weibo posts). It is spread over three classes as if two independent votes were
    cast with probability s: p = [(1-s)^2, 2 s (1-s), s^2]. The argmax of that is
    negative for s < 1/3, neutral for 1/3 <= s <= 2/3, positive for s > 2/3; those are the
    thresholds `label` applies (override with `thresholds=(lo, hi)`).
    Empty texts, and texts of only whitespace and invisible characters (zero-width spaces,
    joiners, BOMs), carry no sentiment and are labelled neutral (s = 0.5). Only the first
    MAX_LABEL_CHARS characters of a text are read.
    SnowNLP reads its model from `marshal` files inside the package: no pickle, no network.
    """

    name = "lexicon"  # the name evaluation metadata has always recorded; the registry calls it "snownlp"

    def __init__(self, thresholds: tuple[float, float] = (1 / 3, 2 / 3)):
        try:
            from snownlp import SnowNLP
        except ImportError as e:  # surfaced as a one-line CLI error
            raise RuntimeError("the lexicon labeller needs snownlp: pip install snownlp") from e
        lo, hi = thresholds
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"thresholds must satisfy 0 <= lo <= hi <= 1, got {thresholds}")
        self._snow = SnowNLP
        self.thresholds = (float(lo), float(hi))

    @property
    def source(self) -> str:
        """What a dataset's metadata records about these labels."""
        lo, hi = self.thresholds
        cut = "1/3 and 2/3" if self.thresholds == (1 / 3, 2 / 3) else f"{lo:.4g} and {hi:.4g}"
        return (f"snownlp: SnowNLP naive-Bayes sentiment (trained on product reviews), s = P(positive) "
                f"cut at {cut} (docs/labellers.md)")

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """SnowNLP's P(positive) per text, [N]."""
        return np.asarray([self._snow(clip_text(t)).sentiments if visible(t) else 0.5 for t in texts],
                          dtype=np.float64)

    def probs(self, texts: Sequence[str]) -> np.ndarray:
        s = self.scores(texts)
        return np.stack([(1 - s) ** 2, 2 * s * (1 - s), s ** 2], axis=-1).reshape(len(texts), 3)

    def label(self, texts: Sequence[str]) -> list[str]:
        lo, hi = self.thresholds
        return ["negative" if s < lo else "positive" if s > hi else "neutral" for s in self.scores(texts)]


# ----------------------------------------------------------------------------- char n-gram labeller

NGRAM_MODEL = Path(__file__).with_name("labeller_models") / "ngram.npz"
NGRAM_FORMAT = 1

# Text cleaning shared by fitting (scripts/fit_labeller.py) and labelling. It brings raw Weibo text
# (CED, weibo2018, generated posts) and SMP2020-EWECT's published "clean" text (HanLP CharTable:
# full -> half width, lower case, [ ] and 【 】 -> 《 》, 、 -> ",", curly quotes -> '"') to one form:
#   * weibo2018's encodings: {%#topic#%} -> #topic#; any other {%...%} (link, place, video
#     title) is dropped, as a URL is;
#   * NFKC (full-width letters, digits and punctuation -> ASCII) and lower case;
#   * brackets [ ] 【 】 〖 〗 -> 《 》, so a Weibo emoticon code [哈哈] reads 《哈哈》 as in EWECT
#     (emoticons are kept as text: they carry sentiment); 、 -> ","; curly quotes -> straight;
#     zero-width characters dropped;
#   * URLs and @mentions (with a leading // or 回复 and a trailing colon) dropped;
#   * runs of whitespace -> one space, ends stripped; at most MAX_LABEL_CHARS characters are read.
_WEIBO_TOPIC = re.compile(r"\{%#(.*?)#%\}")
_WEIBO_ANCHOR = re.compile(r"\{%.*?%\}")
_URL = re.compile(r"(?:https?|ftp)://[0-9a-z._~:/?#@!$&'()*+,;=%-]*")
_MENTION = re.compile(r"(?:回复)?(?://)?@[^\s@:,.!?;/()\"'《》。~]{1,30}:?")
_PUNCT = {**dict.fromkeys(map(ord, "[【〖"), "《"), **dict.fromkeys(map(ord, "]】〗"), "》"), ord("、"): ",",
          **dict.fromkeys(map(ord, "“”「」"), '"'), **dict.fromkeys(map(ord, "‘’『』"), "'"),
          **dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"), None)}


def normalize_weibo(text: str) -> str:
    """The cleaned text the n-gram labeller reads (see the comment above for each step)."""
    t = clip_text(text)
    if "{%" in t:
        t = _WEIBO_ANCHOR.sub(" ", _WEIBO_TOPIC.sub(r"#\1#", t))
    t = unicodedata.normalize("NFKC", t).lower().translate(_PUNCT)
    if "://" in t:
        t = _URL.sub(" ", t)
    if "@" in t:
        t = _MENTION.sub(" ", t)
    return " ".join(t.split())


def char_ngrams(text: str, lo: int = 1, hi: int = 3) -> list[str]:
    """All character n-grams of `text` for lo <= n <= hi, shortest first (scikit-learn's 'char' order)."""
    return [text[i:i + n] for n in range(lo, hi + 1) for i in range(len(text) - n + 1)]


class NgramLabeller(Labeller):
    """Char n-gram TF-IDF + multinomial logistic regression fitted on human-labelled Weibo text.

    Fitted by scripts/fit_labeller.py on weibo2018 train and SMP2020-EWECT virus_train (emotions
    mapped to negative/neutral/positive; docs/labellers.md has the mapping, the chosen
    hyperparameters and the scores on the test files). Inference is numpy only: the bundled
    `labeller_models/ngram.npz` holds the vocabulary, idf, coefficients and intercepts and is
    read with allow_pickle=False. For a text: normalize_weibo, char n-grams (ngram_range) ->
    counts -> 1 + ln(count) -> x idf -> l2-normalised -> softmax(W x + b).
    Texts with nothing to read (empty, whitespace or invisible characters, or no known n-gram
    once cleaned, e.g. only an @mention) carry no sentiment and are labelled neutral (probs
    one-hot on neutral).
    """

    name = "ngram"

    def __init__(self, path: str | Path | None = None, chunk: int = 20_000):
        self.path = Path(NGRAM_MODEL if path is None else path)
        if not self.path.is_file():
            raise RuntimeError(f"the ngram labeller's model file {self.path} is missing "
                               "(scripts/fit_labeller.py writes it)")
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        with np.load(self.path, allow_pickle=False) as z:
            fmt = int(z["format"])
            if fmt != NGRAM_FORMAT:
                raise RuntimeError(f"{self.path}: model format {fmt}, this code reads {NGRAM_FORMAT}")
            vocab = z["vocab"].tolist()
            self.idf = z["idf"].astype(np.float64)
            self.coef = z["coef"].astype(np.float64)            # [K, V]
            self.intercept = z["intercept"].astype(np.float64)  # [K]
            self.labels = tuple(z["labels"].tolist())
            self.ngram_range = tuple(int(n) for n in z["ngram_range"])
            self.meta = json.loads(str(z["meta"]))
        k, v = self.coef.shape
        if (len(vocab), len(self.idf), len(self.intercept), len(self.labels)) != (v, v, k, k):
            raise RuntimeError(f"{self.path}: inconsistent shapes (vocab {len(vocab)}, idf {self.idf.shape}, "
                               f"coef {self.coef.shape}, intercept {self.intercept.shape}, labels {len(self.labels)})")
        if "neutral" not in self.labels:
            raise RuntimeError(f"{self.path}: labels {list(self.labels)} have no 'neutral' for empty texts")
        self._index = dict(zip(vocab, range(v)))
        self._coef_t = np.ascontiguousarray(self.coef.T)        # [V, K]: one gather per n-gram
        self.chunk = int(chunk)

    @property
    def source(self) -> str:
        """What a dataset's metadata records about these labels."""
        lo, hi = self.ngram_range
        return (f"ngram: char {lo}-{hi} TF-IDF + logistic regression fitted on weibo2018 + SMP2020-EWECT "
                f"({self.path.name} sha256 {self.sha256[:12]}; docs/labellers.md)")

    def _ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(row, vocabulary id) of every known n-gram occurrence."""
        get, (lo, hi) = self._index.get, self.ngram_range
        ids: list[int] = []
        lens = np.zeros(len(texts), dtype=np.int64)
        for r, t in enumerate(texts):
            found = [j for j in map(get, char_ngrams(normalize_weibo(t), lo, hi)) if j is not None]
            lens[r] = len(found)
            ids += found
        return np.repeat(np.arange(len(texts), dtype=np.int64), lens), np.asarray(ids, dtype=np.int64)

    def _logits(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        n, v = len(texts), len(self.idf)
        rows, ids = self._ids(texts)
        key, count = np.unique(rows * v + ids, return_counts=True)    # one entry per (text, n-gram)
        r, c = key // v, key % v
        x = (1.0 + np.log(count)) * self.idf[c]                      # sublinear tf x idf
        norm = np.sqrt(np.bincount(r, weights=x * x, minlength=n))
        x = x / norm[r]                                              # l2 per text (norm > 0 on every r)
        contrib = self._coef_t[c] * x[:, None]                       # [nnz, K]
        z = np.stack([np.bincount(r, weights=contrib[:, j], minlength=n) for j in range(contrib.shape[1])], -1)
        return z + self.intercept, norm > 0

    def probs(self, texts: Sequence[str]) -> np.ndarray:
        k = len(self.labels)
        out = np.zeros((len(texts), k))
        for s in range(0, len(texts), self.chunk):
            part = texts[s:s + self.chunk]
            z, has = self._logits(part)
            z = z - z.max(axis=-1, keepdims=True)
            e = np.exp(z)
            p = e / e.sum(axis=-1, keepdims=True)
            p[~has] = np.eye(k)[self.labels.index("neutral")]        # nothing to read: neutral
            out[s:s + len(part)] = p
        return out


# ----------------------------------------------------------------------------- registry

LABELLERS: dict[str, Callable[..., Labeller]] = {"snownlp": LexiconLabeller, "ngram": NgramLabeller}
LABELLER_ALIASES = {"lexicon": "snownlp"}  # the name configs, CLIs and metadata already use


def _canonical(name: str) -> str:
    key = LABELLER_ALIASES.get(name, name)
    if key not in LABELLERS:
        choices = sorted(LABELLERS) + [f"{a} (= {b})" for a, b in sorted(LABELLER_ALIASES.items())]
        raise ValueError(f"unknown labeller {name!r}: choose from {', '.join(choices)}")
    return key


def make_labeller(name: str, **kwargs) -> Labeller:
    """The labeller registered under `name` ("snownlp", "lexicon" = "snownlp", "ngram"); keyword
    arguments go to its class (e.g. thresholds=(lo, hi) for snownlp, path=... for ngram)."""
    return LABELLERS[_canonical(name)](**kwargs)


def describe(name: str) -> str:
    """The one-line source string a dataset's metadata records for labeller `name`."""
    return make_labeller(name).source


# One fixed instruction, so zero-shot numbers are comparable across checkpoints.
ZERO_SHOT_PROMPT = (
    "请判断下面这条微博的情感倾向，只用一个词回答：消极、中性或积极。\n"
    "微博：{text}\n"
    "情感倾向："
)
ZERO_SHOT_WORDS = {"negative": "消极", "neutral": "中性", "positive": "积极"}

ScoreFn = Callable[[list[str], list[str]], np.ndarray]


class ZeroShotLabeller(Labeller):
    """Scores each label word as the continuation of a fixed prompt with a language model.

    `score_fn(prompts, continuations)` returns the summed log-probability of each continuation
    given its prompt, shape [len(prompts)]; wiring it to a model (chat template, tokenizer)
    is the caller's job, which keeps this class independent of model internals. A scorer that
    can do better may also offer `score_fn.score_words(prompts, words) -> [len(prompts),
    len(words)]`, the same numbers for every (prompt, word) pair: the labeller then asks for
    each prompt once with all its label words (a model runs the shared prompt once and only
    the words per word, `evaluation.model_labeller`) instead of passing N*K pairs.
    probs = softmax over the label words' summed log-probs (no length normalisation: the
    three words are two characters each).
    """

    name = "zeroshot"

    def __init__(self, score_fn: ScoreFn, words: dict[str, str] | None = None,
                 template: str = ZERO_SHOT_PROMPT):
        words = dict(ZERO_SHOT_WORDS if words is None else words)
        if "{text}" not in template:
            raise ValueError("template must contain '{text}'")
        self.labels = tuple(words)
        self.words = tuple(words[k] for k in self.labels)
        self.template = template
        self.score_fn = score_fn

    def prompts(self, texts: Sequence[str]) -> list[str]:
        """One prompt per text, holding its first MAX_LABEL_CHARS characters."""
        return [self.template.format(text=clip_text(t)) for t in texts]

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """[N, K] float64: summed log-prob of each label word (in `labels` order) after each text's prompt."""
        k = len(self.words)
        if not texts:
            return np.zeros((0, k))
        prompts = self.prompts(texts)
        score_words = getattr(self.score_fn, "score_words", None)
        if score_words is not None:  # one entry per prompt, all words at once
            lp = np.asarray(score_words(prompts, list(self.words)), dtype=np.float64)
            if lp.shape != (len(prompts), k):
                raise ValueError(f"score_fn.score_words returned shape {lp.shape}, expected ({len(prompts)}, {k})")
        else:
            pairs = [p for p in prompts for _ in range(k)]          # [N*K], text-major
            conts = [w for _ in texts for w in self.words]
            lp = np.asarray(self.score_fn(pairs, conts), dtype=np.float64)
            if lp.shape != (len(pairs),):
                raise ValueError(f"score_fn returned shape {lp.shape}, expected ({len(pairs)},)")
            lp = lp.reshape(len(texts), k)
        if not np.all(np.isfinite(lp)):
            raise ValueError("score_fn returned non-finite log-probabilities")
        return lp

    def probs(self, texts: Sequence[str]) -> np.ndarray:
        lp = self.scores(texts)
        lp = lp - lp.max(axis=-1, keepdims=True)
        e = np.exp(lp)
        return e / e.sum(axis=-1, keepdims=True)
