"""The training and evaluation steps: pure functions of (frozen base, trainable state, batch, rng).

Gradients and optimizer state exist only for the adapter tree (which holds the sentiment
head): the base params enter as a non-differentiated argument, so XLA never allocates a
base-sized gradient or Adam moment.

LM logits are computed only at response positions (gathered, at most `max_response_tokens`
per row): the prompt is never scored, and for a 152k vocabulary the [B, S, V] logits of a
full sequence would dominate memory and FLOPs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from socialalign_jax.core.errors import UserError
from socialalign_jax.model import axes as model_axes, decoder, pac_lora
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.nll import response_ce, token_nll
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.runs.run_config import LossConfig  # the run's `loss` section, declared with the run config
from socialalign_jax.train import losses


def response_positions(loss_mask, max_tokens: int):
    """Indices of the label positions of each row, padded: loss_mask [B, S] -> idx [B, R], valid [B, R].

    Rows with more than R response tokens must be caught on the host before the step
    (`check_response_lengths`); inside jit nothing can be dropped silently, so we also return
    the true count and the caller asserts on it in the metrics.
    """
    def one(row):
        (idx,) = jnp.nonzero(row, size=max_tokens, fill_value=0)
        return idx
    idx = jax.vmap(one)(loss_mask)
    valid = jnp.arange(max_tokens)[None, :] < jnp.sum(loss_mask, axis=1, keepdims=True)
    return idx.astype(jnp.int32), valid


def scored_positions(batch, max_tokens: int):
    """Where the LM logits are read: ('all', None) when max_tokens <= 0, else (positions [B, R] that
    predict the response tokens: label t is predicted from t - 1, and (labels [B, R], valid [B, R]))."""
    if max_tokens <= 0:
        return "all", None
    idx, valid = response_positions(batch["loss_mask"], max_tokens)  # label positions t
    labels = jnp.take_along_axis(batch["input_ids"], idx, axis=1)  # [B, R]
    return jnp.maximum(idx - 1, 0), (labels, valid)


def response_nll(logits, batch, targets):
    """Summed next-token NLL over response tokens and their count, from the logits `scored_positions` asked for."""
    if targets is None:  # logits at every position [B, S, V]
        return response_ce(logits, batch["input_ids"], batch["loss_mask"])
    labels, valid = targets
    nll = token_nll(logits, labels)  # [B, R]
    w = valid.astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


def _apply(adapters, params, batch, *, model_cfg, lora_cfg, loss_cfg, rng=None, deterministic=True):
    """The decoder applied once for a step: logits at the scored positions, the sentiment head at the
    prompt's last token (when the adapters have one), gate statistics. Returns (out, targets)."""
    logits_at, targets = scored_positions(batch, loss_cfg.max_response_tokens)
    out = decoder.forward(
        params, batch["input_ids"], model_cfg, attention_mask=batch["attention_mask"],
        adapters=adapters, lora_cfg=lora_cfg, spans=(batch["user_end"], batch["news_end"]),
        rng=rng, deterministic=deterministic, logits_at=logits_at,
        sentiment_at=batch["prompt_len"] if "head" in adapters else None)
    return out, targets


def compute_loss(adapters, params, batch, rng, *, model_cfg: ModelConfig, lora_cfg: LoraConfig,
                 loss_cfg: LossConfig, deterministic: bool):
    """The dual-level objective for one global batch. Returns (loss, (terms, gate_stats))."""
    drop_rng, gumbel_rng = jax.random.split(rng)
    out, targets = _apply(adapters, params, batch, model_cfg=model_cfg, lora_cfg=lora_cfg, loss_cfg=loss_cfg,
                          rng=drop_rng, deterministic=deterministic)
    lm = response_nll(out.logits, batch, targets)
    if out.sentiment is not None:
        sent_logits = out.sentiment
    else:  # no head: the sentiment and macro terms vanish
        sent_logits = jnp.zeros((batch["input_ids"].shape[0], batch["target_dist"].shape[-1]), jnp.float32)
    loss, terms = losses.total_loss(
        None, sent_logits, batch, lambda_sent=loss_cfg.lambda_sent if "head" in adapters else 0.0,
        lambda_macro=loss_cfg.lambda_macro if "head" in adapters else 0.0, estimator=loss_cfg.estimator,
        rng=gumbel_rng, tau=loss_cfg.gumbel_tau, lm_nll=lm)
    terms["response_tokens_total"] = jnp.sum(batch["loss_mask"]).astype(jnp.float32)
    return loss, (terms, out.gate_stats)


def gate_summary(stats) -> dict[str, Any]:
    """The step's gate metrics: token-weighted mean expert weights [3, E] and gate entropy [3] per segment,
    over every layer and module (`pac_lora.summarize_gate_stats(pool=True)`)."""
    if not stats:
        return {}
    m = pac_lora.summarize_gate_stats(stats, pool=True)
    return {"gate_a_weights": m["a"], "gate_b_weights": m["b"], "gate_a_entropy": m["a_entropy"],
            "gate_b_entropy": m["b_entropy"]}


def init_train_state(adapters, optimizer: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "adapters": adapters, "opt_state": optimizer.init(adapters)}


def sharded_train_state(seed: int, model_cfg: ModelConfig, lora_cfg: LoraConfig,
                        optimizer: optax.GradientTransformation, mesh, rules=None):
    """The fresh train state's layout on `mesh`, and a function that creates it there: (abstract, create).

    As flax's examples/lm1b sets up its state: `jax.eval_shape` of the init gives every leaf's
    shape and dtype without computing anything, the model's logical axes (model/axes.py) give
    each leaf's sharding, and the init jitted with those `out_shardings` writes each device's
    shard where it lives. Initialising on one device and then `jax.device_put` would first need
    the whole adapter and optimizer tree on that device, and moves it once more.

    abstract: the state {'step', 'adapters', 'opt_state'} as ShapeDtypeStructs carrying their
    NamedShardings; what a checkpoint restores into and the train step's in/out shardings.
    create(): the state itself, with the adapters `decoder.init_adapters(PRNGKey(seed), ...)`
    draws (the same bits: the init is the same computation, and the key is made inside the jit,
    so every process of a multi-host run traces the same program from the seed alone).
    """
    def init():
        return init_train_state(decoder.init_adapters(jax.random.PRNGKey(seed), model_cfg, lora_cfg), optimizer)

    shapes = jax.eval_shape(init)
    shardings = model_axes.shardings(shapes, mesh, rules, strict=False)  # optimizer scalars: replicated
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return abstract, jax.jit(init, out_shardings=shardings)


def make_train_step(model_cfg: ModelConfig, lora_cfg: LoraConfig, loss_cfg: LossConfig,
                    optimizer: optax.GradientTransformation, schedule=None):
    """train_step(params, state, batch, rng) -> (state, metrics); jit it with the state donated."""

    def train_step(params, state, batch, rng):
        rng = jax.random.fold_in(rng, state["step"])
        grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
        (loss, (terms, stats)), grads = grad_fn(
            state["adapters"], params, batch, rng, model_cfg=model_cfg, lora_cfg=lora_cfg,
            loss_cfg=loss_cfg, deterministic=False)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["adapters"])
        adapters = optax.apply_updates(state["adapters"], updates)
        metrics = dict(terms)
        metrics["grad_norm"] = optax.global_norm(grads)
        if schedule is not None:
            metrics["lr"] = schedule(state["step"])
        metrics.update(gate_summary(stats))
        new_state = {"step": state["step"] + 1, "adapters": adapters, "opt_state": opt_state}
        return new_state, metrics

    return train_step


def make_eval_step(model_cfg: ModelConfig, lora_cfg: LoraConfig, loss_cfg: LossConfig):
    """eval_step(params, adapters, batch) -> sums for held-out metrics (deterministic, no dropout)."""

    def eval_step(params, adapters, batch):
        out, targets = _apply(adapters, params, batch, model_cfg=model_cfg, lora_cfg=lora_cfg, loss_cfg=loss_cfg)
        lm_sum, lm_cnt = response_nll(out.logits, batch, targets)
        res = {"lm_sum": lm_sum, "lm_count": lm_cnt}
        if out.sentiment is not None:
            res["probs"] = jax.nn.softmax(out.sentiment, axis=-1)
        if out.gate_stats:
            res["gate_stats"] = out.gate_stats
        return res

    return eval_step


def check_response_lengths(batch, max_tokens: int, where: str = "batch") -> None:
    """Host-side guard: refuse (never truncate) a response longer than the scored window."""
    if max_tokens <= 0:
        return
    longest = int(batch["loss_mask"].sum(axis=1).max())
    if longest > max_tokens:
        raise UserError(
            f"{where}: a response has {longest} tokens but loss.max_response_tokens={max_tokens}; "
            f"raise --config.loss.max_response_tokens (responses are never truncated)")


__all__ = ["LossConfig", "compute_loss", "make_train_step", "make_eval_step", "init_train_state",
           "sharded_train_state", "check_response_lengths", "gate_summary"]
