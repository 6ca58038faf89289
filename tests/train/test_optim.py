"""Optimizer pieces against hand-computed values and a manual optax chain."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from socialalign_jax.runs.run_config import OptimConfig
from socialalign_jax.train import optim


def _make(total_steps: int = 100, **settings):
    """make_optimizer on OptimConfig with these settings over a plain base: lr 1e-3, no decay, no clipping."""
    cfg = OptimConfig(**{"lr": 1e-3, "weight_decay": 0.0, "clip_norm": 0.0, **settings})
    return optim.make_optimizer(cfg, total_steps)


def test_schedule_by_hand():
    _, sched = _make(lr=1.0, warmup_frac=0.1, total_steps=100, min_lr_ratio=0.1)
    # warmup: 10 steps, 0 -> 1 linearly
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
    # cosine from 1 to 0.1 over steps 10..100
    np.testing.assert_allclose(float(sched(55)), 0.1 + 0.9 * 0.5, rtol=1e-6)  # half way: cos = 0
    np.testing.assert_allclose(float(sched(25)), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 90)), rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(sched(150)), 0.1, rtol=1e-6)
    # HF rounds the warmup up: ceil(0.1 * 15) = 2 steps
    _, s2 = _make(lr=1.0, total_steps=15)
    np.testing.assert_allclose([float(s2(1)), float(s2(2))], [0.5, 1.0], rtol=1e-6)


def _hand_schedule(step, lr, total, warmup_frac, min_ratio):
    """The schedule as written out before optax's: linear warmup over ceil(frac * total) steps,
    then half a cosine to min_ratio * lr at `total`, flat after (float64)."""
    warmup = math.ceil(warmup_frac * total)
    if step < warmup:
        return lr * step / warmup
    progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    floor = min_ratio * lr
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("lr, total, frac, min_ratio", [
    (2e-5, 100, 0.1, 0.0), (2e-4, 24, 0.1, 0.0), (1e-3, 15, 0.1, 0.1), (1.0, 7, 0.0, 0.0),
    (3e-4, 1000, 0.03, 0.05), (1e-4, 1, 0.5, 0.0), (5e-5, 3, 0.9, 0.2)])
def test_schedule_equals_the_hand_written_formula(lr, total, frac, min_ratio):
    _, sched = _make(lr=lr, total_steps=total, warmup_frac=frac, min_lr_ratio=min_ratio)
    for step in range(0, total + 3):
        want = _hand_schedule(step, lr, total, frac, min_ratio)
        assert float(sched(step)) == pytest.approx(want, rel=2e-7, abs=2e-7 * lr), (step, want)


def test_clipping_by_hand():
    # eps = 1 makes Adam's first step depend on the gradient's magnitude: -lr * g / (|g| + 1)
    tx, _ = _make(lr=0.1, warmup_frac=0.0, eps=1.0, clip_norm=1.0)
    params = {"w": jnp.zeros((2, 2))}
    g = {"w": jnp.array([[3.0, 0.0], [0.0, 4.0]])}  # global norm 5 -> scaled by 1/5
    upd, _ = tx.update(g, tx.init(params), params)
    gc = np.array([[0.6, 0.0], [0.0, 0.8]])
    np.testing.assert_allclose(np.asarray(upd["w"]), -0.1 * gc / (np.abs(gc) + 1.0), rtol=1e-5)
    # below the threshold nothing is scaled
    small = {"w": g["w"] / 10}
    upd, _ = tx.update(small, tx.init(params), params)
    gs = np.asarray(small["w"])
    np.testing.assert_allclose(np.asarray(upd["w"]), -0.1 * gs / (np.abs(gs) + 1.0), rtol=1e-5)


def test_weight_decay_mask():
    tx, _ = _make(lr=0.1, warmup_frac=0.0, weight_decay=0.5)
    params = {"q": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))},
              "norm": {"scale": jnp.ones((2, 4))}, "A": jnp.full((1, 2, 4, 2), 2.0)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zeros, tx.init(params), params)
    # zero gradient: only decayed leaves move, by -lr * wd * p
    np.testing.assert_allclose(np.asarray(upd["q"]["kernel"]), -0.05, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(upd["A"]), -0.1, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(upd["q"]["bias"]), 0.0)
    np.testing.assert_array_equal(np.asarray(upd["norm"]["scale"]), 0.0)


def test_multisteps_equals_mean_gradient_step():
    tx, sched = _make(lr=0.01, warmup_frac=0.0, weight_decay=0.1, clip_norm=0.5, grad_accum=2, total_steps=10)
    rng = np.random.default_rng(0)
    params = {"k": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
              "b": {"bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}
    g1 = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    g2 = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)

    state = tx.init(params)
    u1, state = tx.update(g1, state, params)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u1))  # first micro-step: no update
    u2, state = tx.update(g2, state, params)

    # manual reference: one clipped AdamW step on the mean gradient
    ref_tx = optax.chain(optax.clip_by_global_norm(0.5),
                         optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1,
                                     mask={"k": {"kernel": True}, "b": {"bias": False}}))
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    ref, _ = ref_tx.update(mean, ref_tx.init(params), params)
    for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(u2))


@pytest.mark.parametrize("field,value", [("total_steps", 0), ("warmup_frac", 1.0), ("grad_accum", 0)])
def test_bad_config_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        _make(**{field: value})


def test_the_run_configs_optim_section_is_what_make_optimizer_takes():
    """The trainer passes cfg.optim as it is: the same schedule as the settings given by hand."""
    from socialalign_jax.runs.run_config import as_run_config, RunConfig

    cfg = as_run_config({"optim": {"lr": 0.5, "warmup_frac": 0.0}})
    assert type(cfg.optim) is OptimConfig and RunConfig().optim == OptimConfig()
    _, sched = optim.make_optimizer(cfg.optim, 20)
    np.testing.assert_allclose(float(sched(0)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), _hand_schedule(10, 0.5, 20, 0.0, 0.0), rtol=1e-6)
