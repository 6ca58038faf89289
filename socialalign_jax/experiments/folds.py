"""k-fold splits by event: every event is held out in exactly one fold.

Events are identified by name (not by id), so the same names give the same folds whatever
order a dataset lists them in. The fold sizes differ by at most one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def event_folds(event_names: Sequence[str], k: int, seed: int = 0) -> list[list[str]]:
    """[fold][names]: a seeded permutation of the sorted unique names dealt into k folds."""
    names = sorted(set(event_names))
    if k < 2:
        raise ValueError(f"event_folds: k must be >= 2, got {k}")
    if len(names) < k:
        raise ValueError(f"event_folds: {len(names)} events cannot fill {k} folds")
    perm = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xF01D]).permutation(len(names))
    return [sorted(names[i] for i in perm[f::k]) for f in range(k)]


def fold_of(folds: Sequence[Sequence[str]]) -> dict[str, int]:
    """{event name: the fold that holds it out}."""
    return {name: f for f, members in enumerate(folds) for name in members}
