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


def matmul(spec: str, a, b, out32: bool = False):
    """jnp.einsum(spec, a, b) in a's dtype.

    out32 (`ModelConfig.matmul_out` 'float32', the default for bfloat16 on CPUs): a half-precision
    product is asked of the dot in float32 and rounded to a's dtype once after. Why: XLA:CPU runs bf16 x bf16 -> f32
    at about twice its float32 rate on a CPU with AVX512-BF16, but bf16 x bf16 -> bf16 at no more
    than the float32 rate (`benchmarks/gemm_dtype.py`). Used for the linear maps' products (row-major
    operands, the contraction last in x), which XLA:CPU gives to YNNPACK; its fallback dot kernel
    refuses bf16 x bf16 -> f32 at run time, which a transposed operand can reach (attention's values;
    a decode-form weight transposed in the same program as a lone decode step: tests/model/
    test_matmul_out.py; generation's loop, which reads the weights the decode form made before it, runs).
    """
    if out32 and a.dtype != jnp.float32:
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)
    return jnp.einsum(spec, a, b)


def weight_major_dot(x, w_t, preferred_element_type=None):
    """x [B, S, D] times a weight stored [E, D] -> [B, S, E], formed weight-major: [E, D] x [D, B*S].

    Why: for a few rows (a decode step) XLA:CPU's GEMM runs 1.3-2x faster with the weight as the
    left-hand operand than as the right-hand one ([B*S, D] x [D, E]), whether the weight is the
    tied LM head's [V, D] table (`modules.Embed.attend`) or a linear map stored transposed for the
    decode loop (`decoder.decode_form`); docs/benchmarks.md has the measurements. The [E, B, S]
    result is transposed after an optimization barrier, which keeps XLA from folding the transpose
    back into the dot (and so back into the slow form).
    """
    out = jnp.einsum("ed,bsd->ebs", w_t, x, preferred_element_type=preferred_element_type)
    return jnp.transpose(jax.lax.optimization_barrier(out), (1, 2, 0))


def allowed_keys(q_pos, k_pos):
    """q_pos [B, S], k_pos [B, T] (-1 = empty or padding) -> [B, S, T] bool: a query sees every valid
    key at a position <= its own (the causal mask by absolute position, for a forward and a cache)."""
    return (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])


def attention(q, k, v, q_pos, k_pos, impl: str = "einsum"):
    """Grouped-query causal attention over absolute positions.

    q [B, S, Hq, Dh]; k, v [B, T, Hkv, Dh]; q_pos [B, S]; k_pos [B, T] with -1 marking empty or
    padded key slots. A query attends to every valid key whose position is <= its own, which is
    the causal mask for a full forward and for a KV cache alike (slots need not be in order).
    impl: 'einsum' (below), or 'xla' / 'cudnn' for `jax.nn.dot_product_attention` with that
    implementation and the same mask (cuDNN's fused kernel never materialises the scores).
    Returns [B, S, Hq, Dh].
    """
    allowed = allowed_keys(q_pos, k_pos)  # [B, S, T]
    if impl != "einsum":
        return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=allowed[:, None],
                                            implementation=impl)
    dh = q.shape[-1]
    qg = rearrange(q, "b s (k g) d -> b s k g d", k=k.shape[2])  # query heads grouped by their kv head
    # Scores as [B, Hkv, S, G, T]: the (s, g) rows of one kv head are contiguous in the layout the
    # query already has, and a select masks them. On XLA:CPU this ran a SmolLM2 prefill's attention
    # (8 x 416 tokens) ~20% faster than [B, Hkv, G, S, T] with an additive bias, with the same
    # forward + backward time and temporaries within 2% at Qwen2.5-0.5B's training shapes. A fully
    # masked row (a padding query) gets -1e30 everywhere, so its softmax is uniform and finite.
    scores = jnp.einsum("bskgd,btkd->bksgt", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(dh)))
    scores = jnp.where(allowed[:, None, :, None, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bksgt,btkd->bskgd", probs, v)
    return rearrange(out, "b s k g d -> b s (k g) d")


def cached_attention(q, k, v, q_pos, k_pos, shared=None, impl: str = "einsum"):
    """Attention over a KV cache in its heads-major layout, with an optional shared block of keys.

    q [N, S, Hq, Dh]; k, v [N, Hkv, T, Dh] (the cache's layout: for each (row, kv head) the slots
    are contiguous, so the score and value contractions read the cache as it lies; in the
    [N, T, Hkv, Dh] layout XLA:CPU transposes a layer's whole slice of the cache for every decode
    step, which cost more than the rest of SmolLM2's step at 464 slots); q_pos [N, S]; k_pos
    [N, T] (-1 = empty or padding).

    shared: None, or (k_s, v_s [B, Hkv, Ts, Dh], pos_s [B, Ts]): keys every run of R = N // B
    consecutive rows attends to besides its own (rows b*R .. b*R+R-1 share block b: the K samples
    of one prompt, whose prompt is cached once, `decoder.branch_cache`). The shared keys are read
    once per prompt for all R rows (one [R*G*S, Dh] x [Dh, Ts] matmul per (prompt, kv head))
    instead of once per row. The softmax runs over the shared and own keys together, so the
    result is that of `attention` over the concatenated keys, up to rounding.

    A chunk of several tokens without a shared block (a prefill into the cache) goes to
    `attention` with `impl` (k/v swapped to [N, T, Hkv, Dh]: one copy of the layer's slots per
    chunk): XLA:CPU fuses the single-batch-axis form below, scores, softmax and values, into one
    XNNPACK graph that ran a SmolLM2 prefill's attention 3x slower than `attention`'s einsums. A
    decode step (S = 1) or a branched cache takes the einsums below (XLA's and cuDNN's fused
    kernels take neither a shared block nor this layout). Returns [N, S, Hq, Dh].
    """
    n, s, hq, dh = q.shape
    hkv = k.shape[1]
    if shared is None and s > 1:
        return attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), q_pos, k_pos, impl=impl)
    scale = 1.0 / jnp.sqrt(jnp.float32(dh))

    def bias(pos):  # [N, T] slot positions -> [N, 1, 1, S, T] additive mask (-1e30 + score rounds to -1e30)
        return jnp.where(allowed_keys(q_pos, pos), 0.0, _NEG_INF).astype(jnp.float32)[:, None, None]

    # Every contraction has ONE batch axis, (row, kv head), with contiguous operands: XLA:CPU runs a
    # dot with two batch axes, or operands it must transpose, at half the speed (a prefill's scores).
    def dot(a, b, spec):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)

    own = rearrange(dot(rearrange(q, "n s (k g) d -> (n k) (g s) d", k=hkv), rearrange(k, "n k t d -> (n k) t d"),
                        "xmd,xtd->xmt"), "(n k) (g s) t -> n k g s t", n=n, s=s)
    scores = [own * scale + bias(k_pos)]
    if shared is not None:
        k_s, v_s, pos_s = shared
        r = n // k_s.shape[0]
        sc = dot(rearrange(q, "(b r) s (k g) d -> (b k) (r g s) d", r=r, k=hkv),
                 rearrange(k_s, "b k t d -> (b k) t d"), "xmd,xtd->xmt")
        sc = rearrange(sc, "(b k) (r g s) t -> (b r) k g s t", k=hkv, r=r, s=s)
        scores.insert(0, sc * scale + bias(jnp.repeat(pos_s, r, axis=0)))
    probs = jax.nn.softmax(scores[0] if len(scores) == 1 else jnp.concatenate(scores, axis=-1),
                           axis=-1).astype(v.dtype)  # [N, Hkv, G, S, (Ts +) T]
    t_own = k.shape[2]
    p_own = probs if shared is None else probs[..., -t_own:]
    out = rearrange(jnp.einsum("xmt,xtd->xmd", rearrange(p_own, "n k g s t -> (n k) (g s) t"),
                               rearrange(v, "n k t d -> (n k) t d")), "(n k) (g s) d -> n s (k g) d", n=n, s=s)
    if shared is not None:
        ps = rearrange(probs[..., :-t_own], "(b r) k g s t -> (b k) (r g s) t", r=r)
        os_ = jnp.einsum("xmt,xtd->xmd", ps, rearrange(v_s, "b k t d -> (b k) t d"))
        out = out + rearrange(os_, "(b k) (r g s) d -> (b r) s (k g) d", k=hkv, r=r, s=s).astype(out.dtype)
    return out
