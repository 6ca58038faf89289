"""The Qwen2/Llama decoder as a pure function of (params, batch), with PAC-LoRA hooks and a KV cache.

Layers are stacked on a leading axis and run with `lax.scan`: one compiled layer body keeps
compile time flat in depth (which matters for the CPU test suite as much as for a 7B run).
Every adaptable linear map goes through `pac_lora.adapted_linear`, which is the plain base
matmul when the adapter tree has no entry for it.

Routing depends on segment ids computed from absolute positions and the prompt spans; the
cache carries both (and, in `pooled` mode, the per-sequence gate weights of the prefill), so
cached decoding routes each token exactly as a full forward does.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from socialalign_jax import layers, pac_lora, sharding
from socialalign_jax.config import ModelConfig, as_dtype
from socialalign_jax.pac_lora import LoraConfig, MODULE_BLOCK


# Logical axes of the activations at layer boundaries (sharding.LOGICAL_RULES maps them to the
# mesh). Inside `sharding.activation_sharding(mesh)` each becomes a sharding constraint, so on
# a (data, fsdp, tensor) mesh activations are split over the batch (and heads / mlp / vocab
# over 'tensor') instead of being left to propagation, which replicates them on large slices;
# outside that context they are no-ops.
_ACT = ("batch", "length", "embed")  # residual stream [B, S, D]
_ACT_HEADS = ("batch", "length", "heads", None)  # q, attention output [B, S, H, Dh]
_ACT_KV = ("batch", "length", "kv_heads", None)  # k, v (and a layer's cache) [B, S|T, Hkv, Dh]
_ACT_MLP = ("batch", "length", "mlp")  # gate, up [B, S, F]
_ACT_VOCAB = ("batch", "length", "vocab")  # logits [B, S, V]
_constrain = sharding.logical_constraint


class ModelOutput(NamedTuple):
    logits: Any  # [B, S, V] float32, or None when compute_logits=False
    hidden: Any  # [B, S, D] after the final norm (what the LM head and sentiment head read)
    cache: Any  # updated cache, or None
    gate_stats: Any  # {module: {'a': [L, 3, Ea], 'b': ..., 'a_entropy': [L, 3], ..., 'count': [L, 3]}} sums


def init_params(cfg: ModelConfig, key) -> dict:
    """Random base parameters (normal std 0.02, norms at 1) in cfg.param_dtype; for tests and demos."""
    pdt = as_dtype(cfg.param_dtype)
    n, d, f, v = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    keys = iter(jax.random.split(key, 16))

    def normal(shape):
        return (0.02 * jax.random.normal(next(keys), shape, jnp.float32)).astype(pdt)

    attn = {
        "q": {"kernel": normal((n, d, cfg.q_dim))},
        "k": {"kernel": normal((n, d, cfg.kv_dim))},
        "v": {"kernel": normal((n, d, cfg.kv_dim))},
        "o": {"kernel": normal((n, cfg.q_dim, d))},
    }
    if cfg.qkv_bias:
        attn["q"]["bias"] = normal((n, cfg.q_dim))
        attn["k"]["bias"] = normal((n, cfg.kv_dim))
        attn["v"]["bias"] = normal((n, cfg.kv_dim))
    params = {
        "embed": {"embedding": normal((v, d))},
        "layers": {
            "input_norm": {"scale": jnp.ones((n, d), pdt)},
            "attn": attn,
            "post_attn_norm": {"scale": jnp.ones((n, d), pdt)},
            "mlp": {"gate": {"kernel": normal((n, d, f))}, "up": {"kernel": normal((n, d, f))},
                    "down": {"kernel": normal((n, f, d))}},
        },
        "final_norm": {"scale": jnp.ones((d,), pdt)},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": normal((d, v))}
    return params


def init_cache(cfg: ModelConfig, batch: int, max_len: int, lora_cfg: LoraConfig | None = None,
               dtype=None) -> dict:
    """An empty KV cache for `max_len` slots.

    key_pos holds the absolute position of each filled slot (-1 = empty or padding), so
    attention and routing never depend on slot order or on how the tokens were chunked.
    """
    dt = as_dtype(dtype or cfg.dtype)
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    cache = {
        "k": _constrain(jnp.zeros(shape, dt), ("layers",) + _ACT_KV),
        "v": _constrain(jnp.zeros(shape, dt), ("layers",) + _ACT_KV),
        "key_pos": jnp.full((batch, max_len), -1, jnp.int32),
        "index": jnp.zeros((), jnp.int32),
        "next_pos": jnp.zeros((batch,), jnp.int32),
        "user_end": jnp.zeros((batch,), jnp.int32),
        "news_end": jnp.zeros((batch,), jnp.int32),
    }
    if lora_cfg is not None and lora_cfg.routing == "pooled" and lora_cfg.targets:
        cache["pooled"] = {
            name: {"a": jnp.full((cfg.num_layers, batch, lora_cfg.num_analyze), 1.0 / lora_cfg.num_analyze),
                   "b": jnp.full((cfg.num_layers, batch, lora_cfg.num_compose), 1.0 / lora_cfg.num_compose)}
            for name in lora_cfg.targets}
    return cache


def _layer(cfg: ModelConfig, lc: LoraConfig | None, route: dict, x, lp, ad, kv, pooled, rng, cos, sin,
           q_pos, k_pos, cache_index):
    """One decoder layer. Returns (x, new_kv, stats, new_pooled).

    kv: None (no cache), or a function (k, v) -> (k_all, v_all, new_kv) that writes this
    chunk's keys and values into the cache and returns every slot of this layer.
    """
    stats, new_pooled = {}, {}

    def lin(h, name, mod_idx):
        block = MODULE_BLOCK[name]
        adapter = (ad or {}).get(block, {}).get(name)
        key = None if rng is None else jax.random.fold_in(rng, mod_idx)
        prev = None if pooled is None or name not in pooled else pooled[name]
        y, st, pst = pac_lora.adapted_linear(h, lp[block][name], adapter, lc, route, key, prev)
        if st is not None:
            stats[name] = st
        if pst is not None:
            new_pooled[name] = pst
        return y

    b, s, _ = x.shape
    x = _constrain(x, _ACT)
    h = layers.rms_norm(x, lp["input_norm"]["scale"], cfg.rms_norm_eps)
    q = _constrain(lin(h, "q", 0).reshape(b, s, cfg.num_heads, cfg.head_dim), _ACT_HEADS)
    k = _constrain(lin(h, "k", 1).reshape(b, s, cfg.num_kv_heads, cfg.head_dim), _ACT_KV)
    v = _constrain(lin(h, "v", 2).reshape(b, s, cfg.num_kv_heads, cfg.head_dim), _ACT_KV)
    q = layers.apply_rope(q, cos, sin)
    k = layers.apply_rope(k, cos, sin)
    if kv is not None:  # write this chunk into the cache, attend over every slot
        k_all, v_all, new_kv = kv(k, v)
        k_all, v_all = _constrain(k_all, _ACT_KV), _constrain(v_all, _ACT_KV)
        attn = layers.attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), q_pos, k_pos)
    else:
        new_kv = None
        attn = layers.attention(q, k, v, q_pos, k_pos)
    attn = _constrain(attn, _ACT_HEADS)
    x = _constrain(x + lin(attn.reshape(b, s, cfg.q_dim), "o", 3), _ACT)
    h = layers.rms_norm(x, lp["post_attn_norm"]["scale"], cfg.rms_norm_eps)
    gate = _constrain(lin(h, "gate", 4), _ACT_MLP)
    up = _constrain(lin(h, "up", 5), _ACT_MLP)
    x = _constrain(x + lin(jax.nn.silu(gate) * up, "down", 6), _ACT)
    return x, new_kv, stats, new_pooled


def _positions(attention_mask, start):
    """Absolute positions from a padding mask: real tokens count up from `start` [B] (left or right padding)."""
    return start[:, None] + jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)


def forward(params, input_ids, cfg: ModelConfig, *, attention_mask=None, positions=None, adapters=None,
            lora_cfg: LoraConfig | None = None, spans=None, cache=None, rng=None, deterministic=True,
            compute_logits=True) -> ModelOutput:
    """Run the decoder over input_ids [B, S].

    attention_mask [B, S] (1 = real token; left or right padding); positions [B, S] absolute
    (derived from the mask and the cache when omitted); spans = (user_end [B], news_end [B]) token
    boundaries for routing (stored in the cache at prefill and reused afterwards); cache from
    `init_cache` (the chunk is written at slot cache['index']); rng for adapter dropout when
    deterministic=False.
    """
    dt = as_dtype(cfg.dtype)
    b, s = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((b, s), jnp.int32)
    attention_mask = attention_mask.astype(jnp.int32)
    valid = attention_mask > 0
    start = cache["next_pos"] if cache is not None else jnp.zeros((b,), jnp.int32)
    if positions is None:
        positions = _positions(attention_mask, start)
    positions = positions.astype(jnp.int32)
    if spans is not None:
        user_end, news_end = (jnp.asarray(t, jnp.int32) for t in spans)
    elif cache is not None:
        user_end, news_end = cache["user_end"], cache["news_end"]
    else:
        user_end = news_end = jnp.zeros((b,), jnp.int32)

    use_adapters = adapters is not None and lora_cfg is not None and "layers" in adapters
    route = {"seg": pac_lora.segment_ids(positions, user_end, news_end, valid), "valid": valid,
             "deterministic": deterministic}
    lc = lora_cfg if use_adapters else None

    x = _constrain(params["embed"]["embedding"][input_ids].astype(dt), _ACT)
    cos, sin = layers.rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    q_pos = positions
    new_pos = jnp.where(valid, positions, -1)
    if cache is not None:
        index = cache["index"]
        k_pos = jax.lax.dynamic_update_slice(cache["key_pos"], new_pos, (0, index))
        kv_xs = (cache["k"], cache["v"])
    else:
        index = None
        k_pos = new_pos
        kv_xs = None

    pooled_xs = None
    if use_adapters and lc.routing == "pooled" and lc.targets and cache is not None:
        if "pooled" not in cache:
            # Without the stored prefill summaries every decoded token would silently get uniform gates.
            raise ValueError("pooled routing with a KV cache needs init_cache(cfg, batch, max_len, lora_cfg)")
        # Prefill (slot index 0) computes the span summaries; later chunks reuse what prefill stored.
        pooled_xs = cache["pooled"]
        route["use_stored"] = index > 0
    layer_rngs = None
    if use_adapters and not deterministic and lc.dropout > 0.0:
        if rng is None:
            raise ValueError("forward(deterministic=False) with adapter dropout needs an rng")
        layer_rngs = jax.random.split(rng, cfg.num_layers)

    ad_layers = adapters["layers"] if use_adapters else None
    layer_params = params["layers"]
    if not cfg.scan_layers and not isinstance(layer_params, (list, tuple)):
        layer_params = unstack_layers(params)["layers"]
    if isinstance(layer_params, (list, tuple)):
        x, kv_out, stats, pooled_out = _unrolled_layers(cfg, lc, route, x, layer_params, ad_layers, cache,
                                                        pooled_xs, layer_rngs, cos, sin, q_pos, k_pos, index)
    else:
        # The stacked KV cache [L, B, T, Hkv, Dh] rides in the scan's carry and each layer writes its
        # chunk in place (dynamic_update_slice at [i, :, index]). As a scanned input and output it
        # would be copied twice per decode step (sliced per layer in, stacked per layer out): the
        # whole cache, 1.2 GB per token at 7B and batch 16.
        def body(carry, xs):
            x, kv = carry
            lp, ad, pooled, lrng, i = xs

            def write_layer(k, v):
                k_c = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype)[None], (i, 0, index, 0, 0))
                v_c = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype)[None], (i, 0, index, 0, 0))
                k_all = jax.lax.dynamic_index_in_dim(k_c, i, 0, keepdims=False)  # this layer's slots [B, T, Hkv, Dh]
                v_all = jax.lax.dynamic_index_in_dim(v_c, i, 0, keepdims=False)
                return k_all, v_all, (k_c, v_c)

            write = write_layer if kv is not None else None
            x, kv_out, st, pst = _layer(cfg, lc, route, x, lp, ad, write, pooled, lrng, cos, sin, q_pos, k_pos,
                                        index)
            return (x, kv_out), (st, pst if pst else None)

        if cfg.remat:
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        (x, kv_out), (stats, pooled_out) = jax.lax.scan(
            body, (x, kv_xs), (params["layers"], ad_layers, pooled_xs, layer_rngs,
                               jnp.arange(cfg.num_layers, dtype=jnp.int32)))

    hidden = _constrain(layers.rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps), _ACT)
    logits = None
    if compute_logits:
        logits = lm_logits(params, hidden, cfg)

    new_cache = None
    if cache is not None:
        new_cache = dict(cache)
        new_cache.update(
            k=kv_out[0], v=kv_out[1], key_pos=k_pos, index=index + s,
            next_pos=jnp.maximum(start, jnp.max(jnp.where(valid, positions + 1, 0), axis=1)),
            user_end=user_end, news_end=news_end)
        if pooled_xs is not None:
            new_cache["pooled"] = pooled_out
    return ModelOutput(logits, hidden, new_cache, stats if use_adapters else None)


def _unrolled_layers(cfg, lc, route, x, layer_list, ad_layers, cache, pooled_xs, layer_rngs, cos, sin, q_pos,
                     k_pos, index):
    """The layers as a Python loop over per-layer parameter trees (see `unstack_layers`).

    XLA:CPU copies each layer's weights out of the stacked arrays whenever a scan slices them;
    for a one-token decode step that copy costs more than the matmul it feeds. In training
    (cfg.scan_layers=False) the loop also avoids stacking every layer's saved activations.
    The KV cache stays stacked and is updated in place. Same maths as the scan, layer by layer.
    """
    take = lambda tree, i: None if tree is None else jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    k_stack = v_stack = None
    if cache is not None:
        k_stack, v_stack = cache["k"], cache["v"]
    stats, pooled = [], []
    for i, lp in enumerate(layer_list):
        def write_stack(k, v, i=i):
            nonlocal k_stack, v_stack
            k_stack = jax.lax.dynamic_update_slice(k_stack, k.astype(k_stack.dtype)[None], (i, 0, index, 0, 0))
            v_stack = jax.lax.dynamic_update_slice(v_stack, v.astype(v_stack.dtype)[None], (i, 0, index, 0, 0))
            return k_stack[i], v_stack[i], None

        write = write_stack if cache is not None else None

        def run(x, lp, ad, pooled, rng, write=write):
            return _layer(cfg, lc, route, x, lp, ad, write, pooled, rng, cos, sin, q_pos, k_pos, index)

        if cfg.remat and cache is None:
            run = jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)
        x, _, st, pst = run(x, lp, take(ad_layers, i), take(pooled_xs, i), take(layer_rngs, i))
        stats.append(st)
        pooled.append(pst if pst else None)
    stack = lambda trees: None if trees[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
    kv_out = None if cache is None else (k_stack, v_stack)
    return x, kv_out, stack(stats) if stats and stats[0] else {}, stack(pooled)


def unstack_layers(params: dict) -> dict:
    """params with 'layers' as a list of per-layer trees: the form `forward` runs as a Python loop.

    Do it once, outside the decode loop (`sampling.generate` does on the CPU): the slices are
    copies, made once instead of once per generated token.
    """
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    return dict(params, layers=[jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(n)])


def lm_logits(params, hidden, cfg: ModelConfig):
    """hidden [B, S, D] -> logits [B, S, V] in float32 (tied: the embedding's transpose)."""
    if cfg.tie_embeddings:
        w = params["embed"]["embedding"]
        logits = jnp.einsum("bsd,vd->bsv", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
    else:
        w = params["lm_head"]["kernel"]
        logits = jnp.einsum("bsd,dv->bsv", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return _constrain(logits, _ACT_VOCAB)


def sentiment_logits(hidden, prompt_len, head):
    """The sentiment head at the last prompt token: hidden [B, S, D], prompt_len [B] -> [B, K] float32."""
    idx = jnp.clip(prompt_len - 1, 0, hidden.shape[1] - 1)
    h = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return h @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)
