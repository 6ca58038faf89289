"""Macro-level (per event) comparison of sentiment distributions: JSD, KL, total variation.

All logs are natural, so JSD lies in [0, ln 2] and matches the training loss L_macro.
Distributions are numpy arrays over the last axis; leading axes broadcast.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from socialalign_jax.core.divergence import jensen_shannon, xlogy_ratio

__all__ = ["KL_EPSILON", "normalise", "jsd", "kl", "total_variation", "summarise", "compare"]

# KL(real || pred) is infinite when pred puts 0 where real does not (a hard labeller often does);
# both sides are smoothed as (p + eps) / (1 + K eps) so the number stays finite and comparable.
KL_EPSILON = 1e-6


def normalise(p) -> np.ndarray:
    """Checks p is a non-negative, finite, non-zero vector and rescales it to sum 1."""
    p = np.asarray(p, dtype=np.float64)
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"not a distribution (negative or non-finite entries): {p.tolist()}")
    s = p.sum(axis=-1, keepdims=True)
    if np.any(s <= 0):
        raise ValueError(f"not a distribution (sums to 0): {p.tolist()}")
    return p / s


def jsd(p, q) -> np.ndarray:
    """Jensen-Shannon divergence 1/2 KL(p||m) + 1/2 KL(q||m), m = (p+q)/2, in nats (0..ln 2).

    Exact, no smoothing: m > 0 wherever p or q is, so every term is finite. The formula is
    core.divergence's, the one the training loss L_macro uses, here in float64 on inputs
    checked and normalised first.
    """
    return jensen_shannon(normalise(p), normalise(q), np)


def kl(p, q, eps: float = KL_EPSILON) -> np.ndarray:
    """KL(p || q) in nats after smoothing both sides: x -> (x + eps) / (1 + K eps)."""
    p, q = normalise(p), normalise(q)
    k = p.shape[-1]
    p = (p + eps) / (1 + k * eps)
    q = (q + eps) / (1 + k * eps)
    return xlogy_ratio(p, q, np).sum(-1)


def total_variation(p, q) -> np.ndarray:
    """1/2 sum |p - q|, in [0, 1]."""
    p, q = normalise(p), normalise(q)
    return 0.5 * np.abs(p - q).sum(-1)


def compare(real, pred, eps: float = KL_EPSILON) -> dict[str, float]:
    """The three divergences between one event's real and predicted distribution (KL is real || pred)."""
    return {
        "jsd": float(jsd(real, pred)),
        "kl": float(kl(real, pred, eps)),
        "tv": float(total_variation(real, pred)),
    }


def summarise(per_event: Sequence[Mapping[str, float]], counts: Sequence[int]) -> dict[str, float]:
    """Mean over events and count-weighted mean (weight = the event's number of responses) per divergence."""
    if len(per_event) != len(counts):
        raise ValueError(f"{len(per_event)} events but {len(counts)} counts")
    out: dict[str, float] = {"num_events": len(per_event)}
    w = np.asarray(counts, dtype=np.float64)
    for name in ("jsd", "kl", "tv"):
        if not per_event:
            out[f"{name}_mean"] = out[f"{name}_weighted"] = math.nan
            continue
        v = np.asarray([e[name] for e in per_event], dtype=np.float64)
        out[f"{name}_mean"] = float(v.mean())
        out[f"{name}_weighted"] = float((v * w).sum() / w.sum())
    return out
