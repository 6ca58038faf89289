"""The Jensen-Shannon divergence formula, written once for numpy and jax.numpy.

The training loss L_macro (train/losses.py, jax, float32, differentiated) and the evaluation
metric (evaluation/distributions.py, numpy, float64) must be the same quantity, or a model
would be trained towards one number and reported on another. Both call `jensen_shannon` with
their own array namespace `xp`; each keeps its own input handling (the loss casts to float32
and clips rounding, the metric checks and normalises its inputs). It lives in core/ because
core imports nothing else of ours, so train/ and evaluation/ can both use it without either
importing the other. Natural logs throughout: the result is in nats, in [0, ln 2].
"""

from __future__ import annotations

import numpy as np

import itertools
import math

__all__ = ["jensen_shannon", "noise_floor", "simulated_noise_floor", "xlogy_ratio"]


def xlogy_ratio(x, y, xp=np):
    """x * log(x / y) elementwise, with 0 * log 0 = 0; `y` must be > 0 wherever `x` is.

    Both logs see a safe argument (1 where x is 0), so neither branch of the `where` makes an
    inf or nan: under jax that would leak into the gradient as 0 * inf, under numpy it warns.
    """
    pos = x > 0
    safe_x = xp.where(pos, x, 1.0)
    safe_y = xp.where(pos, y, 1.0)
    return xp.where(pos, x * (xp.log(safe_x) - xp.log(safe_y)), 0.0)


def jensen_shannon(p, q, xp=np, axis: int = -1):
    """1/2 KL(p||m) + 1/2 KL(q||m) with m = (p + q)/2, over `axis`, in nats; no smoothing.

    `p` and `q` must already be distributions along `axis` (zeros allowed) in the dtype wanted:
    m > 0 wherever p or q is, so every term is finite without an epsilon.
    """
    m = 0.5 * (p + q)
    return 0.5 * xp.sum(xlogy_ratio(p, m, xp), axis=axis) + 0.5 * xp.sum(xlogy_ratio(q, m, xp), axis=axis)


# ----------------------------------------------------------------------------- the noise floor

EXACT_OUTCOMES = 250_000  # noise_floor enumerates at most this many multinomial outcomes


def _compositions(n: int, k: int) -> np.ndarray:
    """[C(n+k-1, k-1), k] int64: every way to write n as an ordered sum of k non-negative ints
    (stars and bars: each choice of k-1 bar positions among n+k-1 slots is one outcome)."""
    m = math.comb(n + k - 1, k - 1)
    bars = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(n + k - 1), k - 1)),
                       np.int64, count=m * (k - 1)).reshape(m, k - 1)
    edges = np.concatenate([np.full((m, 1), -1), bars, np.full((m, 1), n + k - 1)], axis=1)
    return np.diff(edges, axis=1) - 1


def noise_floor(p, n: int) -> float:
    """E[JSD(p, c / n)] for counts c ~ Multinomial(n, p), in nats: the noise floor of a target.

    An event's real distribution is only ever seen through the n responses that were labelled.
    Even a forecaster that knew the event's true mix p exactly would be this far, on average,
    from the n-response sample it is scored against; a forecast error near this value is
    sampling noise in the target, not a fault of the forecast. Computed exactly: the sum over
    every outcome of its multinomial probability times its JSD (classes with p_i = 0 can never
    be drawn and are left out; C(n + K' - 1, K' - 1) outcomes, 20,301 for K' = 3 classes and
    n = 200). Beyond EXACT_OUTCOMES outcomes the second-order expansion (K' - 1) / (8 n) is
    returned; it is within 1% of the exact value there (tests/core/test_divergence.py checks
    the exact sum against `simulated_noise_floor` and the expansion). n = 0 gives nan.
    """
    p = np.asarray(p, np.float64)
    if p.ndim != 1 or np.any(p < 0) or not np.isclose(p.sum(), 1.0, atol=1e-6):
        raise ValueError(f"noise_floor: p must be a distribution, got {p.tolist()}")
    n = int(n)
    if n < 0:
        raise ValueError(f"noise_floor: n must be >= 0, got {n}")
    if n == 0:
        return math.nan
    q = p[p > 0] / p[p > 0].sum()
    k = q.size
    if k == 1:
        return 0.0
    if math.comb(n + k - 1, k - 1) > EXACT_OUTCOMES:
        return (k - 1) / (8.0 * n)
    c = _compositions(n, k)  # [C, k]
    lgam = np.asarray([math.lgamma(i + 1) for i in range(n + 1)])
    log_pmf = lgam[n] - lgam[c].sum(axis=1) + (c * np.log(q)).sum(axis=1)
    return float(np.sum(np.exp(log_pmf) * jensen_shannon(np.broadcast_to(q, c.shape), c / n)))


def simulated_noise_floor(p, n: int, draws: int = 20_000, seed: int = 0) -> tuple[float, float]:
    """Monte Carlo estimate of `noise_floor`: (mean JSD over `draws` multinomial samples, its standard error)."""
    p = np.asarray(p, np.float64)
    rng = np.random.default_rng(seed)
    c = rng.multinomial(int(n), p / p.sum(), size=int(draws))
    j = jensen_shannon(np.broadcast_to(p / p.sum(), c.shape), c / int(n))
    return float(j.mean()), float(j.std(ddof=1) / math.sqrt(draws))
