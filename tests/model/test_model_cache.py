"""KV-cached decoding equals the full forward, position by position, for both families.

Prefill a padded batch of prompts, then feed 16 tokens one at a time through the cache; every
step's logits must equal the full forward's logits at the same absolute position of the same
sequence, with left padding and with right padding in the prompt batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from socialalign_jax.model import decoder
from socialalign_jax.model.config import ModelConfig

PROMPT_LENS = np.array([5, 8, 3, 6])
# One batch holds both paddings: positions come from the mask, so rows may differ.
PADDING = ("left", "right", "right", "left")
MAX_PROMPT = int(PROMPT_LENS.max())
N_GEN = 16
PAD_ID = 0

CONFIGS = {
    # Qwen2-style: q/k/v bias, tied embeddings.
    "qwen2": ModelConfig("qwen2", 101, 32, 64, 2, 4, 2, 8, rope_theta=1e6, qkv_bias=True,
                         tie_embeddings=True),
    # Llama-style: no bias, untied LM head.
    "llama": ModelConfig("llama", 101, 32, 64, 2, 4, 2, 8, rope_theta=1e4, rms_norm_eps=1e-5,
                         qkv_bias=False, tie_embeddings=False),
}


def random_params(cfg, seed):
    """init_params, then every tensor (norm scales too) made clearly random so mistakes show."""
    params = decoder.init_params(cfg, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    new = []
    for k, leaf in zip(keys, leaves):
        noise = jax.random.normal(k, leaf.shape, leaf.dtype)
        new.append(1.0 + 0.2 * noise if bool(jnp.all(leaf == 1.0)) else 0.15 * noise)
    return jax.tree_util.tree_unflatten(tree, new)


def _batch(rng, vocab, padding=PADDING):
    """Prompt batch [B, MAX_PROMPT] and the full sequences [B, MAX_PROMPT + N_GEN] they continue into.

    Returns prompt ids/mask, full ids/mask, the generated tokens [B, N_GEN] and, per row, the
    column of the full sequence holding generated token i (col0 + i).
    """
    b = len(PROMPT_LENS)
    total = MAX_PROMPT + N_GEN
    prompts = [rng.integers(1, vocab, n) for n in PROMPT_LENS]
    gen = rng.integers(1, vocab, (b, N_GEN))
    p_ids = np.full((b, MAX_PROMPT), PAD_ID)
    p_mask = np.zeros((b, MAX_PROMPT), np.int32)
    f_ids = np.full((b, total), PAD_ID)
    f_mask = np.zeros((b, total), np.int32)
    col0 = np.zeros(b, int)
    for i, (pr, n) in enumerate(zip(prompts, PROMPT_LENS)):
        seq = np.concatenate([pr, gen[i]])
        if padding[i] == "left":
            p_ids[i, MAX_PROMPT - n:] = pr
            p_mask[i, MAX_PROMPT - n:] = 1
            f_ids[i, MAX_PROMPT - n:] = seq
            f_mask[i, MAX_PROMPT - n:] = 1
            col0[i] = MAX_PROMPT
        else:
            p_ids[i, :n] = pr
            p_mask[i, :n] = 1
            f_ids[i, :n + N_GEN] = seq
            f_mask[i, :n + N_GEN] = 1
            col0[i] = n
    return p_ids, p_mask, f_ids, f_mask, gen, col0


@pytest.mark.parametrize("family,layout", [("qwen2", "stacked"), ("llama", "stacked"), ("qwen2", "unstacked"),
                                           ("qwen2", "decode_form"), ("llama", "decode_form")])
def test_cached_decode_equals_full_forward(family, layout):
    """`unstacked`: the decode steps run the layers as a Python loop (decoder.unstack_layers) and
    update the stacked cache in place; `decode_form`: over the weights sampling.generate's CPU loop
    reads (decoder.decode_form: per layer, kernels and the untied LM head stored transposed)."""
    cfg = CONFIGS[family]
    params = random_params(cfg, seed=3)
    step_params = {"stacked": params, "unstacked": decoder.unstack_layers(params)}.get(layout)
    if layout == "decode_form":
        step_params, no_adapters, no_lc = decoder.decode_form(params, None, None)
        assert no_adapters is None and no_lc is None
        down = step_params["layers"][0]["mlp"]["down"]
        assert "kernel_t" in down and "kernel" not in down
        assert ("lm_head" in step_params) == (not cfg.tie_embeddings)
    rng = np.random.default_rng(7)
    p_ids, p_mask, f_ids, f_mask, gen, col0 = _batch(rng, cfg.vocab_size)
    assert {"left", "right"} <= {pad for pad, n in zip(PADDING, PROMPT_LENS) if n < MAX_PROMPT}
    fwd = jax.jit(functools.partial(decoder.forward, cfg=cfg))

    full = np.asarray(fwd(params, jnp.asarray(f_ids), attention_mask=jnp.asarray(f_mask)).logits)
    assert np.abs(full).max() > 0.5  # logits are not trivially flat

    cache = decoder.init_cache(cfg, len(PROMPT_LENS), MAX_PROMPT + N_GEN)
    out = fwd(params, jnp.asarray(p_ids), attention_mask=jnp.asarray(p_mask), cache=cache)
    # Prefill logits at real prompt tokens.
    for b, n in enumerate(PROMPT_LENS):
        cols = np.nonzero(p_mask[b])[0]
        fcols = np.nonzero(f_mask[b])[0][:n]
        np.testing.assert_allclose(np.asarray(out.logits)[b, cols], full[b, fcols], rtol=0, atol=1e-5)
    cache = out.cache
    np.testing.assert_array_equal(np.asarray(cache["next_pos"]), PROMPT_LENS)

    # Decode: the logits after feeding generated token i sit at column col0 + i of the full pass.
    for i in range(N_GEN):
        out = fwd(step_params, jnp.asarray(gen[:, i:i + 1]), cache=cache)
        cache = out.cache
        want = full[np.arange(len(PROMPT_LENS)), col0 + i]
        got = np.asarray(out.logits)[:, 0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"decode step {i}")
    np.testing.assert_array_equal(np.asarray(cache["next_pos"]), PROMPT_LENS + N_GEN)


def test_cache_is_sensitive_to_positions():
    """Sanity: decoding at a wrong absolute position (off by one) gives different logits,
    so the equality above really pins positions down."""
    cfg = CONFIGS["qwen2"]
    params = random_params(cfg, seed=3)
    rng = np.random.default_rng(7)
    p_ids, p_mask, f_ids, f_mask, gen, col0 = _batch(rng, cfg.vocab_size)
    fwd = jax.jit(functools.partial(decoder.forward, cfg=cfg))
    full = np.asarray(fwd(params, jnp.asarray(f_ids), attention_mask=jnp.asarray(f_mask)).logits)
    cache = decoder.init_cache(cfg, len(PROMPT_LENS), MAX_PROMPT + N_GEN)
    cache = fwd(params, jnp.asarray(p_ids), attention_mask=jnp.asarray(p_mask), cache=cache).cache
    wrong = jnp.asarray(PROMPT_LENS + 1)[:, None]
    got = np.asarray(fwd(params, jnp.asarray(gen[:, :1]), positions=wrong, cache=cache).logits)[:, 0]
    want = full[np.arange(len(PROMPT_LENS)), col0]
    assert np.abs(got - want).max() > 1e-3


@pytest.mark.parametrize("remat", [False, True])
def test_unrolled_layers_equal_scan_forward_and_gradients(remat):
    """cfg.scan_layers=False (a Python loop over layers) computes the scan's function: logits,
    gate statistics and adapter gradients, with dropout on (the same per-layer keys)."""
    from socialalign_jax.model import pac_lora

    cfg = CONFIGS["qwen2"].replace(remat=remat)
    params = random_params(cfg, seed=5)
    lc = pac_lora.LoraConfig(num_analyze=2, num_compose=3, rank=4, gate_width=8, dropout=0.1)
    ad = decoder.init_adapters(jax.random.PRNGKey(2), cfg, lc)
    ad = jax.tree_util.tree_map_with_path(  # B = 0 at init would hide the adapters
        lambda p, a: a + 0.1 if p[-1].key == "B" else a, ad)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 9)), jnp.int32)
    spans = (jnp.array([2, 3]), jnp.array([5, 6]))

    def loss(ad, c):
        out = decoder.forward(params, ids, c, adapters=ad, lora_cfg=lc, spans=spans,
                              rng=jax.random.PRNGKey(4), deterministic=False)
        return jnp.sum(out.logits ** 2) * 1e-3, (out.logits, out.gate_stats)

    results = {}
    for scan in (True, False):
        c = cfg.replace(scan_layers=scan)
        (val, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(ad, c)
        results[scan] = (val, aux, grads)
    np.testing.assert_allclose(results[False][0], results[True][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(results[False][1:]), jax.tree.leaves(results[True][1:])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)  # f32 op order
    assert float(jnp.abs(results[True][2]["layers"]["mlp"]["down"]["A"]).max()) > 0


def test_cache_is_the_decoders_flax_cache_collection():
    """The cache is declared in the module tree (`cache` collection, with logical axes), and a
    plain Flax apply with mutable=['cache'] is the same computation as `decoder.forward`."""
    from flax import linen as nn

    from socialalign_jax.model import modules
    from socialalign_jax.model.pac_lora import LoraConfig

    cfg = CONFIGS["qwen2"]
    lc = LoraConfig(targets=("q", "v"), routing="pooled", num_classes=0)
    b, t = 2, 12
    cache = decoder.init_cache(cfg, b, t, lc)
    shape = (cfg.num_layers, b, cfg.num_kv_heads, t, cfg.head_dim)  # heads before slots
    assert cache["k"].shape == shape and cache["v"].shape == shape and not np.any(np.asarray(cache["k"]))
    np.testing.assert_array_equal(cache["key_pos"], -np.ones((b, t)))
    assert int(cache["index"]) == 0 and cache["next_pos"].shape == (b,)
    # pooled routing: each adapted map's own stored gate weights, uniform until a prefill writes them
    assert list(cache["layers"]) == ["attn"] and sorted(cache["layers"]["attn"]) == ["q", "v"]
    np.testing.assert_allclose(cache["layers"]["attn"]["q"]["pooled_a"],
                               np.full((cfg.num_layers, b, lc.num_analyze), 1 / lc.num_analyze))
    np.testing.assert_allclose(cache["layers"]["attn"]["v"]["pooled_b"],
                               np.full((cfg.num_layers, b, lc.num_compose), 1 / lc.num_compose))
    axes = decoder.cache_axes(cfg, b, t, lc)
    assert axes["k"] == ("layers", "batch", "cache_kv_heads", "length", None)
    assert axes["key_pos"] == ("batch", None) and axes["index"] == () and axes["user_end"] == ("batch",)
    assert axes["layers"]["attn"]["v"]["pooled_b"] == ("layers", "batch", None)

    params = random_params(cfg, 3)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (b, 5)))
    base = decoder.init_cache(cfg, b, t)
    want = decoder.forward(params, ids, cfg, cache=base)
    dec = modules.Decoder(cfg)
    got, updated = dec.apply({"params": params, "cache": {"kv": base}}, ids, use_cache=True, mutable=["cache"])
    np.testing.assert_array_equal(np.asarray(got.logits), np.asarray(want.logits))
    for k in ("k", "v", "key_pos", "index", "next_pos"):
        np.testing.assert_array_equal(np.asarray(updated["cache"]["kv"][k]), np.asarray(want.cache[k]))
    assert int(want.cache["index"]) == 5 and np.asarray(want.cache["key_pos"])[:, :5].tolist() == [list(range(5))] * b
    # The declaration is the one the boxes carry: the same tree as init_cache, unboxed.
    boxed = decoder.cache_boxed(cfg, b, t, lc)
    assert jax.tree.structure(nn.unbox(boxed)) == jax.tree.structure(cache)


@pytest.mark.parametrize("s", [1, 3])
def test_cached_attention_with_a_shared_block_equals_attention_over_all_keys(s):
    """`layers.cached_attention` (heads-major cache, a block of keys shared by each run of R rows)
    equals `layers.attention` (tested against transformers in test_hf_parity.py) over each row's
    shared keys followed by its own, and a float64 numpy softmax written out here; empty (-1) and
    future slots of either block are masked."""
    from socialalign_jax.model import layers

    rng = np.random.default_rng(3)
    b, r, hkv, g, dh, ts, t = 2, 3, 2, 2, 8, 5, 4
    n = b * r
    q = rng.normal(size=(n, s, hkv * g, dh)).astype(np.float32)
    k_s, v_s = (rng.normal(size=(b, hkv, ts, dh)).astype(np.float32) for _ in range(2))
    k_o, v_o = (rng.normal(size=(n, hkv, t, dh)).astype(np.float32) for _ in range(2))
    pos_s = np.array([[-1, 0, 1, 2, 3], [0, 1, 2, 3, 4]], np.int32)  # prompt 0 left-padded by one slot
    pos_o = np.full((n, t), -1, np.int32)
    pos_o[:, :2] = np.array([4, 5])[None] + (pos_s[:, -1:] - 3).repeat(r, 0)  # two filled own slots
    q_pos = pos_o[:, 1:2] + np.arange(s)[None] - (s - 1)  # the last query sits on the last filled slot
    got = layers.cached_attention(jnp.asarray(q), jnp.asarray(k_o), jnp.asarray(v_o), jnp.asarray(q_pos),
                                  jnp.asarray(pos_o), shared=(jnp.asarray(k_s), jnp.asarray(v_s), jnp.asarray(pos_s)))

    rep = lambda x: np.repeat(x, r, axis=0)  # noqa: E731
    k_all = np.concatenate([rep(k_s), k_o], axis=2).transpose(0, 2, 1, 3)  # [N, T, Hkv, Dh]
    v_all = np.concatenate([rep(v_s), v_o], axis=2).transpose(0, 2, 1, 3)
    pos_all = np.concatenate([rep(pos_s), pos_o], axis=1)
    want = layers.attention(jnp.asarray(q), jnp.asarray(k_all), jnp.asarray(v_all), jnp.asarray(q_pos),
                            jnp.asarray(pos_all))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)

    ref = np.zeros((n, s, hkv * g, dh))
    for row in range(n):
        for i in range(s):
            ok = (pos_all[row] >= 0) & (pos_all[row] <= q_pos[row, i])
            for h in range(hkv * g):
                sc = k_all[row, :, h // g].astype(np.float64) @ q[row, i, h] / np.sqrt(dh)
                p = np.where(ok, np.exp(sc - sc[ok].max()), 0.0)
                ref[row, i, h] = (p / p.sum()) @ v_all[row, :, h // g]
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-5)

    # Without a shared block: the heads-major cache alone, einsum and XLA's fused attention alike.
    plain = layers.cached_attention(jnp.asarray(q), jnp.asarray(k_all.transpose(0, 2, 1, 3)),
                                    jnp.asarray(v_all.transpose(0, 2, 1, 3)), jnp.asarray(q_pos), jnp.asarray(pos_all))
    np.testing.assert_allclose(np.asarray(plain), ref, rtol=0, atol=1e-5)
    xla = layers.cached_attention(jnp.asarray(q), jnp.asarray(k_all.transpose(0, 2, 1, 3)),
                                  jnp.asarray(v_all.transpose(0, 2, 1, 3)), jnp.asarray(q_pos), jnp.asarray(pos_all),
                                  impl="xla")
    np.testing.assert_allclose(np.asarray(xla), ref, rtol=0, atol=1e-5)
