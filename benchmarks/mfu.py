"""Benchmark 5: CPU MFU = the training step's analytic FLOP/s over a measured matmul rate.

The denominator is measured in the same run on the same machine (a float32 n x n x n jnp
matmul), so the figure says how close the step gets to what XLA:CPU's GEMM achieves here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common


def matmul_rate(n: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    a, b = (jax.device_put(rng.standard_normal((n, n)).astype(np.float32)) for _ in range(2))
    mm = jax.jit(jnp.matmul)
    t = common.median_time(lambda: common.block(mm(a, b)), repeats)[0]
    return 2.0 * n ** 3 / t


def run(quick: bool, repeats: int, step_flop_s: float) -> dict:
    n = 1024 if quick else 2048
    peak = matmul_rate(n, max(repeats, 3))
    return {"matmul_n": n, "matmul_flop_s": peak, "step_flop_s": step_flop_s, "mfu": step_flop_s / peak}
