"""core.divergence: the one JSD formula behind the training loss and the evaluation metric."""

import math

import jax.numpy as jnp
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
