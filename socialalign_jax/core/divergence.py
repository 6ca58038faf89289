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

__all__ = ["jensen_shannon", "xlogy_ratio"]


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
