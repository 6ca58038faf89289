"""Event forecasts beside the head: a classical char n-gram baseline, the shrink toward the prior,
and the inner cross-validation that chooses settings inside the training events only.

Why these exist. A crowd forecast is worth something only if it beats "assume the usual mix"
(the training prior) on events the model never saw. Two things make that comparison fair:

* a **classical baseline** of the same inputs (char 1-3 gram TF-IDF + multinomial logistic
  regression, the usual strong baseline for short Chinese text): if it does as well as the
  head on frozen LLM features, the LLM is not what carries the forecast;
* the **shrink** ``w * model + (1 - w) * prior`` (evaluation/skill.py): a forecast that is
  noisier than it is informative should lean on the prior. In the experiments ``w`` is chosen
  by cross-validation inside the training events (`skill.choose_weight` on out-of-fold
  forecasts of `inner_folds`), so a held-out event never decides it; ``w = 0`` is the prior
  exactly, so a shrunk row can only be worse than the prior by the noise of choosing ``w``.

The n-gram model is our own numpy/optax code (no scikit-learn at run time); the tests check it
against scikit-learn's LogisticRegression on the same matrix (tests/experiments/test_forecast.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from typing import Sequence

import numpy as np

from socialalign_jax.experiments import folds as FO

# Inverse L2 strengths tried for the n-gram model (CED's news-only rows chose 10, the top of an
# earlier (0.3, 1, 3, 10) grid, in every cell: the grid reaches further so the choice is interior).
C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
INNER_FOLDS = 4


# ----------------------------------------------------------------------------- char n-grams + TF-IDF

def char_ngrams(text: str, lo: int = 1, hi: int = 3) -> Counter:
    """Counts of every run of lo..hi characters (whitespace runs collapsed to one space)."""
    t = " ".join(text.split())
    return Counter(t[i:i + n] for n in range(lo, hi + 1) for i in range(len(t) - n + 1))


@dataclasses.dataclass(frozen=True)
class Tfidf:
    """A vocabulary (the max_features n-grams in most training documents, each in >= min_df of them)
    and its smoothed idf = ln((1 + N) / (1 + df)) + 1, as scikit-learn's TfidfVectorizer computes it."""

    vocab: dict[str, int]
    idf: np.ndarray  # [V]

    @classmethod
    def fit(cls, docs: Sequence[Counter], max_features: int = 20_000, min_df: int = 2) -> "Tfidf":
        df: Counter = Counter()
        for d in docs:
            df.update(d.keys())
        kept = [(g, c) for g, c in df.items() if c >= min_df]
        kept.sort(key=lambda gc: (-gc[1], gc[0]))  # most documents first, ties by the n-gram itself
        kept = kept[:max_features]
        vocab = {g: i for i, (g, _) in enumerate(sorted(kept))}
        dfs = np.zeros(len(vocab))
        for g, c in kept:
            dfs[vocab[g]] = c
        return cls(vocab, np.log((1 + len(docs)) / (1 + dfs)) + 1.0)

    def transform(self, docs: Sequence[Counter]) -> np.ndarray:
        """[N, V] float32 rows: sublinear tf (1 + ln tf) x idf, l2-normalised (zero rows stay zero)."""
        x = np.zeros((len(docs), len(self.vocab)), np.float32)
        for r, d in enumerate(docs):
            cols = [(self.vocab[g], c) for g, c in d.items() if g in self.vocab]
            if cols:
                idx, tf = map(np.asarray, zip(*cols))
                x[r, idx] = (1.0 + np.log(tf)) * self.idf[idx]
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norm > 0, norm, 1.0)


# ----------------------------------------------------------------------------- logistic regression

@functools.lru_cache(maxsize=4)
def _lbfgs(max_iter: int, tol: float):
    import jax
    import jax.numpy as jnp
    import optax

    def fit(x, y, sw, inv_c):
        # minimise sum_i sw_i CE(y_i, softmax(x_i W + b)) + ||W||^2 / (2 C): scikit-learn's objective
        # (soft targets y: rows summing to 1; the bias is not penalised)
        def loss(p):
            logits = x @ p["w"] + p["b"]
            ce = -(y * jax.nn.log_softmax(logits)).sum(-1)
            return (sw * ce).sum() + 0.5 * inv_c * (p["w"] ** 2).sum()

        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(loss)
        p0 = {"w": jnp.zeros((x.shape[1], y.shape[1]), jnp.float32), "b": jnp.zeros((y.shape[1],), jnp.float32)}

        def step(carry):
            p, state, _ = carry
            value, grad = value_and_grad(p, state=state)
            updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
            return optax.apply_updates(p, updates), state, optax.tree.norm(grad)

        def go_on(carry):
            _, state, gnorm = carry
            it = optax.tree_utils.tree_get(state, "count")
            return (it == 0) | ((it < max_iter) & (gnorm > tol))

        p, _, _ = jax.lax.while_loop(go_on, step, (p0, opt.init(p0), jnp.inf))
        return p

    return jax.jit(fit)


@dataclasses.dataclass(frozen=True)
class Softmax:
    w: np.ndarray  # [V, K]
    b: np.ndarray  # [K]

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, c: float, sample_weight: np.ndarray | None = None,
            max_iter: int = 500, tol: float = 1e-5) -> "Softmax":
        """Multinomial logistic regression with an L2 penalty of strength 1/c on soft targets y [N, K]."""
        sw = np.ones(len(x), np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
        p = _lbfgs(int(max_iter), float(tol))(np.asarray(x, np.float32), np.asarray(y, np.float32), sw,
                                               np.float32(1.0 / c))
        return cls(np.asarray(p["w"], np.float64), np.asarray(p["b"], np.float64))

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = np.asarray(x, np.float64) @ self.w + self.b
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- inner folds

def inner_folds(names: Sequence[str], seed: int, k: int = INNER_FOLDS) -> list[list[str]]:
    """Folds of the TRAINING events only (the held-out fold is never among `names`)."""
    return FO.event_folds(names, min(k, len(set(names))), seed)
