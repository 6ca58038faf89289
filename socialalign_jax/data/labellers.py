"""Sentiment labellers for text: silver labels for unlabelled sources (CED) and labels for generated
posts, so the macro metric can also be read off the text.

The head's probabilities say what the model *thinks* the crowd feels; labelling the posts it
actually wrote checks whether the generations carry that sentiment. Both labellers share one
interface so the evaluation code does not care which one is used.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from socialalign_jax.data.records import DEFAULT_LABELS, visible

__all__ = ["DEFAULT_LABELS", "Labeller", "LexiconLabeller", "MAX_LABEL_CHARS", "ZeroShotLabeller",
           "ZERO_SHOT_PROMPT", "ZERO_SHOT_WORDS", "clip_text"]

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

    name = "lexicon"

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
    is the caller's job, which keeps this class independent of model internals.
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

    def probs(self, texts: Sequence[str]) -> np.ndarray:
        k = len(self.words)
        if not texts:
            return np.zeros((0, k))
        prompts = [p for p in self.prompts(texts) for _ in range(k)]          # [N*K], text-major
        conts = [w for _ in texts for w in self.words]
        lp = np.asarray(self.score_fn(prompts, conts), dtype=np.float64)
        if lp.shape != (len(prompts),):
            raise ValueError(f"score_fn returned shape {lp.shape}, expected ({len(prompts)},)")
        if not np.all(np.isfinite(lp)):
            raise ValueError("score_fn returned non-finite log-probabilities")
        lp = lp.reshape(len(texts), k)
        lp = lp - lp.max(axis=-1, keepdims=True)
        e = np.exp(lp)
        return e / e.sum(axis=-1, keepdims=True)


# The labellers a dataset build can name (launch/build_dataset.py --labeller); the name and the
# description are recorded in the dataset's metadata, so a table always says whose labels it used.
LABELLERS: dict[str, Callable[[], Labeller]] = {"snownlp": LexiconLabeller}
_ALIASES = {"lexicon": "snownlp"}
DESCRIPTIONS = {"snownlp": "SnowNLP naive Bayes sentiment (product reviews), spread over 3 classes (LexiconLabeller)"}


def make_labeller(name: str) -> Labeller:
    """The labeller registered under `name` (one line listing the choices when there is none)."""
    key = _ALIASES.get(name, name)
    if key not in LABELLERS:
        raise ValueError(f"unknown labeller {name!r}; choose one of {', '.join(sorted(LABELLERS))}")
    return LABELLERS[key]()


def describe_labeller(labeller: Labeller) -> str:
    """What a dataset's metadata records about the labeller that made its labels."""
    name = getattr(labeller, "name", type(labeller).__name__)
    return DESCRIPTIONS.get(_ALIASES.get(name, name), name)
