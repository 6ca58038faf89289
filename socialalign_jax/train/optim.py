"""Optimizer: global-norm clipping -> AdamW (decay masked off biases and norm scales),
linear warmup + cosine decay to a floor, optional gradient accumulation.

Its settings are the run config's `optim` section (runs/run_config.OptimConfig, the one place
their defaults are declared). The paper's recipe is AdamW, lr 2e-5, cosine, warmup ratio 0.1,
weight decay 0.01, with Hugging Face Trainer defaults otherwise (b1 0.9, b2 0.999, eps 1e-8,
clip 1.0): OptimConfig's defaults except the lr, which configs/weibo.py's paper presets set.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from socialalign_jax.runs.run_config import OptimConfig

# Leaves that are offsets or multiplicative scales are not decayed (as in HF's Trainer,
# which excludes biases and LayerNorm weights).
_NO_DECAY_NAMES = frozenset({"bias", "scale"})


def warmup_cosine_schedule(lr: float, total_steps: int, warmup_frac: float,
                           min_lr_ratio: float) -> Callable[[Any], jax.Array]:
    """lr(step): linear 0 -> lr over ceil(warmup_frac * total_steps) steps (HF's rounding),
    then half a cosine from lr down to min_lr_ratio * lr at step total_steps, flat after.

    `step` counts optimizer updates (with accumulation, not micro-batches). optax's
    warmup_cosine_decay_schedule counts its decay_steps from step 0 (warmup included); a run
    whose warmup covers every step still gets one decay step, as HF does.
    """
    warmup = int(math.ceil(warmup_frac * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=min_lr_ratio * lr)


def decay_mask(params) -> Any:
    """True on leaves that get weight decay: matrices (ndim >= 2) not named bias/scale."""
    def keep(path, leaf):
        last = path[-1] if path else None
        name = getattr(last, "key", getattr(last, "name", None))
        return bool(jnp.ndim(leaf) >= 2 and name not in _NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig,
                   total_steps: int) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """(optimizer, schedule) for `total_steps` optimizer updates: clip_norm (<= 0: no clipping),
    AdamW with lr on the warmup + cosine schedule, and grad_accum k > 1 wrapping the chain in
    optax.MultiSteps (k micro-batch calls per update, gradients averaged, clipping applied to
    the average). A value that cannot work is a ValueError naming the field.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"optimizer config: total_steps must be a positive integer, got {total_steps!r}")
    if not 0.0 <= cfg.warmup_frac < 1.0:
        raise ValueError(f"optimizer config: warmup_frac must be in [0, 1), got {cfg.warmup_frac}")
    if cfg.grad_accum < 1:
        raise ValueError(f"optimizer config: grad_accum must be >= 1, got {cfg.grad_accum}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"optimizer config: min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")

    schedule = warmup_cosine_schedule(float(cfg.lr), total_steps, float(cfg.warmup_frac), float(cfg.min_lr_ratio))
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
    parts.append(optax.adamw(schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                             weight_decay=float(cfg.weight_decay), mask=decay_mask))
    tx = optax.chain(*parts)
    if cfg.grad_accum > 1:
        # MultiSteps is a class; hand back a plain GradientTransformation so callers and
        # checkpointing see one type whatever k is (the state still counts micro-steps).
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum).gradient_transformation()
    return tx, schedule
