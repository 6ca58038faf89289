"""The crowd's distribution and its uncertainty: percentile bootstrap over users, paired across wordings.

The crowd's predicted distribution for a wording is the mean over its U users of a per-user
vector (the sentiment head's probabilities, or the fraction of the user's K generated posts
the labeller puts in each class). How far that mean would move with another crowd of the
same kind is estimated by resampling users with replacement:

    idx = numpy.random.default_rng(seed).integers(0, U, size=(B, U), dtype=int32)   # B resamples
    boot[v, b] = mean_u per_user[v, idx[b, u]]                                     # [V, B, C]
    interval   = numpy.quantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=B)   # linear, numpy's default

Wordings (framing variants) are predicted for the SAME users, so their difference is
estimated *paired*: the same resampled users for every wording, diff[b] = boot[i, b] -
boot[j, b]. Pairing removes the between-user spread that both wordings share, which is
most of it, so a real framing effect shows up with far fewer users than two independent
crowds would need. Pure numpy, so a test can re-derive every number.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.9


class Summary(NamedTuple):
    mean: np.ndarray  # [V, C]: per-wording distribution
    interval: np.ndarray  # [V, C, 2]: lo, hi
    pairs: list[tuple[int, int]]  # (i, j), i < j
    diff: np.ndarray  # [P, C]: mean_i - mean_j
    diff_interval: np.ndarray  # [P, C, 2]


def resample_indices(num_users: int, seed: int, num_resamples: int = DEFAULT_RESAMPLES) -> np.ndarray:
    """[B, U] int32 user indices, drawn with replacement; shared by every statistic of one prediction."""
    if num_users < 1 or num_resamples < 1:
        raise ValueError(f"need >= 1 user and >= 1 resample, got {num_users} and {num_resamples}")
    return np.random.default_rng(seed).integers(0, num_users, size=(num_resamples, num_users), dtype=np.int32)


def _boot_means(per_user: np.ndarray, idx: np.ndarray, chunk: int = 256) -> np.ndarray:
    """[V, U, C] x [B, U] -> [V, B, C], a chunk of resamples at a time (bounded memory)."""
    v, _, c = per_user.shape
    out = np.empty((v, idx.shape[0], c), np.float64)
    for s in range(0, idx.shape[0], chunk):
        out[:, s:s + chunk] = per_user[:, idx[s:s + chunk]].mean(axis=2)
    return out


def summarise(per_user: np.ndarray, idx: np.ndarray, level: float = DEFAULT_LEVEL) -> Summary:
    """per_user [V, U, C] (V wordings of one crowd) with resample indices idx [B, U]."""
    per_user = np.asarray(per_user, np.float64)
    if per_user.ndim != 3 or per_user.shape[1] != idx.shape[1]:
        raise ValueError(f"per_user must be [V, U, C] with U = {idx.shape[1]}, got {per_user.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    q = [(1.0 - level) / 2.0, (1.0 + level) / 2.0]
    mean = per_user.mean(axis=1)
    boot = _boot_means(per_user, idx)  # [V, B, C]
    interval = np.moveaxis(np.quantile(boot, q, axis=1), 0, -1)  # [V, C, 2]
    pairs = list(itertools.combinations(range(per_user.shape[0]), 2))
    diff = np.stack([mean[i] - mean[j] for i, j in pairs]) if pairs else np.zeros((0, mean.shape[1]))
    diff_iv = (np.stack([np.moveaxis(np.quantile(boot[i] - boot[j], q, axis=0), 0, -1) for i, j in pairs])
               if pairs else np.zeros((0, mean.shape[1], 2)))
    return Summary(mean, interval, pairs, diff, diff_iv)
