"""Percentile bootstrap over units (events, users): one implementation for every interval we report.

A metric is a function of per-unit quantities (an event's JSD, its confusion matrix). A
bootstrap resample draws the units with replacement; drawing unit i c times is the same as
giving it weight c, so every resample is a row of integer weights and a statistic is any
function of a weight matrix [R, n] -> [R]. Weighted statistics are computed for all R
resamples in one numpy expression (no Python loop over resamples), and a paired
difference between two methods evaluated on the same units is simply the statistic of
the difference under the SAME weight rows.

`strata` keeps each stratum's size fixed in every resample (a stratified bootstrap): with
k-fold cross-validation each fold's held-out events are resampled within the fold, so a
per-fold metric stays defined (a fold never loses all its events) and the mean over folds
is resampled exactly as it is computed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["resample_weights", "percentile_interval", "bootstrap"]


def resample_weights(n_units: int, n_resamples: int, seed: int = 0,
                     strata: Sequence[int] | None = None) -> np.ndarray:
    """[n_resamples, n_units] int64 counts: how often each unit is drawn in each resample.

    Without strata every row sums to n_units; with strata, each stratum's columns sum to its size.
    Row r is a pure function of (seed, r's position), so the same call always gives the same rows.
    """
    if n_units < 1 or n_resamples < 1:
        raise ValueError(f"resample_weights: need n_units >= 1 and n_resamples >= 1, got {n_units}, {n_resamples}")
    rng = np.random.default_rng(seed)
    groups = [np.arange(n_units)] if strata is None else _groups(strata, n_units)
    w = np.zeros((n_resamples, n_units), np.int64)
    rows = np.arange(n_resamples)[:, None]
    for members in groups:
        draws = members[rng.integers(0, members.size, size=(n_resamples, members.size))]  # [R, m]
        np.add.at(w, (np.broadcast_to(rows, draws.shape), draws), 1)
    return w


def _groups(strata: Sequence[int], n_units: int) -> list[np.ndarray]:
    s = np.asarray(strata)
    if s.shape != (n_units,):
        raise ValueError(f"resample_weights: strata has shape {s.shape}, expected ({n_units},)")
    return [np.flatnonzero(s == v) for v in np.unique(s)]


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high) percentiles of the finite samples at (1-c)/2 and (1+c)/2 (numpy's linear interpolation)."""
    if not 0 < confidence < 1:
        raise ValueError(f"percentile_interval: confidence must be in (0, 1), got {confidence}")
    x = np.asarray(samples, np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    a = (1 - confidence) / 2
    lo, hi = np.percentile(x, [100 * a, 100 * (1 - a)])
    return float(lo), float(hi)


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n_units: int, *, n_resamples: int = 2000,
              confidence: float = 0.95, seed: int = 0, strata: Sequence[int] | None = None) -> dict:
    """Point estimate and percentile interval of `statistic` over resampled units.

    statistic: weights [R, n_units] -> [R] (the point estimate is its value at weights all 1).
    Returns {'point', 'low', 'high', 'n_units', 'n_resamples', 'confidence'}.
    """
    point = float(np.asarray(statistic(np.ones((1, n_units), np.int64)))[0])
    samples = np.asarray(statistic(resample_weights(n_units, n_resamples, seed, strata)), np.float64)
    lo, hi = percentile_interval(samples, confidence)
    return {"point": point, "low": lo, "high": hi, "n_units": int(n_units), "n_resamples": int(n_resamples),
            "confidence": float(confidence)}
