"""Loss terms against numpy/scipy re-derivations and hand-built batches."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax as np_log_softmax

from socialalign_jax.model.nll import response_ce, response_ce_chunked
from socialalign_jax.train import losses


def _rand_dist(rng, n, k, zeros=False):
    x = rng.random((n, k)) + 0.05
    if zeros:
        x[rng.random((n, k)) < 0.35] = 0.0
        x[:, 0] += 0.1  # at least one nonzero per row
    return x / x.sum(-1, keepdims=True)


# ---------------------------------------------------------------------------- JSD


def test_jsd_matches_scipy_and_properties():
    rng = np.random.default_rng(0)
    p = _rand_dist(rng, 64, 5, zeros=True)
    q = _rand_dist(rng, 64, 5, zeros=True)
    # disjoint supports reach the upper bound ln 2
    p[0], q[0] = [1, 0, 0, 0, 0], [0, 0.5, 0.5, 0, 0]
    got = np.asarray(losses.jsd(p, q))
    ref = jensenshannon(p, q, axis=-1) ** 2  # scipy: sqrt(JSD), natural log by default
    np.testing.assert_allclose(got, ref, atol=2e-6)
    np.testing.assert_allclose(got[0], math.log(2), atol=1e-6)
    np.testing.assert_allclose(got, np.asarray(losses.jsd(q, p)), atol=1e-7)  # symmetric
    assert np.all(got >= 0) and np.all(got <= math.log(2) + 1e-7)
    np.testing.assert_array_equal(np.asarray(losses.jsd(p, p)), 0.0)
    # axis argument
    np.testing.assert_allclose(np.asarray(losses.jsd(p.T, q.T, axis=0)), ref, atol=2e-6)


def test_jsd_grads_finite_with_zeros():
    p = jnp.array([[0.0, 0.3, 0.7], [0.0, 0.0, 1.0], [0.2, 0.3, 0.5]])
    q = jnp.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.2, 0.3, 0.5]])
    gp, gq = jax.grad(lambda a, b: jnp.sum(losses.jsd(a, b)), argnums=(0, 1))(p, q)
    assert np.all(np.isfinite(gp)) and np.all(np.isfinite(gq))
    # where p_k > 0 the gradient is the analytic 1/2 log(p_k / m_k); check row 0, k = 1, 2
    m = 0.5 * (np.asarray(p[0]) + np.asarray(q[0]))
    np.testing.assert_allclose(np.asarray(gp[0, 1:]), 0.5 * np.log(np.asarray(p[0, 1:]) / m[1:]), atol=1e-6)
    # and it is a true gradient: finite differences along a direction inside the simplex
    d = jnp.array([0.0, 0.1, -0.1])
    f = lambda t: float(losses.jsd(p[0] + t * d, q[0]))
    fd = (f(1e-3) - f(-1e-3)) / 2e-3
    np.testing.assert_allclose(float(jnp.dot(gp[0], d)), fd, rtol=1e-3)


# ---------------------------------------------------------------------------- micro terms


def test_response_ce_matches_numpy():
    rng = np.random.default_rng(1)
    b, s, v = 3, 7, 11
    logits = rng.normal(size=(b, s, v)).astype(np.float32) * 3
    ids = rng.integers(0, v, size=(b, s))
    mask = np.zeros((b, s), np.int32)
    mask[0, 4:7] = 1
    mask[1, 2:5] = 1
    # row 2: no response tokens
    total, count = response_ce(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    ref, n = 0.0, 0
    for i in range(b):
        for t in range(1, s):
            if mask[i, t]:
                ref -= np_log_softmax(logits[i, t - 1].astype(np.float64))[ids[i, t]]
                n += 1
    assert float(count) == n == 6
    np.testing.assert_allclose(float(total), ref, rtol=1e-5)


def test_response_ce_bf16_large_logits_stable():
    logits = jnp.full((1, 3, 5), 1e4, jnp.bfloat16).at[0, 0, 2].set(1e4 + 64)
    ids = jnp.array([[0, 2, 0]])
    mask = jnp.array([[0, 1, 0]])
    total, count = response_ce(logits, ids, mask)
    assert np.isfinite(float(total)) and float(count) == 1
    np.testing.assert_allclose(float(total), -np_log_softmax(np.array([0, 0, 64, 0, 0.0]))[2], atol=1e-6)


def test_response_ce_chunked_equals_full():
    rng = np.random.default_rng(2)
    b, s, d, v = 2, 9, 6, 13
    h = jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, v, size=(b, s)))
    mask = jnp.asarray((rng.random((b, s)) < 0.6).astype(np.int32))
    full = response_ce(jnp.einsum("bsd,dv->bsv", h, w), ids, mask)
    f = lambda h, w: response_ce_chunked(h, lambda x: x @ w, ids, mask, chunk=3)  # 8 positions -> pad to 9
    got = jax.jit(f)(h, w)
    np.testing.assert_allclose(float(got[0]), float(full[0]), rtol=1e-5)
    assert float(got[1]) == float(full[1])
    g1 = jax.jit(jax.grad(lambda h, w: f(h, w)[0], argnums=(0, 1)))(h, w)
    g2 = jax.jit(jax.grad(lambda h, w: response_ce(jnp.einsum("bsd,dv->bsv", h, w), ids, mask)[0],
                          argnums=(0, 1)))(h, w)
    for a, c in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5)


def test_sentiment_ce_skips_unlabelled_and_padding():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0], [1.0, 2.0, 3.0]], np.float32)
    label = np.array([0, -1, 2, 1])
    emask = np.array([1.0, 1.0, 1.0, 0.0], np.float32)  # row 3 is padding
    total, count = losses.sentiment_ce(jnp.asarray(logits), jnp.asarray(label), jnp.asarray(emask))
    ref = -np_log_softmax(logits[0])[0] - np_log_softmax(logits[2])[2]
    assert float(count) == 2
    np.testing.assert_allclose(float(total), ref, rtol=1e-6)


# ---------------------------------------------------------------------------- macro term


def _three_event_batch():
    """Events 42 (3 rows), 7 (1 row), 9 (4 rows), interleaved, plus 2 padding rows."""
    rng = np.random.default_rng(3)
    event_id = np.array([42, 9, 42, -1, 7, 9, 9, 42, 9, -1], np.int32)
    emask = (event_id >= 0).astype(np.float32)
    probs = _rand_dist(rng, len(event_id), 3)
    targets = {42: [0.6, 0.3, 0.1], 7: [0.0, 0.2, 0.8], 9: [0.25, 0.25, 0.5]}
    target = np.array([targets.get(int(e), [9.0, 9.0, 9.0]) for e in event_id], np.float32)  # junk on padding
    return probs.astype(np.float32), event_id, emask, target, targets


def _numpy_macro(probs, event_id, emask, targets):
    num, den = 0.0, 0.0
    for e, q in targets.items():
        rows = (event_id == e) & (emask > 0)
        pg = probs[rows].mean(0)
        num += rows.sum() * jensenshannon(pg, q) ** 2
        den += rows.sum()
    return num, den


def test_macro_loss_matches_numpy():
    probs, event_id, emask, target, targets = _three_event_batch()
    got_sum, got_cnt = losses.macro_loss(jnp.asarray(probs), jnp.asarray(event_id), jnp.asarray(emask),
                                         jnp.asarray(target))
    ref_sum, ref_cnt = _numpy_macro(probs, event_id, emask, targets)
    assert float(got_cnt) == ref_cnt == 8
    np.testing.assert_allclose(float(got_sum), ref_sum, rtol=1e-5, atol=1e-7)
    ev = losses.event_distributions(jnp.asarray(probs), jnp.asarray(event_id), jnp.asarray(emask))
    # slots by first occurrence: 42 -> 0, 9 -> 1, 7 -> 2
    np.testing.assert_array_equal(np.asarray(ev.counts)[:4], [3, 4, 1, 0])
    np.testing.assert_allclose(np.asarray(ev.dist)[1], probs[event_id == 9].mean(0), atol=1e-6)
    # a padding row's probabilities do not matter
    probs2 = probs.copy()
    probs2[3] = [1.0, 0.0, 0.0]
    again = losses.macro_loss(jnp.asarray(probs2), jnp.asarray(event_id), jnp.asarray(emask), jnp.asarray(target))
    assert float(again[0]) == float(got_sum)


def test_macro_loss_sharding_invariant():
    probs, event_id, emask, target, _ = _three_event_batch()
    # 16 rows so the batch splits over 8 devices
    probs = np.concatenate([probs, probs[::-1] * 0.5 + 0.5 / 3])[:16]
    event_id = np.concatenate([event_id, event_id[::-1] + 1])[:16]
    emask = (event_id >= 0).astype(np.float32)
    target = np.concatenate([target, target[::-1]])[:16]
    args = [jnp.asarray(a) for a in (probs, event_id, emask, target)]
    fn = jax.jit(lambda p, e, m, t: losses.macro_loss(p, e, m, t))
    ref = fn(*args)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharded = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in args]
    assert len(sharded[0].sharding.device_set) == 8
    got = fn(*sharded)
    np.testing.assert_allclose(float(got[0]), float(ref[0]), atol=1e-6)
    assert float(got[1]) == float(ref[1])
    # gradients too
    gfn = jax.jit(jax.grad(lambda p, e, m, t: losses.macro_loss(p, e, m, t)[0]))
    np.testing.assert_allclose(np.asarray(gfn(*sharded)), np.asarray(gfn(*args)), atol=1e-6)


def test_event_distributions_refuses_too_few_slots():
    with pytest.raises(ValueError, match="num_segments"):
        losses.event_distributions(jnp.ones((4, 3)) / 3, jnp.arange(4), jnp.ones(4), num_segments=2)


def test_gumbel_estimator():
    probs, event_id, emask, target, _ = _three_event_batch()
    probs, event_id, emask = jnp.asarray(probs), jnp.asarray(event_id), jnp.asarray(emask)
    ev = losses.event_distributions(probs, event_id, emask, estimator="gumbel", rng=jax.random.key(0))
    # forward: each P_g is a mean of one-hot vectors -> multiples of 1/count that sum to 1
    counts = np.asarray(ev.counts)[:3]
    scaled = np.asarray(ev.dist)[:3] * counts[:, None]
    np.testing.assert_allclose(scaled, np.round(scaled), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ev.dist)[:3].sum(-1), 1.0, atol=1e-6)
    # gradients flow (soft path) and are finite
    g = jax.grad(lambda p: losses.macro_loss(p, event_id, emask, jnp.asarray(target), estimator="gumbel",
                                             rng=jax.random.key(1))[0])(probs)
    assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)
    # unbiased: the mean over many samples approaches P_g of the 'mean' estimator
    keys = jax.random.split(jax.random.key(2), 4000)
    samples = jax.jit(jax.vmap(lambda k: losses.event_distributions(probs, event_id, emask, estimator="gumbel",
                                                                    rng=k).dist))(keys)
    mean_est = losses.event_distributions(probs, event_id, emask).dist
    np.testing.assert_allclose(np.asarray(samples.mean(0))[:3], np.asarray(mean_est)[:3], atol=0.03)
    with pytest.raises(ValueError, match="rng"):
        losses.event_distributions(probs, event_id, emask, estimator="gumbel")


# ---------------------------------------------------------------------------- total


def test_total_loss_combines_terms():
    probs, event_id, emask, target, targets = _three_event_batch()
    rng = np.random.default_rng(4)
    b, s, v = len(event_id), 5, 7
    logits = rng.normal(size=(b, s, v)).astype(np.float32)
    sent_logits = rng.normal(size=(b, 3)).astype(np.float32)
    batch = {"input_ids": rng.integers(0, v, size=(b, s)), "loss_mask": np.tile([0, 0, 1, 1, 1], (b, 1)),
             "label": np.array([0, 2, -1, 1, 1, 0, -1, 2, 1, 0]), "event_id": event_id,
             "example_mask": emask, "target_dist": target}
    batch = {k: jnp.asarray(x) for k, x in batch.items()}
    loss, terms = losses.total_loss(jnp.asarray(logits), jnp.asarray(sent_logits), batch,
                                    lambda_sent=0.5, lambda_macro=2.0)
    lm = response_ce(jnp.asarray(logits), batch["input_ids"], batch["loss_mask"])
    se = losses.sentiment_ce(jnp.asarray(sent_logits), batch["label"], batch["example_mask"])
    sp = np.exp(np_log_softmax(sent_logits.astype(np.float64), axis=-1))
    ms, mc = _numpy_macro(sp, event_id, emask, targets)
    expect = float(lm[0] / lm[1]) + 0.5 * float(se[0] / se[1]) + 2.0 * ms / mc
    np.testing.assert_allclose(float(loss), expect, rtol=1e-5)
    assert float(terms["sent_count"]) == 6  # labelled real rows 0, 1, 4, 5, 7, 8 (3 and 9 are padding)
    np.testing.assert_allclose(float(terms["macro"]), ms / mc, rtol=1e-5)


def test_accumulation_overestimates_macro_for_split_events():
    """docs/training_math.md section 3: splitting an event over micro-batches gives a count-
    weighted JSD at least the pooled one (convexity), strictly larger when halves differ."""
    probs = jnp.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.2, 0.1, 0.7]])
    eid, m = jnp.zeros(4, jnp.int32), jnp.ones(4)
    tgt = jnp.tile(jnp.array([[0.5, 0.2, 0.3]]), (4, 1))
    full = losses.macro_loss(probs, eid, m, tgt)
    halves = [losses.macro_loss(probs[s], eid[s], m[s], tgt[s]) for s in (slice(0, 2), slice(2, 4))]
    pooled = float(full[0] / full[1])
    split = sum(float(h[0]) for h in halves) / sum(float(h[1]) for h in halves)
    pg = np.asarray(probs).mean(0)
    np.testing.assert_allclose(pooled, jensenshannon(pg, [0.5, 0.2, 0.3]) ** 2, rtol=1e-5)
    assert split > pooled + 0.05
