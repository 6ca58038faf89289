"""How good a crowd forecast is, measured against "assume the usual mix", and the forecast that
is never worse than it.

The usual mix (the *prior*) is the pooled label distribution of the training events' targets:
what anyone would forecast for a new event without a model. A forecast is worth reading only
if, on events the model never saw, it lands closer to the real crowd than the prior does. So:

* `shrink` mixes a forecast with the prior, ``w * forecast + (1 - w) * prior``; ``w = 0`` is
  the prior exactly, ``w = 1`` the raw forecast;
* `choose_weight` picks ``w`` on forecasts of events other than those it will be used on;
* `forecast_skill` measures a run on its held-out events: each event's shrunk forecast uses a
  ``w`` fitted on the *other* held-out events (cross-fitting, so no event chooses its own
  weight), and the skill is ``1 - mean JSD(shrunk, real) / mean JSD(prior, real)`` with a
  bootstrap interval over the events. The ``w`` a user's forecasts get is fitted on all of
  them. With too few held-out events no number is given.

One implementation for the trainer's final evaluation (train/evaluate.py), the predictor that
applies it (predict/predictor.py) and the experiment runner's shrunk rows (experiments/runner.py).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from socialalign_jax.core.divergence import jensen_shannon
from socialalign_jax.evaluation import bootstrap

WEIGHTS = tuple(np.round(np.linspace(0.0, 1.0, 21), 2).tolist())  # the shrink weights tried
MIN_EVENTS = 10  # fewer held-out events than this: no skill figure, only a sentence saying so


def prior(real: np.ndarray, counts: np.ndarray, events: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """[K] the pooled label mix of these events' targets (each weighted by its responses): the usual mix."""
    real = np.asarray(real, np.float64)
    w = np.asarray(counts, np.float64).copy()
    if events is not None:
        keep = np.zeros(len(real), bool)
        keep[np.asarray(events, np.int64)] = True
        w = np.where(keep, w, 0.0)
    if w.sum() <= 0:
        raise ValueError("prior: no responses behind the given events' targets")
    return (real * w[:, None]).sum(0) / w.sum()


def shrink(forecast: np.ndarray, prior_: np.ndarray, w: float) -> np.ndarray:
    """w * forecast + (1 - w) * prior (w = 0: the prior exactly; w = 1: the forecast)."""
    return w * np.asarray(forecast, np.float64) + (1.0 - w) * np.asarray(prior_, np.float64)


def choose_weight(forecast: np.ndarray, prior_: np.ndarray, real: np.ndarray,
                  weights: Sequence[float] = WEIGHTS) -> float:
    """The w of `weights` with the lowest mean JSD of shrink(forecast, prior, w) to `real` over the rows;
    ties go to the smaller w (closer to the prior). `prior_` is [K] or one prior per row [N, K]."""
    losses = [float(np.mean(jensen_shannon(real, shrink(forecast, prior_, w)))) for w in weights]
    return float(weights[int(np.argmin(np.round(losses, 12)))])


def forecast_skill(forecast: np.ndarray, real: np.ndarray, prior_: np.ndarray, *,
                   noise_floor: np.ndarray | None = None, folds: int = 5, seed: int = 0,
                   n_resamples: int = 2000, confidence: float = 0.95, min_events: int = MIN_EVENTS) -> dict[str, Any]:
    """The track record of per-event forecasts [E, K] against their real mixes [E, K] and the prior [K].

    Returns {'num_events', 'status', 'w', 'prior', ...}: status 'none' (no held-out events),
    'too_few' (< min_events; w = 1, the raw forecast, unmeasured), 'better' (the skill's interval
    lies above 0) or 'not_better'; with a measurement also 'skill' and 'raw_skill' ({point, low,
    high}: the shrunk and the unshrunk forecast), 'jsd' (mean event JSD of the shrunk forecast, the raw
    forecast, the prior) and 'noise_floor' (mean over the events, when given).
    """
    forecast, real = np.asarray(forecast, np.float64), np.asarray(real, np.float64)
    prior_ = np.asarray(prior_, np.float64)
    n = len(real)
    out: dict[str, Any] = {"num_events": n, "prior": prior_.tolist(), "confidence": confidence}
    if n == 0:
        return {**out, "status": "none", "w": 1.0}
    if n < min_events:
        return {**out, "status": "too_few", "w": 1.0}
    k = min(int(folds), n)
    perm = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5C11]).permutation(n)
    crossed = np.empty_like(forecast)
    ws = []
    for f in range(k):
        part = perm[f::k]
        rest = np.setdiff1d(perm, part)
        w = choose_weight(forecast[rest], prior_, real[rest])
        ws.append(w)
        crossed[part] = shrink(forecast[part], prior_, w)
    j_shrunk = jensen_shannon(real, crossed)
    j_raw = jensen_shannon(real, forecast)
    j_prior = jensen_shannon(real, np.broadcast_to(prior_, real.shape))

    def skill_of(j):
        return bootstrap.bootstrap(lambda wt: 1.0 - (wt @ j) / (wt @ j_prior), n, n_resamples=n_resamples,
                                   confidence=confidence, seed=seed)

    skill = skill_of(j_shrunk)
    out.update({"status": "better" if skill["low"] > 0 else "not_better",
                "w": choose_weight(forecast, prior_, real), "w_per_fold": ws, "skill": skill,
                "raw_skill": skill_of(j_raw),
                "jsd": {"shrunk": float(j_shrunk.mean()), "raw": float(j_raw.mean()), "prior": float(j_prior.mean())}})
    if noise_floor is not None:
        nf = np.asarray(noise_floor, np.float64)
        out["noise_floor"] = float(np.nanmean(nf)) if np.isfinite(nf).any() else None
    return out


def skill_sentence(record: Mapping[str, Any] | None) -> str:
    """The one line every forecast carries: how such forecasts did on held-out events."""
    if not record or record.get("status") in (None, "none"):
        return ("this run was not scored on held-out events: how close its forecasts come to a real crowd is "
                "unmeasured (train with a test split to measure it)")
    n = int(record["num_events"])
    if record["status"] == "too_few":
        return (f"only {n} held-out event{'s' if n != 1 else ''}: too few to measure how close these forecasts "
                f"come to a real crowd (at least {MIN_EVENTS} are needed)")
    s = record["skill"]
    pct = f"{100 * s['point']:.0f}% [{100 * s['low']:.0f}%, {100 * s['high']:.0f}%]"
    if record["status"] == "better":
        return f"on {n} held-out events these forecasts were {pct} closer to the real crowd than the average mix"
    return (f"on {n} held-out events these forecasts were not better than the average mix ({pct} closer): "
            "read the forecast as the average")


def is_measured(record: Mapping[str, Any] | None) -> bool:
    return bool(record) and record.get("status") in ("better", "not_better")


__all__ = ["MIN_EVENTS", "WEIGHTS", "choose_weight", "forecast_skill", "is_measured", "prior", "shrink",
           "skill_sentence"]
