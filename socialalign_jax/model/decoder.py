"""The Qwen2/Llama decoder's functional entry points: (params, adapters, batch) in, model outputs out.

The model itself is the Flax module tree in `model.modules` (where every parameter is declared,
with its initializer and logical axes), and it is applied in one piece: `forward` is
`model(cfg, lora_cfg).apply({'params': base, 'lora': adapters}, ...)`, and that one call returns
what the trainer, the sampler, the predictor and the scorers read off it: the hidden states, the
logits where they are asked for (everywhere, the last column, or chosen positions), the sentiment
head's logits, the updated `cache` collection and the gate statistics the adapted maps sowed into
`intermediates`. Gradients are taken over the `lora` tree alone. `init_params` / `init_adapters`
return the `params` / `lora` collections of `Decoder.init`.

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

from socialalign_jax.model import modules, pac_lora
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
               dtype=None, shared: tuple[int, int] = (0, 0)) -> dict:
    """An empty KV cache for `max_len` slots: the Decoder's `cache` collection, as one dict.

    {k, v [L, B, Hkv, T, Dh] in dtype (default cfg.dtype), key_pos [B, T] (-1 = empty), index [],
    next_pos / user_end / news_end [B]} (`modules.KVCache`), and with pooled routing
    'layers': {attn|mlp: {target: {pooled_a [L, B, Ea], pooled_b [L, B, Eb]}}}, the adapted maps'
    own stored gate weights (uniform until a prefill writes them). shared = (prompts, slots) with
    slots > 0 adds a branched cache's shared block (shared_k, shared_v, shared_pos: `branch_cache`).
    """
    # The boxes' values, not nn.unbox: under a step's mesh Flax's unbox would also constrain every
    # leaf, without the divisibility fallback (modules.KVCache constrains k and v itself).
    boxed = cache_boxed(cfg, batch, max_len, lora_cfg, dtype, shared)
    return jax.tree.map(lambda b: b.value if isinstance(b, nn.Partitioned) else b, boxed,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _pooled(lora_cfg: LoraConfig | None) -> bool:
    return lora_cfg is not None and lora_cfg.routing == "pooled" and bool(lora_cfg.targets)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _make_cache_jit(cfg, lora_cfg, batch, max_len, dtype, shared):
    # Pooled routing declares its stored gates by running the model once at init: jitted, XLA keeps
    # only the cache's (constant) values and drops the random parameters and the pass.
    dec = modules.Decoder(cfg, lora_cfg)
    return dec.init({"params": jax.random.PRNGKey(0)}, batch, max_len, dtype, shared,
                    method=dec.make_cache)["cache"]


def cache_boxed(cfg: ModelConfig, batch: int, max_len: int, lora_cfg: LoraConfig | None = None, dtype=None,
                shared: tuple[int, int] = (0, 0)):
    """The cache of `init_cache` with its `nn.LogicallyPartitioned` boxes (its declared logical axes)."""
    shared = (int(shared[0]), int(shared[1]))
    if _pooled(lora_cfg):
        coll = _make_cache_jit(cfg, lora_cfg, batch, max_len, dtype, shared)
    else:  # the KV cache alone: no model pass
        dec = modules.Decoder(cfg)
        coll = dec.init({}, batch, max_len, dtype, shared, method=dec.make_cache)["cache"]
    return _join_cache(coll)


def _join_cache(coll) -> dict:
    """The `cache` collection {'kv': {...}, 'layers': {...}?} as the one dict callers hold."""
    out = dict(coll["kv"])
    if "layers" in coll:
        out["layers"] = coll["layers"]
    return out


def _split_cache(cache: dict) -> dict:
    """The inverse of `_join_cache`: the `cache` collection the Decoder reads."""
    coll = {"kv": {k: v for k, v in cache.items() if k != "layers"}}
    if "layers" in cache:
        coll["layers"] = cache["layers"]
    return coll


def cache_axes(cfg: ModelConfig, batch: int, max_len: int, lora_cfg: LoraConfig | None = None,
               shared: tuple[int, int] = (0, 0)) -> dict:
    """Logical axes of every leaf of `init_cache`'s tree, as declared in `modules.KVCache`."""
    boxed = jax.eval_shape(lambda: cache_boxed(cfg, batch, max_len, lora_cfg, shared=shared))
    return jax.tree.map(lambda b: tuple(b.names), boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def repeat_cache(cache: dict, repeats: int, cfg: ModelConfig, lora_cfg: LoraConfig | None = None) -> dict:
    """Every row of a filled cache repeated `repeats` times: row b becomes rows b*repeats .. b*repeats+repeats-1.

    Why: the prompts under R wordings of one user share the head of their prompt
    (`sampling.prefill(prefix=...)`); the head is run once and each prompt continues from a copy.
    (The K samples of a prompt, which only decode, share one copy instead: `branch_cache`.) Each
    leaf is repeated along the axis that
    `modules.KVCache` declares as 'batch' (k/v, slot positions, each row's next position and
    spans, pooled routing's stored gate weights), so a leaf added there later is repeated too;
    the shared write index has no batch axis and is kept. lora_cfg: as given to `init_cache`.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if "shared_k" in cache:
        raise ValueError("repeat_cache: this cache is branched already (it has a shared block); branch the "
                         "prompts' cache once, with all the rows it needs")
    if repeats == 1:
        return cache
    batch, max_len = cache["key_pos"].shape
    axes = cache_axes(cfg, batch, max_len, lora_cfg)
    return jax.tree.map(lambda x, ax: jnp.repeat(x, repeats, axis=ax.index("batch")) if "batch" in ax else x,
                        cache, axes)


def branch_cache(cache: dict, repeats: int, extra: int, cfg: ModelConfig, lora_cfg: LoraConfig | None = None) -> dict:
    """A filled cache of B prompts as the cache of B * repeats rows that share it: row b*repeats + j
    reads prompt b's slots from the shared block and writes its own `extra` slots.

    Why: the K samples of one prompt (`sampling.generate(samples=K)`) continue the same prompt.
    Repeating its cache K times (`repeat_cache`) stores and, at every decode step, reads the
    prompt's keys K times; branching stores them once and `layers.cached_attention` reads them
    once per prompt for all K rows. The rows' own slots start empty (index 0); their next
    positions, spans and pooled routing's stored gate weights are the prompt's, repeated, so each
    row continues exactly as a row of the repeated cache would. The prompt cache's slots become
    the shared block as they are (empty ones stay masked): prefill it with the slots it fills.
    """
    if repeats < 1 or extra < 1:
        raise ValueError(f"branch_cache: repeats and extra must be >= 1, got {repeats} and {extra}")
    if "shared_k" in cache:
        raise ValueError("branch_cache: this cache is branched already; branch the prompts' cache once")
    batch, slots = cache["key_pos"].shape
    axes = cache_axes(cfg, batch, slots, lora_cfg)
    rows = batch * repeats
    out = init_cache(cfg, rows, extra, lora_cfg, dtype=cache["k"].dtype, shared=(batch, slots))
    out.update(shared_k=cache["k"], shared_v=cache["v"], shared_pos=cache["key_pos"])
    for name in ("next_pos", "user_end", "news_end"):
        out[name] = jnp.repeat(cache[name], repeats, axis=0)
    if "layers" in cache:  # pooled routing's stored gate weights, [L, B, E] per target
        out["layers"] = jax.tree.map(lambda x, ax: jnp.repeat(x, repeats, axis=ax.index("batch")),
                                     cache["layers"], axes["layers"])
    return out


_positions = modules._positions


def model(cfg: ModelConfig, lora_cfg: LoraConfig | None = None, *, deterministic: bool = True,
          unrolled: bool = False, remat_unrolled: bool = False) -> modules.Decoder:
    """The one Flax module of the model; every entry point below applies it."""
    return modules.Decoder(cfg, lora_cfg, deterministic=deterministic, unrolled=unrolled,
                           remat_unrolled=remat_unrolled)


def forward(params, input_ids, cfg: ModelConfig, *, attention_mask=None, positions=None, adapters=None,
            lora_cfg: LoraConfig | None = None, spans=None, cache=None, rng=None, deterministic=True,
            logits_at="all", sentiment_at=None) -> ModelOutput:
    """Run the decoder over input_ids [B, S]: `model(...).apply({'params': params, 'lora': adapters}, ...)`.

    attention_mask [B, S] (1 = real token; left or right padding); positions [B, S] absolute
    (derived from the mask and the cache when omitted); spans = (user_end [B], news_end [B]) token
    boundaries for routing (stored in the cache at prefill and reused afterwards); cache from
    `init_cache` (the chunk is written at slot cache['index']); rng for adapter dropout when
    deterministic=False. adapters: the whole `lora` tree (layers and, with num_classes > 0, the
    sentiment head); None runs the base model. logits_at / sentiment_at: what to read off the final
    hidden states (`modules.Decoder.__call__`): logits everywhere, at the last column, at positions
    [B, R] or nowhere; the sentiment head at prompt_len - 1.

    Returns ModelOutput(logits, hidden, sentiment, cache (when one was given), gate_stats (sums
    from the `intermediates` collection, {module: {... [L, ...]}}, with adapters; else None)).
    """
    lc = lora_cfg if adapters is not None and lora_cfg is not None else None
    layer_params = params["layers"]
    per_layer_cache = cache is not None and isinstance(cache["k"], tuple)  # `unstack_cache`: unrolled only
    if (per_layer_cache or not cfg.scan_layers) and not isinstance(layer_params, (list, tuple)):
        layer_params = unstack_layers(params)["layers"]
    unrolled = isinstance(layer_params, (list, tuple))
    variables = {"params": dict(params)}
    if lc is not None:
        variables["lora"] = dict(adapters)
    if cache is not None:  # a pooled-routing cache without its stored gates is refused by the module
        variables["cache"] = _split_cache(cache)
    if unrolled:
        # Per-layer variables {'0': ..., '1': ...} of modules.UnrolledLayers; the adapters (unless
        # `unstack_adapters` did it once) and stored gates are sliced here (inside the trace), as the
        # base layers were by `unstack_layers`.
        variables["params"]["layers"] = {str(i): lp for i, lp in enumerate(layer_params)}
        for coll in ("lora", "cache"):
            if coll in variables and "layers" in variables[coll]:
                tree = variables[coll]["layers"]
                variables[coll]["layers"] = ({str(i): t for i, t in enumerate(tree)} if isinstance(tree, list)
                                             else _unstack(tree, len(layer_params)))
    dec = model(cfg, lc, deterministic=deterministic, unrolled=unrolled,
                remat_unrolled=cfg.remat and cache is None)
    mutable = ["intermediates"] if lc is not None and lc.targets else []
    if cache is not None:
        mutable.append("cache")
    args = (input_ids, attention_mask, positions, spans, cache is not None, rng, logits_at, sentiment_at)
    if mutable:
        out, state = dec.apply(variables, *args, mutable=mutable)
    else:
        out, state = dec.apply(variables, *args), {}
    new_cache = None
    if cache is not None:
        coll = dict(state["cache"])
        if unrolled and "layers" in coll:
            coll["layers"] = _stack(coll["layers"])
        new_cache = _join_cache(coll)
    return out._replace(cache=new_cache,
                        gate_stats=gate_stats_of(state.get("intermediates"), unrolled) if lc is not None else None)


def _unstack(tree, n: int) -> dict:
    """A tree stacked on L -> {'0': layer 0's, ...} (the unrolled layers' variables)."""
    return {str(i): jax.tree.map(lambda a, i=i: a[i], tree) for i in range(n)}


def _stack(per_layer: dict):
    """{'0': ..., '1': ...} -> the tree stacked on L (the inverse of `_unstack`)."""
    return jax.tree.map(lambda *a: jnp.stack(a), *[per_layer[str(i)] for i in range(len(per_layer))])


def gate_stats_of(intermediates, unrolled: bool) -> dict:
    """The gate-statistic sums the adapted maps sowed: {module: {'a': [L, 3, Ea], ..., 'count': [L, 3]}}.

    Scanned layers sow them stacked on L already; unrolled layers ('0', '1', ...) are stacked here.
    """
    if not intermediates or "layers" not in intermediates:
        return {}
    layers = intermediates["layers"]

    def per_layer(tree):  # {'attn'|'mlp': {module: {GATE_STATS: (sums,)}}} -> {module: sums}
        return {name: mod[modules.GATE_STATS][0] for block in tree.values() for name, mod in block.items()}

    if not unrolled:
        return per_layer(layers)
    return per_layer(_stack(layers))


def unstack_layers(params: dict) -> dict:
    """params with 'layers' as a list of per-layer trees: the form `forward` runs as a Python loop.

    Do it once, outside the decode loop (`decode_form` does, for `sampling.generate` on the CPU):
    the slices are copies, made once instead of once per generated token.
    """
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    return dict(params, layers=[jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(n)])


def unstack_adapters(adapters: dict | None, lora_cfg: LoraConfig | None) -> dict | None:
    """adapters with 'layers' as a list of per-layer trees, each map's projection made once
    (`pac_lora.with_projections`): what the unrolled layers read without slicing or rebuilding anything.

    Do it once, outside the decode loop (`decode_form` does for pooled routing, whose adapters are
    not merged), as `unstack_layers` does for the base weights: sliced and prepared inside the loop, every
    adapted map's variables would be copied at every generated token.
    """
    if adapters is None or lora_cfg is None or "layers" not in adapters or isinstance(adapters["layers"], list):
        return adapters
    n = jax.tree.leaves(adapters["layers"])[0].shape[0]
    return dict(adapters, layers=[pac_lora.with_projections(jax.tree.map(lambda a, i=i: a[i], adapters["layers"]),
                                                            lora_cfg) for i in range(n)])


def decode_form(params: dict, adapters: dict | None, lora_cfg: LoraConfig | None):
    """(params, adapters, lora_cfg) as the CPU decode loop reads them, made once before the loop.

    - Per layer (`unstack_layers`), so no step slices the stacked weights.
    - Adapters merged into the base kernels (`pac_lora.merged_kernel`) where every generated token's
      gates are fixed (`pac_lora.decode_gates_fixed`: every routing but pooled; a generated token lies
      after its prompt, outside both spans): the step then runs the base model alone, and the
      returned adapters and lora_cfg are None. Pooled routing keeps its adapters per layer
      (`unstack_adapters`). Up to float rounding the step computes what the unmerged step does.
    - Every linear kernel (and an untied LM head) stored transposed, as 'kernel_t' [d_out, d_in],
      so that a step's few rows take the weight-major product (`pac_lora.base_matmul`).

    What it cost on 2 cores, a SmolLM2-135M step with PAC-LoRA 3x3 on every map: docs/benchmarks.md.
    Only the unrolled decode loop reads this form (`sampling.generate` on CPUs); the scan on
    accelerators keeps the stacked weights and the adapters as they are (no second copy of the
    weights in device memory).
    """
    lc = lora_cfg if adapters is not None and lora_cfg is not None else None
    merge = lc is not None and bool(lc.targets) and "layers" in adapters and pac_lora.decode_gates_fixed(lc)
    out = unstack_layers(params)
    layers = []
    for i, layer in enumerate(out["layers"]):  # layer by layer: no second stacked copy of the weights
        layer = {block: dict(maps) for block, maps in layer.items()}
        for target in lc.targets if merge else ():
            block = pac_lora.MODULE_BLOCK[target]
            adapter = {k: adapters["layers"][block][target][k][i] for k in ("A", "B")}  # all merging reads
            layer[block][target] = dict(layer[block][target],
                                        kernel=pac_lora.merged_kernel(layer[block][target]["kernel"], adapter, lc))
        layers.append(_transposed_kernels(layer))
    out["layers"] = layers
    if "lm_head" in out:
        out["lm_head"] = {"kernel_t": jnp.transpose(out["lm_head"]["kernel"])}
    if merge or lc is None:
        return out, None, None
    return out, unstack_adapters(adapters, lc), lc


def _transposed_kernels(tree):
    """Every linear map's {'kernel': [d_in, d_out], ...} as {'kernel_t': [d_out, d_in], ...}."""
    if "kernel" in tree:
        return {("kernel_t" if k == "kernel" else k): (jnp.transpose(v) if k == "kernel" else v)
                for k, v in tree.items()}
    return {k: _transposed_kernels(v) if isinstance(v, dict) else v for k, v in tree.items()}


_PER_LAYER_CACHE = ("k", "v", "shared_k", "shared_v")


def unstack_cache(cache: dict) -> dict:
    """The cache with its k/v (and shared block) as tuples of per-layer buffers: the form the
    unrolled layers (`unstack_layers`) write in place and read without copying.

    Do it once, outside the decode loop (`sampling.generate` does with the unrolled layers): a
    layer's slice of the stacked [L, ...] cache is a copy, which at every decode step would copy
    the whole cache. `stack_cache` is the inverse.
    """
    return {name: tuple(x) if name in _PER_LAYER_CACHE and not isinstance(x, tuple) else x
            for name, x in cache.items()}


def stack_cache(cache: dict) -> dict:
    """The inverse of `unstack_cache`: k/v (and the shared block) stacked [L, ...] again."""
    return {name: jnp.stack(x) if name in _PER_LAYER_CACHE and isinstance(x, tuple) else x
            for name, x in cache.items()}


def lm_logits(params, hidden, cfg: ModelConfig):
    """The model's LM head alone on given hidden states: [B, S, D] -> logits [B, S, V] float32.

    For scorers that read the logits of a long sequence a chunk of positions at a time
    (`nll.response_ce_chunked`, `scoring.token_logprobs`) so that [B, S, V] never exists; a
    forward that needs logits asks `forward(logits_at=...)` instead. Same module (`Decoder.logits`).
    """
    dec = model(cfg)
    head = {k: v for k, v in params.items() if k != "layers"}
    return dec.apply({"params": head}, hidden, method=dec.logits)


def sentiment_logits(hidden, prompt_len, head):
    """The sentiment head alone on given hidden states: [B, S, D], prompt_len [B] -> [B, K] float32.

    For heads fitted on cached features (experiments/: the decoder is frozen and never rerun);
    a forward reads it with `forward(sentiment_at=prompt_len)`. Same module (`modules.SentimentHead`).
    """
    d, k = head["kernel"].shape
    return modules.SentimentHead(d, k).apply({"lora": head}, hidden, prompt_len)
