"""core.divergence: the one JSD formula behind the training loss and the evaluation metric."""

import math

import jax.numpy as jnp
import pytest
import numpy as np
from scipy.spatial.distance import jensenshannon

from socialalign_jax.core.divergence import jensen_shannon
from socialalign_jax.evaluation import distributions
from socialalign_jax.train import losses


def _dists(rng, n, k):
    """Random distributions with some exact zeros (the case the 0 log 0 = 0 rule exists for)."""
    x = rng.dirichlet(np.ones(k), size=n)
    x[rng.random((n, k)) < 0.3] = 0.0
    x[x.sum(-1) == 0, 0] = 1.0
    return x / x.sum(-1, keepdims=True)


def test_formula_matches_scipy_in_nats():
    rng = np.random.default_rng(1)
    p, q = _dists(rng, 50, 4), _dists(rng, 50, 4)
    p[0], q[0] = [1, 0, 0, 0], [0, 0, 0.5, 0.5]  # disjoint supports: ln 2, the upper bound
    ref = jensenshannon(p, q, base=math.e, axis=-1) ** 2  # scipy gives the square root
    got = jensen_shannon(p, q, np)
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert abs(got[0] - math.log(2)) < 1e-15
    np.testing.assert_allclose(jensen_shannon(p.T, q.T, np, axis=0), ref, atol=1e-12)


def test_loss_and_metric_are_the_same_number():
    """The float32 jax loss and the float64 numpy metric agree to float32 rounding."""
    rng = np.random.default_rng(2)
    p, q = _dists(rng, 64, 3), _dists(rng, 64, 3)
    loss = np.asarray(losses.jsd(jnp.asarray(p), jnp.asarray(q)), np.float64)
    metric = distributions.jsd(p, q)
    assert metric.dtype == np.float64 and np.asarray(losses.jsd(p, q)).dtype == np.float32
    np.testing.assert_allclose(loss, metric, atol=1e-6)
    assert np.ptp(metric) > 0.1  # the inputs span a real range of divergences, not all ~0


# ----------------------------------------------------------------------------- the noise floor

def _brute_force_floor(p, n):
    """E[JSD] by walking every outcome with scipy's multinomial pmf and JSD (an independent route)."""
    from scipy.stats import multinomial

    p = np.asarray(p, np.float64)
    total = 0.0
    for a in range(n + 1):
        for b in range(n + 1 - a):
            c = np.asarray([a, b, n - a - b])
            total += multinomial.pmf(c, n, p) * jensenshannon(p, c / n, base=math.e) ** 2
    return total


def test_noise_floor_equals_a_brute_force_sum_over_outcomes():
    from socialalign_jax.core.divergence import noise_floor

    for p, n in [([0.5, 0.3, 0.2], 7), ([0.1, 0.2, 0.7], 12), ([0.6, 0.4, 0.0], 5), ([1 / 3] * 3, 1)]:
        assert noise_floor(p, n) == pytest.approx(_brute_force_floor(p, n), rel=1e-9, abs=1e-15)


def test_noise_floor_agrees_with_simulation_and_the_large_n_expansion():
    from socialalign_jax.core.divergence import noise_floor, simulated_noise_floor

    for p, n in [([0.5, 0.3, 0.2], 200), ([0.1, 0.2, 0.7], 50), ([0.8, 0.15, 0.05], 60), ([0.6, 0.4, 0.0], 20)]:
        exact = noise_floor(p, n)
        sim, se = simulated_noise_floor(p, n, draws=40_000, seed=3)
        assert abs(exact - sim) < 4 * se, (p, n, exact, sim, se)
    # Second order: E[JSD] ~ (K' - 1) / (8 n) for large n (K' = classes with p > 0).
    assert noise_floor([0.5, 0.3, 0.2], 200) == pytest.approx(2 / 1600, rel=0.03)
    assert noise_floor([0.6, 0.4, 0.0], 400) == pytest.approx(1 / 3200, rel=0.03)


def test_noise_floor_edge_cases():
    from socialalign_jax.core.divergence import noise_floor

    assert noise_floor([0.0, 1.0, 0.0], 30) == 0.0  # one class: every sample equals p
    assert math.isnan(noise_floor([0.5, 0.5, 0.0], 0))  # no responses: no target, no floor
    with pytest.raises(ValueError):
        noise_floor([0.5, 0.6, 0.0], 10)
    # Falls back to the expansion beyond the enumeration limit, continuous with the exact value.
    big = noise_floor([0.25, 0.25, 0.25, 0.25], 200)
    assert big == pytest.approx(3 / 1_600)
