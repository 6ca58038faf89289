"""The dual-level objective (SPEC section 3): L = L_lm + lambda_sent L_sent + lambda_macro L_macro.

Every term is returned as a (sum, count) pair before it is turned into a mean. The sums are
over the GLOBAL batch, so under `jit` with a batch sharded over ('data', 'fsdp') XLA inserts
the cross-device reductions and the value is the same however the batch is split. The
per-event grouping of the macro term uses only global-batch quantities (first occurrence of
an event id in batch order), never a per-shard quantity, for the same reason.

All maths is float32 whatever the compute dtype of the logits.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp

from socialalign_jax.core.divergence import jensen_shannon
from socialalign_jax.model.nll import response_ce, token_nll

LN2 = math.log(2.0)
_F32 = jnp.float32


# ---------------------------------------------------------------------------- micro level


def sentiment_ce(logits_k, label, example_mask):
    """Summed cross-entropy of the sentiment head over labelled real examples, and their count.

    logits_k [B, K]; label [B] int (-1 = unlabelled); example_mask [B] (0 = padding row).
    """
    valid = (label >= 0) & (example_mask > 0)  # [B]
    nll = token_nll(logits_k, jnp.where(valid, label, 0))  # [B]
    w = valid.astype(_F32)
    return jnp.sum(nll * w), jnp.sum(w)


# ---------------------------------------------------------------------------- divergence


def jsd(p, q, axis: int = -1):
    """Jensen-Shannon divergence in nats: 1/2 KL(P||M) + 1/2 KL(Q||M), M = (P+Q)/2.

    The formula is core.divergence's, shared with the evaluation metric so the loss trains
    the number that is reported; here it runs in float32 with finite gradients where P or Q
    is 0. Exactly 0 for P = Q and at most ln 2; inputs are assumed to be distributions along
    `axis` (zeros allowed). Clipped to [0, ln 2] against float rounding only.
    """
    out = jensen_shannon(jnp.asarray(p, _F32), jnp.asarray(q, _F32), jnp, axis=axis)
    return jnp.clip(out, 0.0, LN2)


# ---------------------------------------------------------------------------- macro level


class EventDists(NamedTuple):
    dist: jax.Array  # [G', K] P_g per slot (0 rows for empty slots)
    counts: jax.Array  # [G'] number of real examples per slot
    slot: jax.Array  # [B] int32 slot of each example (meaningless where not valid)
    first: jax.Array  # [B] bool: the example is its event's first real example in the batch
    valid: jax.Array  # [B] bool: real example with an event id


def event_slots(event_id, example_mask):
    """Map event ids to compact slots 0..G-1 by first occurrence in GLOBAL batch order.

    Returns (slot [B] int32, first [B] bool, valid [B] bool). O(B^2) compares, which is
    negligible next to the model for the batch sizes used, and needs no sorting nor any
    knowledge of the dataset's id range. Invalid rows (padding, event_id < 0) get slot 0
    and must be weighted out by the caller via `valid`.
    """
    eid = jnp.asarray(event_id)
    valid = (jnp.asarray(example_mask) > 0) & (eid >= 0)  # [B]
    same = (eid[:, None] == eid[None, :]) & valid[None, :]  # [B, B] i, j: j valid and same event
    idx = jnp.arange(eid.shape[0])
    first_idx = jnp.argmax(same, axis=1)  # [B] first valid j with i's event
    first = valid & (first_idx == idx)  # [B]
    rank = jnp.cumsum(first.astype(jnp.int32)) - 1  # [B] slot number at each first occurrence
    slot = jnp.where(valid, rank[first_idx], 0).astype(jnp.int32)
    return slot, first, valid


def gumbel_st_samples(probs, rng, tau: float = 1.0):
    """Straight-through Gumbel-softmax samples of Categorical(probs): one-hot forward,
    gradient of the tempered soft sample backward. probs [B, K] -> [B, K] float32."""
    probs = jnp.asarray(probs, _F32)
    logp = jnp.log(jnp.maximum(probs, jnp.finfo(_F32).tiny))
    g = jax.random.gumbel(rng, probs.shape, _F32)
    soft = jax.nn.softmax((logp + g) / tau, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), probs.shape[-1], dtype=_F32)
    return hard + soft - jax.lax.stop_gradient(soft)


def event_distributions(probs, event_id, example_mask, num_segments: int | None = None,
                        estimator: str = "mean", rng=None, tau: float = 1.0) -> EventDists:
    """Per-event batch distribution P_g of the head's predictions.

    probs [B, K] (rows are distributions); event_id [B] (-1 = padding); example_mask [B].
    num_segments: static number of slots G' (default B, the most distinct events a batch
    can hold; smaller values are refused since events would be dropped). estimator:
    'mean' (P_g = mean of p_i) or 'gumbel' (mean of straight-through samples; needs rng).
    """
    b, _ = probs.shape
    num_segments = b if num_segments is None else int(num_segments)
    if num_segments < b:
        raise ValueError(f"event_distributions: num_segments={num_segments} < batch size {b}; "
                         "a batch of B examples can hold B events, none may be dropped")
    if estimator == "mean":
        x = jnp.asarray(probs, _F32)
    elif estimator == "gumbel":
        if rng is None:
            raise ValueError("event_distributions: estimator='gumbel' needs an rng key")
        x = gumbel_st_samples(probs, rng, tau)
    else:
        raise ValueError(f"event_distributions: unknown estimator {estimator!r}; expected 'mean' or 'gumbel'")
    slot, first, valid = event_slots(event_id, example_mask)
    w = valid.astype(_F32)  # [B]
    sums = jax.ops.segment_sum(x * w[:, None], slot, num_segments)  # [G', K]
    counts = jax.ops.segment_sum(w, slot, num_segments)  # [G']
    dist = sums / jnp.maximum(counts, 1.0)[:, None]
    return EventDists(dist, counts, slot, first, valid)


def macro_loss(probs, event_id, example_mask, target_dist, *, estimator: str = "mean",
               rng=None, tau: float = 1.0, num_segments: int | None = None):
    """Count-weighted sum over events of JSD(P_g, Q_g), and the total count.

    Q_g is the target_dist row of the event's first real example (the pipeline repeats
    the same row for every case of an event). L_macro = weighted_sum / total_count.
    """
    ev = event_distributions(probs, event_id, example_mask, num_segments, estimator, rng, tau)
    g = ev.dist.shape[0]
    q = jax.ops.segment_sum(jnp.asarray(target_dist, _F32) * ev.first[:, None].astype(_F32),
                            ev.slot, g)  # [G', K], one first row per non-empty slot
    per_event = jsd(ev.dist, q)  # [G']
    # An event with no labelled response anywhere has an all-zero target: it has no Q_g to
    # align with, so it carries no weight (rather than a spurious JSD against zeros).
    w = ev.counts * (jnp.sum(q, axis=-1) > 0).astype(_F32)
    return jnp.sum(per_event * w), jnp.sum(w)


# ---------------------------------------------------------------------------- total


def _mean(total, count):
    return total / jnp.maximum(count, 1.0)


def total_loss(lm_logits, sent_logits, batch: Mapping[str, jax.Array], *,
               lambda_sent: float = 1.0, lambda_macro: float = 1.0, estimator: str = "mean",
               rng=None, tau: float = 1.0, lm_nll=None):
    """L = L_lm + lambda_sent L_sent + lambda_macro L_macro over one global batch.

    lm_logits [B, S, V], or None with lm_nll = (sum, count) (train/step.py's `response_nll`, from
    the logits at the response positions);
    sent_logits [B, K] from the sentiment head; batch as in DESIGN.md "Batch". A term with
    no contributing element (no labels, no response tokens) is 0. Returns (loss, terms).
    """
    if lm_logits is None:
        if lm_nll is None:
            raise ValueError("total_loss: pass lm_logits or lm_nll=(sum, count)")
        lm_sum, lm_cnt = lm_nll
    else:
        lm_sum, lm_cnt = response_ce(lm_logits, batch["input_ids"], batch["loss_mask"])
    mask = batch["example_mask"]
    s_sum, s_cnt = sentiment_ce(sent_logits, batch["label"], mask)
    probs = jax.nn.softmax(jnp.asarray(sent_logits, _F32), axis=-1)
    m_sum, m_cnt = macro_loss(probs, batch["event_id"], mask, batch["target_dist"],
                              estimator=estimator, rng=rng, tau=tau)
    l_lm, l_sent, l_macro = _mean(lm_sum, lm_cnt), _mean(s_sum, s_cnt), _mean(m_sum, m_cnt)
    loss = l_lm + lambda_sent * l_sent + lambda_macro * l_macro
    terms = {"loss": loss, "lm": l_lm, "sent": l_sent, "macro": l_macro,
             "lm_tokens": lm_cnt, "sent_count": s_cnt, "macro_count": m_cnt}
    return loss, terms
