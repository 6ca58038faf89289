"""Optimizer: global-norm clipping -> AdamW (decay masked off biases and norm scales),
linear warmup + cosine decay to a floor, optional gradient accumulation.

The paper's recipe is AdamW, lr 2e-5, cosine, warmup ratio 0.1, weight decay 0.01
(Hugging Face Trainer defaults otherwise: b1 0.9, b2 0.999, eps 1e-8, clip 1.0).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

_DEFAULTS = dict(lr=2e-5, warmup_frac=0.1, total_steps=None, weight_decay=0.01, b1=0.9, b2=0.999,
                 eps=1e-8, clip_norm=1.0, grad_accum=1, min_lr_ratio=0.0)

# Leaves that are offsets or multiplicative scales are not decayed (as in HF's Trainer,
# which excludes biases and LayerNorm weights).
_NO_DECAY_NAMES = frozenset({"bias", "scale"})


def _field(cfg: Any, name: str):
    """Read a field from a ConfigDict, dataclass, mapping or namespace, else the default."""
    if isinstance(cfg, dict):
        val = cfg.get(name, _DEFAULTS[name])
    else:
        val = getattr(cfg, name, _DEFAULTS[name])
    return val


def warmup_cosine_schedule(lr: float, total_steps: int, warmup_frac: float = 0.1,
                           min_lr_ratio: float = 0.0) -> Callable[[Any], jax.Array]:
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


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """Build (optimizer, schedule) from cfg fields lr, warmup_frac, total_steps,
    weight_decay, b1, b2, eps, clip_norm (None or <= 0: no clipping), grad_accum (k > 1
    wraps the chain in optax.MultiSteps: k micro-batch calls per update, gradients
    averaged, clipping applied to the average), min_lr_ratio.
    """
    total = _field(cfg, "total_steps")
    if total is None or int(total) <= 0:
        raise ValueError(f"optimizer config: total_steps must be a positive integer, got {total!r}")
    warmup_frac = float(_field(cfg, "warmup_frac"))
    if not 0.0 <= warmup_frac < 1.0:
        raise ValueError(f"optimizer config: warmup_frac must be in [0, 1), got {warmup_frac}")
    k = _field(cfg, "grad_accum")
    k = 1 if k is None else int(k)
    if k < 1:
        raise ValueError(f"optimizer config: grad_accum must be >= 1, got {k}")
    min_ratio = float(_field(cfg, "min_lr_ratio") or 0.0)
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"optimizer config: min_lr_ratio must be in [0, 1], got {min_ratio}")

    schedule = warmup_cosine_schedule(float(_field(cfg, "lr")), int(total), warmup_frac, min_ratio)
    clip = _field(cfg, "clip_norm")
    parts = []
    if clip is not None and float(clip) > 0:
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(optax.adamw(schedule, b1=float(_field(cfg, "b1")), b2=float(_field(cfg, "b2")),
                             eps=float(_field(cfg, "eps")),
                             weight_decay=float(_field(cfg, "weight_decay")), mask=decay_mask))
    tx = optax.chain(*parts)
    if k > 1:
        # MultiSteps is a class; hand back a plain GradientTransformation so callers and
        # checkpointing see one type whatever k is (the state still counts micro-steps).
        tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    return tx, schedule
