"""Rounding a length (or a row count) up to its shape bucket.

Every jitted function compiles once per input shape, so callers pad lengths and batch sizes
up to a few allowed sizes instead of using the exact ones. The rule "smallest allowed size
that fits" was written separately in scoring, generation, prediction, persona generation,
feature extraction and the training pipeline; this is the one implementation, with each
caller's policy (a step, powers of two, or an explicit list) as a parameter. It lives in
core/ because core imports nothing else of ours, so every one of those packages can use it.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["bucket"]


def bucket(n: int, *, multiple: int | None = None, pow2: bool = False,
           sizes: Sequence[int] | None = None) -> int:
    """The smallest allowed size >= n, under exactly one policy:

    * ``multiple=m``: a multiple of m, and at least m (a length of 0 still gets a real shape);
    * ``pow2=True``: a power of two, at least 1;
    * ``sizes=(...)``: one of the given sizes; n above them all is an error.
    """
    if sum((multiple is not None, bool(pow2), sizes is not None)) != 1:
        raise ValueError("bucket: give exactly one of multiple=, pow2=True or sizes=")
    n = int(n)
    if n < 0:
        raise ValueError(f"bucket: length must be >= 0, got {n}")
    if multiple is not None:
        if int(multiple) < 1:
            raise ValueError(f"bucket: multiple must be >= 1, got {multiple}")
        m = int(multiple)
        return max(m, -(-n // m) * m)
    if pow2:
        return 1 << max(0, n - 1).bit_length()
    if not sizes:
        raise ValueError("bucket: sizes= is empty")
    fits = [int(s) for s in sizes if int(s) >= n]
    if not fits:
        raise ValueError(f"bucket: length {n} exceeds the largest bucket {max(int(s) for s in sizes)}")
    return min(fits)
