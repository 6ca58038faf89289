"""The next-token negative log-likelihood: one implementation for training, generation and scoring.

Lives with the model (not with the training objective) because every user of a decoder's
logits needs it: the objective's response CE (train/losses.py), the generation CLI's
per-example NLL and launch/score.py's log-probabilities. All maths is float32 whatever the
compute dtype of the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def token_nll(logits, labels):
    """-log softmax(logits)[label] without a one-hot: logsumexp minus the gathered logit.

    The one next-token (and class) NLL: the objective, the training step's response CE, the
    generation CLI's per-example NLL and launch/score.py's log-probs all call it.

    logits [..., V] (any float dtype), labels [...] int -> [...] float32.
    """
    logits = logits.astype(_F32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [...]
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked


def response_ce(logits, input_ids, loss_mask):
    """Summed next-token NLL over response tokens, and the number of those tokens.

    logits [B, S, V]; input_ids [B, S]; loss_mask [B, S] marks LABEL positions (DESIGN.md
    "Batch"): the label input_ids[:, t] is predicted from logits[:, t-1], so position 0 can
    never be a label and loss_mask[:, 0] is ignored (the data pipeline never sets it: the
    response always follows a prompt). Returns (sum_nll, num_tokens), both float32 scalars;
    the mean is sum_nll / num_tokens over the global batch.

    For a large vocabulary this materialises [B, S, V] float32 logits; use
    `response_ce_chunked` on the final hidden states to avoid that.
    """
    pred = logits[:, :-1]  # [B, S-1, V] predicts input_ids[:, 1:]
    labels = input_ids[:, 1:]  # [B, S-1]
    mask = loss_mask[:, 1:].astype(_F32)  # [B, S-1]
    nll = token_nll(pred, labels)  # [B, S-1]
    return jnp.sum(nll * mask), jnp.sum(mask)


def response_ce_chunked(hidden, logits_fn, input_ids, loss_mask, *, chunk: int = 128):
    """`response_ce` computed from final hidden states, `chunk` positions at a time.

    hidden [B, S, D] (after the final norm); logits_fn: [B, c, D] -> [B, c, V] float32, the
    model's own LM head (`functools.partial(decoder.lm_logits, params, cfg=cfg)`), so the
    logits are the ones the model computes everywhere else. Only [B, chunk, V] logits exist at any time and each
    chunk is rematerialised in the backward pass, so peak memory for V = 152k stays small.
    S-1 is padded up to a multiple of `chunk` with masked positions.
    """
    b, s, d = hidden.shape
    n = s - 1
    if n <= 0:
        zero = jnp.zeros((), _F32)
        return zero, zero
    chunk = max(1, min(chunk, n))
    pad = (-n) % chunk
    h = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0)))  # [B, n+pad, D]
    labels = jnp.pad(input_ids[:, 1:], ((0, 0), (0, pad)))  # [B, n+pad]
    mask = jnp.pad(loss_mask[:, 1:].astype(_F32), ((0, 0), (0, pad)))  # [B, n+pad]
    c = (n + pad) // chunk
    # [c, B, chunk, ...]: scan over chunks of positions
    h = h.reshape(b, c, chunk, d).swapaxes(0, 1)
    labels = labels.reshape(b, c, chunk).swapaxes(0, 1)
    mask = mask.reshape(b, c, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(hc, lc, mc):
        logits = logits_fn(hc).astype(_F32)
        return jnp.sum(token_nll(logits, lc) * mc)

    def body(acc, xs):
        return acc + one(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), _F32), (h, labels, mask))
    return total, jnp.sum(mask)
