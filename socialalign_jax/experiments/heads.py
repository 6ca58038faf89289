"""Design A: the sentiment head trained on cached frozen features, with the training code's pieces.

Everything that decides the result is shared with `launch/train.py`: the head's
initialisation (`decoder.init_adapters` with no adapter targets), its forward
(`decoder.sentiment_logits`), the loss (`losses.total_loss`: L_sent + lambda_macro L_macro
with the mean or Gumbel estimator, L_lm absent because the base model is frozen and the
features are fixed), the optimizer (`optim.make_optimizer`) and the event-grouped batch
plan (`pipeline.epoch_plan`: G events x M cases per batch, every example once per epoch).
The whole run is one jit'd `lax.scan` over steps, so a cell costs a compile and a few
seconds on the CPU.

Seeds: `seed` sets the head's initialisation, the order of batches (the plan's seed) and
the Gumbel samples, each from its own stream.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from socialalign_jax.data.pipeline import epoch_plan
from socialalign_jax.model import decoder
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.decoder import init_adapters
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.runs.run_config import OptimConfig
from socialalign_jax.train import losses, optim


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    steps: int = 600
    lr: float = 3e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    events_per_batch: int = 8  # G
    cases_per_event: int = 8  # M
    lambda_sent: float = 1.0
    lambda_macro: float = 0.0
    estimator: str = "mean"  # mean | gumbel
    gumbel_tau: float = 1.0

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown head setting(s) {bad}; known: {sorted(known)}")
        out = cls(**d)
        if out.estimator not in ("mean", "gumbel"):
            raise ValueError(f"estimator must be 'mean' or 'gumbel', got {out.estimator!r}")
        if out.steps < 1:
            raise ValueError(f"steps must be >= 1, got {out.steps}")
        return out


def batch_plan(event_of_example: np.ndarray, train_idx: np.ndarray, G: int, M: int, seed: int,
               steps: int) -> np.ndarray:
    """[steps, G*M] example indices (-1 = padding): the training pipeline's epochs, concatenated."""
    ev = event_of_example[train_idx]
    out, epoch = [], 0

    while sum(len(p) for p in out) < steps:
        plan = epoch_plan(ev, G, M, seed, epoch)
        out.append(np.where(plan >= 0, train_idx[np.maximum(plan, 0)], -1))
        epoch += 1
    return np.concatenate(out)[:steps]


@functools.lru_cache(maxsize=16)
def _trainer(cfg: HeadConfig, hidden: int, num_classes: int):
    import jax
    import jax.numpy as jnp

    tx, _ = optim.make_optimizer(OptimConfig(lr=cfg.lr, warmup_frac=cfg.warmup_frac, weight_decay=cfg.weight_decay,
                                             clip_norm=cfg.clip_norm), cfg.steps)

    def head_logits(head, x):  # x [B, D] -> [B, K], through the model's own head function
        ones = jnp.ones((x.shape[0],), jnp.int32)
        return decoder.sentiment_logits(x[:, None, :], ones, head)

    def loss_fn(head, batch, rng):
        logits = head_logits(head, batch["x"])
        zero = jnp.zeros((), jnp.float32)
        return losses.total_loss(None, logits, batch, lambda_sent=cfg.lambda_sent,
                                 lambda_macro=cfg.lambda_macro, estimator=cfg.estimator, rng=rng,
                                 tau=cfg.gumbel_tau, lm_nll=(zero, zero))

    def run(head, feats, labels, events, tdist, plan, rng):
        # feats [N, D], labels [N], events [N], tdist [E, K] (training events' targets), plan [T, B]
        opt_state = tx.init(head)

        def step(carry, xs):
            head, opt_state = carry
            rows, t = xs
            valid = rows >= 0
            r = jnp.maximum(rows, 0)
            ev = events[r]
            batch = {"x": feats[r], "label": jnp.where(valid, labels[r], -1),
                     "event_id": jnp.where(valid, ev, -1), "example_mask": valid.astype(jnp.float32),
                     "target_dist": tdist[ev] * valid[:, None]}
            (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(head, batch, jax.random.fold_in(rng, t))
            updates, opt_state = tx.update(grads, opt_state, head)
            head = jax.tree.map(lambda p, u: p + u, head, updates)
            return (head, opt_state), jnp.stack([loss, terms["sent"], terms["macro"]])

        (head, _), curve = jax.lax.scan(step, (head, opt_state), (plan, jnp.arange(plan.shape[0])))
        return head, curve

    def predict(head, feats):
        return jax.nn.softmax(head_logits(head, feats), axis=-1)

    return jax.jit(run), jax.jit(predict)


def init_head(hidden: int, num_classes: int, seed: int) -> dict:
    """The training run's head initialisation (decoder.init_adapters with no adapter targets)."""
    import jax

    # Only hidden_size matters to the head; the rest is a valid placeholder shape.
    cfg = ModelConfig(family="llama", vocab_size=1, hidden_size=hidden, intermediate_size=1, num_layers=1,
                      num_heads=1, num_kv_heads=1, head_dim=1)
    tree = init_adapters(jax.random.fold_in(jax.random.PRNGKey(seed), 0), cfg,
                         LoraConfig(targets=(), num_classes=num_classes))
    return tree["head"]


def train_head(cfg: HeadConfig, feats: np.ndarray, labels: np.ndarray, events: np.ndarray,
               train_idx: np.ndarray, target_dist: np.ndarray, seed: int) -> tuple[dict, np.ndarray]:
    """Train one head on the training examples. Returns (head, curve [steps, 3]: loss, L_sent, L_macro).

    target_dist [E, K]: Q_g per event (only training events are read).
    """
    import jax

    num_classes = target_dist.shape[1]
    run, _ = _trainer(cfg, feats.shape[1], num_classes)
    plan = batch_plan(events, np.asarray(train_idx, np.int64), cfg.events_per_batch, cfg.cases_per_event,
                      seed, cfg.steps)
    head = init_head(feats.shape[1], num_classes, seed)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    head, curve = run(head, feats.astype(np.float32), labels.astype(np.int32), events.astype(np.int32),
                      target_dist.astype(np.float32), plan.astype(np.int32), rng)
    return jax.device_get(head), np.asarray(curve)


def predict(cfg: HeadConfig, head: dict, feats: np.ndarray) -> np.ndarray:
    """[N, K] head probabilities."""
    _, pred = _trainer(cfg, feats.shape[1], len(np.asarray(head["bias"])))
    return np.asarray(pred(head, feats.astype(np.float32)), np.float64)
