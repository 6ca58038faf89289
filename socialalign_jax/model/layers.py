"""Decoder building blocks as pure functions: RMSNorm, rotary embeddings, attention.

Numerics follow Hugging Face's Qwen2/Llama so imported checkpoints reproduce their logits:
norms and softmax run in float32, RoPE sin/cos are computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

_NEG_INF = -1e30


def rms_norm(x, scale, eps: float):
    """x [..., D] -> [..., D]; statistics in float32, the weight applied in x's dtype (as HF does)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def rope_tables(positions, head_dim: int, theta: float):
    """positions [B, S] (absolute) -> cos, sin [B, S, head_dim] in float32 (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [B, S, H, Dh]; rotate-half RoPE, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention(q, k, v, q_pos, k_pos, impl: str = "einsum"):
    """Grouped-query causal attention over absolute positions.

    q [B, S, Hq, Dh]; k, v [B, T, Hkv, Dh]; q_pos [B, S]; k_pos [B, T] with -1 marking empty or
    padded key slots. A query attends to every valid key whose position is <= its own, which is
    the causal mask for a full forward and for a KV cache alike (slots need not be in order).
    impl: 'einsum' (below), or 'xla' / 'cudnn' for `jax.nn.dot_product_attention` with that
    implementation and the same mask (cuDNN's fused kernel never materialises the scores).
    Returns [B, S, Hq, Dh].
    """
    allowed = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, S, T]
    if impl != "einsum":
        return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=allowed[:, None],
                                            implementation=impl)
    dh = q.shape[-1]
    qg = rearrange(q, "b s (k g) d -> b s k g d", k=k.shape[2])  # query heads grouped by their kv head
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(dh)))
    # An additive bias rather than a select: its backward is the identity, where a select's
    # materialises a zero tensor of the scores' size. -1e30 + score rounds to -1e30, so the
    # probabilities are the same as with the select.
    scores = scores + jnp.where(allowed, 0.0, _NEG_INF).astype(jnp.float32)[:, None, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return rearrange(out, "b s k g d -> b s (k g) d")
