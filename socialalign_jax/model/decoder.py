"""The Qwen2/Llama decoder's functional entry points: (params, batch) in, logits and cache out.

The model itself is the Flax module tree in `model.modules` (where every parameter is declared,
with its initializer and logical axes). These wrappers keep the nested-dict interface the
trainer, generation, scoring, export and planning use: `init_params` / `init_adapters`
return the `params` / `lora` collections of `Decoder.init`, and `forward` is `Decoder.apply`.

Layers are stacked on a leading axis and run under `nn.scan`: one compiled layer body keeps
compile time flat in depth. Routing depends on segment ids computed from absolute positions and
the prompt spans; the cache carries both (and, in `pooled` mode, the per-sequence gate weights of
the prefill), so cached decoding routes each token exactly as a full forward does.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from socialalign_jax.model import modules
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig


ModelOutput = modules.ModelOutput


# How `init_params` draws random weights. The Flax decoder draws each layer from its own key
# (nn.scan), so `random:<preset>` with a given seed gives other weights than the hand-written
# model before it did. A run on random weights records this in its config; a checkpoint without
# it (or with another) is refused on restore rather than resumed onto a different base.
RANDOM_INIT = "flax-scan/1"


def init_params(cfg: ModelConfig, key) -> dict:
    """Random base parameters (normal std 0.02, norms at 1) in cfg.param_dtype; for tests and demos.

    The `params` collection of `modules.Decoder` (jitted so that nothing but the params is computed).
    """
    return _init_collection(cfg, None, "params", key)


def init_adapters(key, cfg, lc: LoraConfig) -> dict[str, Any]:
    """The trainable tree: {'layers': {'attn': {...}, 'mlp': {...}}, 'head': {...}} (float32).

    The `lora` collection of `modules.Decoder`, where each adapter variable is declared (with
    its initializer: A ~ U(+-1/sqrt(d_in)), B = 0, gate kernels ~ U(+-1/sqrt(fan_in)), head
    kernel ~ U(+-1/sqrt(D)), head bias 0) and its logical axes.
    """
    return _init_collection(cfg, lc, "lora", key)


def init_boxed(cfg: ModelConfig, lora_cfg: LoraConfig | None = None):
    """Abstract (`jax.eval_shape`) variables with their `nn.Partitioned` boxes: the logical axes
    of every declared parameter, {'params': ..., 'lora': ...} (lora only when lora_cfg is given)."""
    dec = modules.Decoder(cfg, lora_cfg)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: dec.init({"params": jax.random.PRNGKey(0)}, ids, method=dec.init_all))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_collection_jit(cfg, lora_cfg, collection, key):
    dec = modules.Decoder(cfg, lora_cfg)
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = dec.init({"params": key}, ids, method=dec.init_all)
    return nn.unbox(variables.get(collection, {}))


def _init_collection(cfg: ModelConfig, lora_cfg: LoraConfig | None, collection: str, key) -> dict:
    """One variable collection of a fresh Decoder as plain nested dicts (XLA drops the other's work)."""
    return _to_dict(_init_collection_jit(cfg, lora_cfg, collection, key))


def _to_dict(tree):
    if hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def init_cache(cfg: ModelConfig, batch: int, max_len: int, lora_cfg: LoraConfig | None = None,
               dtype=None) -> dict:
    """An empty KV cache for `max_len` slots: the `cache` collection of `modules.KVCache`.

    {k, v [L, B, T, Hkv, Dh] in dtype (default cfg.dtype), key_pos [B, T] (-1 = empty), index [],
    next_pos / user_end / news_end [B], and with pooled routing pooled {target: {a, b}}}.
    """
    # The boxes' values, not nn.unbox: under a step's mesh Flax's unbox would also constrain every
    # leaf, without the divisibility fallback (modules.KVCache constrains k and v itself).
    boxed = cache_boxed(cfg, batch, max_len, lora_cfg, dtype)
    return jax.tree.map(lambda b: b.value if isinstance(b, nn.Partitioned) else b, boxed,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def cache_boxed(cfg: ModelConfig, batch: int, max_len: int, lora_cfg: LoraConfig | None = None, dtype=None):
    """The cache of `init_cache` with its `nn.LogicallyPartitioned` boxes (its declared logical axes)."""
    dec = modules.Decoder(cfg, lora_cfg)
    return dec.init({}, batch, max_len, dtype, method=dec.make_cache)["cache"]["kv"]


def cache_axes(cfg: ModelConfig, batch: int, max_len: int, lora_cfg: LoraConfig | None = None) -> dict:
    """Logical axes of every leaf of `init_cache`'s tree, as declared in `modules.KVCache`."""
    boxed = jax.eval_shape(lambda: cache_boxed(cfg, batch, max_len, lora_cfg))
    return jax.tree.map(lambda b: tuple(b.names), boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def repeat_cache(cache: dict, repeats: int, cfg: ModelConfig, lora_cfg: LoraConfig | None = None) -> dict:
    """Every row of a filled cache repeated `repeats` times: row b becomes rows b*repeats .. b*repeats+repeats-1.

    Why: the K samples of one prompt share its prefill (`sampling.generate(samples=K)`); the
    prompt is run once and the cache branches. Each leaf is repeated along the axis that
    `modules.KVCache` declares as 'batch' (k/v, slot positions, each row's next position and
    spans, pooled routing's stored gate weights), so a leaf added there later is repeated too;
    the shared write index has no batch axis and is kept. lora_cfg: as given to `init_cache`.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if repeats == 1:
        return cache
    batch, max_len = cache["key_pos"].shape
    axes = cache_axes(cfg, batch, max_len, lora_cfg)
    return jax.tree.map(lambda x, ax: jnp.repeat(x, repeats, axis=ax.index("batch")) if "batch" in ax else x,
                        cache, axes)


_positions = modules._positions


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
    use_adapters = adapters is not None and lora_cfg is not None and "layers" in adapters
    lc = lora_cfg if use_adapters else None
    layer_params = params["layers"]
    if not cfg.scan_layers and not isinstance(layer_params, (list, tuple)):
        layer_params = unstack_layers(params)["layers"]
    unrolled = isinstance(layer_params, (list, tuple))
    variables = {"params": dict(params)}
    if use_adapters:
        variables["lora"] = {"layers": adapters["layers"]}
    if unrolled:
        # Per-layer variables {'0': ..., '1': ...} of modules.UnrolledLayers; the adapters
        # are sliced here (inside the trace), as the base layers were by `unstack_layers`.
        variables["params"]["layers"] = {str(i): lp for i, lp in enumerate(layer_params)}
        if use_adapters:
            variables["lora"]["layers"] = {str(i): jax.tree.map(lambda a, i=i: a[i], adapters["layers"])
                                           for i in range(len(layer_params))}
    dec = modules.Decoder(cfg, lc, deterministic=deterministic, unrolled=unrolled,
                          remat_unrolled=cfg.remat and cache is None)
    if cache is None:
        return dec.apply(variables, input_ids, attention_mask, positions, spans, False, rng, compute_logits)
    if lc is not None and lc.routing == "pooled" and lc.targets and "pooled" not in cache:
        # Without the stored prefill summaries every decoded token would silently get uniform gates.
        raise ValueError("pooled routing with a KV cache needs init_cache(cfg, batch, max_len, lora_cfg)")
    variables["cache"] = {"kv": cache}
    out, updated = dec.apply(variables, input_ids, attention_mask, positions, spans, True, rng, compute_logits,
                             mutable=["cache"])
    return out._replace(cache=updated["cache"]["kv"])


def unstack_layers(params: dict) -> dict:
    """params with 'layers' as a list of per-layer trees: the form `forward` runs as a Python loop.

    Do it once, outside the decode loop (`sampling.generate` does on the CPU): the slices are
    copies, made once instead of once per generated token.
    """
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    return dict(params, layers=[jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(n)])


def lm_logits(params, hidden, cfg: ModelConfig):
    """hidden [B, S, D] -> logits [B, S, V] in float32 (tied: the embedding's transpose)."""
    dec = modules.Decoder(cfg)
    head = {k: v for k, v in params.items() if k != "layers"}
    return dec.apply({"params": head}, hidden, method=dec.logits)


def sentiment_logits(hidden, prompt_len, head):
    """The sentiment head at the last prompt token: hidden [B, S, D], prompt_len [B] -> [B, K] float32."""
    d, k = head["kernel"].shape
    return modules.SentimentHead(d, k).apply({"lora": head}, hidden, prompt_len)
