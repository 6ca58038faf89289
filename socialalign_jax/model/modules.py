"""The Qwen2/Llama decoder and PAC-LoRA as Flax Linen modules, applied functionally.

This is where every parameter is declared, once: its shape, dtype, initializer and logical
axes (`nn.with_logical_partitioning`). `model/decoder.py` keeps the functional entry points
(`init_params`, `forward`, ...) as thin wrappers over `init` / `apply` of the whole `Decoder`,
so the trainer, generation, scoring, export and planning see plain nested-dict trees.

Variable collections:
  params  frozen base weights. Layers are stacked on a leading axis by `nn.scan` (logical
          axis 'layers'), so the tree is
          {embed: {embedding [V, D]},
           layers: {input_norm: {scale [L, D]}, post_attn_norm: {scale [L, D]},
                    attn: {q|k|v: {kernel [L, D, Hq*Dh|Hkv*Dh], bias (qwen2) [L, ...]}, o: {kernel [L, Hq*Dh, D]}},
                    mlp: {gate|up: {kernel [L, D, F]}, down: {kernel [L, F, D]}}},
           final_norm: {scale [D]}, lm_head (untied only): {kernel [D, V]}}
  lora    the trainable tree: PAC-LoRA experts and gates of every target, stacked on L,
          {layers: {attn|mlp: {name: {A [L, Ea, d_in, r], B [L, Eb, r, d_out],
                                      gate_a: {w1 [L, d_in, G], w2 [L, G, Ea]}, gate_b: {...}}}},
           head: {kernel [D, K], bias [K]}}   (float32)

The maths of each piece is the one implementation in `layers` (norm, RoPE, attention) and
`pac_lora` (routing, expert mixing, the fused CPU matmul with its custom VJP); the modules
only declare parameters and wire them. An adapted linear map is adapted exactly when its
`lora` variables are present, so one module serves the base model and every target set.
  intermediates  what the model reports without returning it: each adapted map sows its gate
          statistics (per-segment sums, `pac_lora.gate_stats`) under its own path as
          `GATE_STATS`, stacked on L by the scan (flax gemma's sow pattern); applied with
          mutable=['intermediates'] only where they are read (train and eval steps, prefill).
  cache   the KV cache of incremental decoding (`KVCache`): k, v [L, B, Hkv, T, Dh] (heads
          before slots: `layers.cached_attention`) with the absolute position of every slot,
          the write index, each row's next position and prompt spans; a branched cache
          (`decoder.branch_cache`) also holds its prompts' slots once, as a shared block; with
          pooled routing each adapted map also keeps the prefill's gate weights as its own
          `cache` variables (pooled_a, pooled_b; stacked on L by the scan). Declared with their
          logical axes like any parameter; `Decoder.__call__(use_cache=True)` reads it, runs
          the layers with the k/v in the layers' carry (each layer writes its chunk in place;
          stacked for the scan, per layer for the unrolled loop: `decoder.unstack_cache`), and
          writes it back, so `apply(..., mutable=['cache'])` returns the update.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from socialalign_jax.model import backend, layers, pac_lora
from socialalign_jax.model.config import ModelConfig, as_dtype
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.parallel import sharding

# Logical axes of the activations at layer boundaries: names of their own (parallel/axis_rules.py),
# so no weight rule decides an activation's layout. Inside a step traced by `sharding.under_mesh`
# each becomes a sharding constraint (Flax's `nn.with_logical_constraint`, with the divisibility
# fallback); outside it they are no-ops.
_B, _S = "activation_batch", "activation_length"
ACT = (_B, _S, "activation_embed")  # residual stream [B, S, D]
ACT_HEADS = (_B, _S, "activation_heads", None)  # q, attention output [B, S, H, Dh]
ACT_KV = (_B, _S, "activation_kv_heads", None)  # k, v [B, S, Hkv, Dh]
ACT_KV_CACHED = (_B, "activation_kv_heads", _S, None)  # a layer's slice of the cache [B, Hkv, T, Dh]
ACT_MLP = (_B, _S, "activation_mlp")  # gate, up [B, S, F]
ACT_VOCAB = (_B, _S, "activation_vocab")  # logits [B, S, V]
# The KV cache's k, v [L, B, Hkv, T, Dh], heads before slots (`layers.cached_attention` reads a
# layer's slice as it lies): rows and slots are data ('batch', 'length', like the cache's other
# per-row entries); the heads follow their own rule, which defaults to the k/v activations'
# layout, so a layer's slice needs no resharding.
CACHE_KV = ("layers", "batch", "cache_kv_heads", "length", None)
constrain = sharding.logical_constraint

REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}

# The name under which each adapted linear map sows its gate-statistic sums into `intermediates`.
GATE_STATS = "gate_stats"

# Logical (d_in, d_out) of each adaptable linear map.
_LINEAR_IO = {"q": ("embed", "heads"), "k": ("embed", "kv_heads"), "v": ("embed", "kv_heads"),
              "o": ("heads", "embed"), "gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed")}
# name -> (block, logical d_in, logical d_out, index of its dropout key: its place in ALL_TARGETS)
LINEARS = {name: (pac_lora.MODULE_BLOCK[name], *_LINEAR_IO[name], i) for i, name in enumerate(pac_lora.ALL_TARGETS)}


class ModelOutput(NamedTuple):
    """What `Decoder.__call__` returns (cache and gate_stats are filled in by `decoder.forward`
    from the `cache` and `intermediates` collections the apply returns)."""
    logits: Any  # float32 [B, S, V] (logits_at='all'), [B, 1, V] ('last'), [B, R, V] (positions) or None
    hidden: Any  # [B, S, D] after the final norm (what the LM head and sentiment head read)
    sentiment: Any = None  # [B, K] float32 sentiment logits at sentiment_at - 1, or None
    cache: Any = None  # updated cache (decoder.forward), or None
    gate_stats: Any = None  # {module: {'a': [L, 3, Ea], 'b': ..., 'a_entropy': [L, 3], ..., 'count': [L, 3]}} sums


# ----------------------------------------------------------------------------- initializers

def _normal002(key, shape, dtype=jnp.float32):
    """Base weights: normal, std 0.02, drawn in float32 then cast (tests and demos only)."""
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _ones(key, shape, dtype=jnp.float32):
    del key
    return jnp.ones(shape, dtype)


def _zeros(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype)


def _uniform(bound: float):
    """U(+-bound) in float32: PyTorch's kaiming_uniform(a=sqrt(5)) with bound 1/sqrt(fan_in)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
    return init


def _param(mod: nn.Module, name: str, init, shape, dtype, axes):
    """A `params` variable with its logical axes (stored unboxed; the boxes carry the axes at init)."""
    return mod.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _lora_var(mod: nn.Module, name: str, init, shape, axes):
    """A float32 `lora` variable with its logical axes; the 'params' rng is drawn only when it is created."""
    boxed = nn.with_logical_partitioning(init, axes)
    return mod.variable("lora", name, lambda: boxed(mod.make_rng("params"), shape, jnp.float32)).value


def _cache_var(mod: nn.Module, name: str, make, axes):
    """A `cache` variable with its logical axes; `make()` builds the empty value (only when declared)."""
    return mod.variable("cache", name, lambda: nn.LogicallyPartitioned(make(), axes))


# ----------------------------------------------------------------------------- base modules


# LM head: up to this many rows (batch x tokens) the logits are formed vocab-major (Embed.attend for the
# tied head; LMHead in the decode loop's form, whose untied kernel is stored [V, D] like the table).
ATTEND_ROWS_VOCAB_MAJOR = 32


class Embed(nn.Module):
    """Token embedding [V, D]; also the tied LM head."""
    vocab: int
    dim: int
    param_dtype: Any

    def setup(self):
        self.embedding = _param(self, "embedding", _normal002, (self.vocab, self.dim), self.param_dtype,
                                ("vocab", "embed"))

    def __call__(self, ids, dtype):
        return self.embedding[ids].astype(dtype)  # [B, S] -> [B, S, D]

    def attend(self, hidden):
        """hidden [B, S, D] -> logits [B, S, V] float32 (the embedding's transpose).

        For a few rows (a decode step, a prefill's last tokens: B*S <= ATTEND_ROWS_VOCAB_MAJOR) the
        product is formed vocab-major (`layers.weight_major_dot`): XLA:CPU's GEMM with
        the [V, D] table as the right-hand operand ran 1.5-1.9x slower at 8 rows, which made the tied
        head most of a decode step (Qwen2.5-0.5B's 151,936 x 896 table at 8 rows: 42 -> 27 ms;
        SmolLM2's 49,152 x 576: 12.5 -> 6.7 ms; at 64 rows and more the plain form is faster).
        """
        b, s, _ = hidden.shape
        emb = self.embedding.astype(hidden.dtype)
        if b * s <= ATTEND_ROWS_VOCAB_MAJOR:
            return layers.weight_major_dot(hidden, emb, preferred_element_type=jnp.float32)
        return jnp.einsum("bsd,vd->bsv", hidden, emb, preferred_element_type=jnp.float32)


class RMSNorm(nn.Module):
    dim: int
    eps: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", _ones, (self.dim,), self.param_dtype, ("norm",))
        return layers.rms_norm(x, scale, self.eps)


class LMHead(nn.Module):
    """Untied LM head kernel [D, V] (stored [V, D] as 'kernel_t' in the decode loop's form, which makes
    its product for a decode step weight-major, as the tied head's is: `pac_lora.base_matmul`)."""
    dim: int
    vocab: int
    param_dtype: Any

    @nn.compact
    def __call__(self, hidden):
        if self.has_variable("params", "kernel_t"):  # the decode loop's form, [V, D] (`decoder.decode_form`)
            base = {"kernel_t": self.get_variable("params", "kernel_t")}
        else:
            base = {"kernel": _param(self, "kernel", _normal002, (self.dim, self.vocab), self.param_dtype,
                                     ("embed", "vocab"))}
        return pac_lora.base_matmul(hidden, base, preferred_element_type=jnp.float32,
                                    weight_major_rows=ATTEND_ROWS_VOCAB_MAJOR)


def _adapter_axis(base_axis: str) -> str:
    """The logical name of an adapter dimension that matches a base kernel's `base_axis`: the
    same name on the model width (embed), `lora_width` where the base is tensor-parallel (heads,
    kv_heads, mlp), so the rules can also split the adapters over fsdp without moving the base
    kernels (parallel/axis_rules.py)."""
    return base_axis if base_axis == "embed" else "lora_width"


class Gate(nn.Module):
    """A span gate's two bias-free Dense layers (lora collection): w1 [d_in, G], w2 [G, E]."""
    d_in: int
    width: int
    experts: int
    in_axis: str

    @nn.compact
    def __call__(self):
        return {"w1": _lora_var(self, "w1", _uniform(1.0 / math.sqrt(self.d_in)), (self.d_in, self.width),
                                (self.in_axis, "gate")),
                "w2": _lora_var(self, "w2", _uniform(1.0 / math.sqrt(self.width)), (self.width, self.experts),
                                ("gate", "experts"))}


class AdaptedLinear(nn.Module):
    """x W0 (+ b) + the PAC-LoRA delta (`pac_lora.adapted_linear`).

    The frozen kernel/bias live in `params`; A, B and the two gates in `lora`. They are created
    at init when `lc` lists this map as a target, and used at apply time when present.
    """
    d_in: int
    d_out: int
    in_axis: str
    out_axis: str
    use_bias: bool
    param_dtype: Any
    lc: LoraConfig | None = None
    target: bool = False
    out32: bool = False  # ModelConfig.matmul_out resolved: half-precision products returned in float32

    @nn.compact
    def __call__(self, x, route, rng=None):
        if self.has_variable("params", "kernel_t"):  # the decode loop's form, [d_out, d_in] (`decoder.decode_form`)
            base = {"kernel_t": self.get_variable("params", "kernel_t")}
        else:
            base = {"kernel": _param(self, "kernel", _normal002, (self.d_in, self.d_out), self.param_dtype,
                                     (self.in_axis, self.out_axis))}
        if self.use_bias:
            base["bias"] = _param(self, "bias", _normal002, (self.d_out,), self.param_dtype, (self.out_axis,))
        adapter = None
        lc = self.lc
        if lc is not None and (self.has_variable("lora", "A") or (self.is_initializing() and self.target)):
            ea, eb, r, g = lc.num_analyze, lc.num_compose, lc.rank, lc.gate_width
            a_in, a_out = _adapter_axis(self.in_axis), _adapter_axis(self.out_axis)
            adapter = {
                "A": _lora_var(self, "A", _uniform(1.0 / math.sqrt(self.d_in)), (ea, self.d_in, r),
                               ("experts", a_in, "rank")),
                "B": _lora_var(self, "B", _zeros, (eb, r, self.d_out), ("experts", "rank", a_out)),
                "gate_a": Gate(self.d_in, g, ea, a_in, name="gate_a")(),
                "gate_b": Gate(self.d_in, g, eb, a_in, name="gate_b")(),
            }
            if self.has_variable("lora", "proj"):  # made once before a decode loop (`pac_lora.with_projections`)
                adapter["proj"] = self.get_variable("lora", "proj")
        stored = None
        if adapter is not None and lc.routing == "pooled" and route.get("cached", False):
            stored = self._stored_gates(x.shape[0])
        y, stats, new_pooled = pac_lora.adapted_linear(
            x, base, adapter, lc if adapter is not None else None, route, rng,
            None if stored is None else {k: v.value for k, v in stored.items()}, out32=self.out32)
        if stored is not None and not self.is_initializing():
            for k, v in stored.items():  # prefill stores its span summaries; later chunks keep them
                v.value = new_pooled[k]
        if stats is not None:
            # Per-segment sums (pac_lora.gate_stats); a no-op unless `intermediates` is mutable, so a
            # decode step that does not ask for them computes none. Stacked [L, ...] by the scan.
            self.sow("intermediates", GATE_STATS, stats)
        return y

    def _stored_gates(self, batch: int) -> dict:
        """Pooled routing's per-sequence gate weights in the `cache` collection: {'a': pooled_a [B, Ea],
        'b': pooled_b [B, Eb]} (uniform until a prefill writes them; stacked on L by the scan).

        Declared when the cache is made (`Decoder.make_cache`); a cached apply without them would
        silently route every decoded token uniformly, so it is refused instead.
        """
        lc = self.lc
        if not self.is_initializing() and not self.has_variable("cache", "pooled_a"):
            raise ValueError("pooled routing with a KV cache needs init_cache(cfg, batch, max_len, lora_cfg)")
        return {"a": _cache_var(self, "pooled_a", lambda: jnp.full((batch, lc.num_analyze), 1.0 / lc.num_analyze),
                                ("batch", None)),
                "b": _cache_var(self, "pooled_b", lambda: jnp.full((batch, lc.num_compose), 1.0 / lc.num_compose),
                                ("batch", None))}


class _Adapted(nn.Module):
    """Shared wiring of the blocks that own adaptable linear maps (Attention, Mlp)."""
    cfg: ModelConfig
    lc: LoraConfig | None = None

    def lin(self, h, name, route, rng):
        """Apply the linear map `name` (created here, in the caller's compact scope)."""
        cfg = self.cfg
        block, ax_in, ax_out, mod_idx = LINEARS[name]
        d_in, d_out = cfg.module_dims()[(block, name)]
        targets = self.lc.targets if self.lc is not None else ()
        mod = AdaptedLinear(d_in, d_out, ax_in, ax_out, cfg.qkv_bias and name in ("q", "k", "v"),
                            as_dtype(cfg.param_dtype), self.lc, name in targets, backend.matmul_out32(cfg), name=name)
        return mod(h, route, None if rng is None else jax.random.fold_in(rng, mod_idx))


def init_linear_adapter(key, num_layers: int, d_in: int, d_out: int, lc: LoraConfig) -> dict:
    """The `lora` variables of one adapted linear map, stacked over `num_layers` independent inits."""
    mod = AdaptedLinear(d_in, d_out, "embed", "embed", False, jnp.float32, lc, True)
    route = {"seg": jnp.zeros((1, 1), jnp.int32), "valid": jnp.ones((1, 1), bool), "deterministic": True}

    def one(k):
        return nn.unbox(mod.init({"params": k}, jnp.zeros((1, 1, d_in), jnp.float32), route)["lora"])

    init = jax.jit(jax.vmap(one))  # XLA drops the unused base kernel

    out = init(jax.random.split(key, num_layers))
    return {"A": out["A"], "B": out["B"], "gate_a": dict(out["gate_a"]), "gate_b": dict(out["gate_b"])}


def attend(cfg: ModelConfig, q, k, v, q_pos, k_pos):
    """`layers.attention` with the implementation cfg.attention names.

    The configs are resolved on the host for the devices a step is built for
    (`backend.resolve_for_platform`); an 'auto' that reaches here unresolved takes the choice for
    the default devices. Nothing is caught: a 'cudnn' that cuDNN refuses fails with its message.
    """
    return layers.attention(q, k, v, q_pos, k_pos, impl=backend.attention_impl(cfg))


class Attention(_Adapted):
    """Grouped-query attention with RoPE over absolute positions; q/k/v/o adaptable (q/k/v biased in Qwen2).

    kv: None, or the stacked cache (k, v) [L, B, Hkv, T, Dh] into which layer i writes this
    chunk at slot ctx['index'] before attending over all of its slots, and over layer i of the
    cache's shared block when it has one (ctx['shared_k'], ctx['shared_v'], ctx['shared_pos']:
    a branched cache, `decoder.branch_cache`).
    Returns (out [B, S, D], kv).
    """

    @nn.compact
    def __call__(self, h, route, rng, kv, i, ctx):
        cfg = self.cfg
        lin = lambda t, name: self.lin(t, name, route, rng)  # noqa: E731
        q = constrain(rearrange(lin(h, "q"), "b s (h d) -> b s h d", d=cfg.head_dim), ACT_HEADS)
        k = constrain(rearrange(lin(h, "k"), "b s (h d) -> b s h d", d=cfg.head_dim), ACT_KV)
        v = constrain(rearrange(lin(h, "v"), "b s (h d) -> b s h d", d=cfg.head_dim), ACT_KV)
        q = layers.apply_rope(q, ctx["cos"], ctx["sin"])
        k = layers.apply_rope(k, ctx["cos"], ctx["sin"])
        if kv is not None:
            index = ctx["index"]

            # The cache's k/v are stacked [L, B, Hkv, T, Dh], or (unrolled layers, i a Python int) a
            # tuple of L per-layer buffers (`decoder.unstack_cache`): written in place and read as
            # they lie, where a slice of the stack is a copy of the layer's whole cache per step.
            def write(stack, x):  # chunk [B, S, Hkv, Dh] into layer i's slots index..
                x = rearrange(x, "b s h d -> b h s d")
                if isinstance(stack, tuple):
                    new = jax.lax.dynamic_update_slice(stack[i], x.astype(stack[i].dtype), (0, 0, index, 0))
                    return stack[:i] + (new,) + stack[i + 1:]
                return jax.lax.dynamic_update_slice(stack, x.astype(stack.dtype)[None], (i, 0, 0, index, 0))

            def layer(stack):  # layer i's [B, Hkv, T, Dh], in the compute dtype
                x = stack[i] if isinstance(stack, tuple) else jax.lax.dynamic_index_in_dim(stack, i, 0, keepdims=False)
                return constrain(x, ACT_KV_CACHED).astype(q.dtype)

            kv = (write(kv[0], k), write(kv[1], v))
            shared = None
            if "shared_k" in ctx:
                shared = (layer(ctx["shared_k"]), layer(ctx["shared_v"]), ctx["shared_pos"])
            attn = layers.cached_attention(q, layer(kv[0]), layer(kv[1]), ctx["q_pos"], ctx["k_pos"], shared,
                                           impl=backend.attention_impl(cfg))
        else:
            attn = attend(cfg, q, k, v, ctx["q_pos"], ctx["k_pos"])
        attn = constrain(attn, ACT_HEADS)
        out = lin(rearrange(attn, "b s h d -> b s (h d)"), "o")
        return out, kv


class Mlp(_Adapted):
    """SwiGLU: down(silu(gate(h)) * up(h)), each map adaptable. Returns out [B, S, D]."""

    @nn.compact
    def __call__(self, h, route, rng):
        lin = lambda t, name: self.lin(t, name, route, rng)  # noqa: E731
        gate = constrain(lin(h, "gate"), ACT_MLP)
        up = constrain(lin(h, "up"), ACT_MLP)
        return lin(jax.nn.silu(gate) * up, "down")


class Block(nn.Module):
    """One pre-norm decoder layer: attention, then the MLP, each with a residual.

    Called as a scan body: carry = (x [B, S, D], kv), xs = (rng, layer index i), ctx = the
    per-call arrays every layer reads (routing, RoPE tables, positions, cache slot).
    Returns ((x, kv), None). What else a layer reports or keeps lives in Flax collections: gate
    statistics sown into `intermediates`, pooled routing's stored gate weights in `cache`.
    """
    cfg: ModelConfig
    lc: LoraConfig | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, carry, xs, ctx):
        cfg = self.cfg
        pdt = as_dtype(cfg.param_dtype)
        x, kv = carry
        rng, i = xs
        route = {"seg": ctx["seg"], "valid": ctx["valid"], "deterministic": self.deterministic,
                 "cached": kv is not None}
        if "use_stored" in ctx:
            route["use_stored"] = ctx["use_stored"]
        x = constrain(x, ACT)
        h = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt, name="input_norm")(x)
        a, kv = Attention(cfg, self.lc, name="attn")(h, route, rng, kv, i, ctx)
        x = constrain(x + a, ACT)
        h = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt, name="post_attn_norm")(x)
        m = Mlp(cfg, self.lc, name="mlp")(h, route, rng)
        x = constrain(x + m, ACT)
        return (x, kv), None


class UnrolledLayers(nn.Module):
    """The layers as a Python loop over per-layer variables {'0': ..., '1': ...} (`decoder.unstack_layers`).

    XLA:CPU copies each layer's weights out of the stacked arrays whenever a scan slices them;
    for a one-token decode step that copy costs more than the matmul it feeds. Same maths as
    the scan, layer by layer; the KV cache stays stacked and is updated in place. Per-layer
    `cache` and `intermediates` variables are under '0', '1', ... (`decoder.forward` converts).
    """
    cfg: ModelConfig
    lc: LoraConfig | None = None
    deterministic: bool = True
    remat: bool = False

    @nn.compact
    def __call__(self, carry, rngs, ctx):
        block = Block
        if self.remat:
            block = nn.remat(Block, policy=REMAT_POLICIES[self.cfg.remat_policy])
        for i in range(self.cfg.num_layers):
            carry, _ = block(self.cfg, self.lc, self.deterministic, name=str(i))(
                carry, (None if rngs is None else rngs[i], i), ctx)
        return carry, None


def scanned_layers(cfg: ModelConfig, lc: LoraConfig | None, deterministic: bool, name: str = "layers"):
    """Block under nn.remat (when cfg.remat) and nn.scan: params and lora stacked on axis 0 ('layers')."""
    block = Block
    if cfg.remat:
        block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy])
    return nn.scan(block, variable_axes={"params": 0, "lora": 0, "intermediates": 0, "cache": 0},
                   split_rngs={"params": True},
                   in_axes=(0, nn.broadcast), length=cfg.num_layers,
                   metadata_params={nn.PARTITION_NAME: "layers"})(cfg, lc, deterministic, name=name)


class SentimentHead(nn.Module):
    """The sentiment head (lora collection): Dense(D -> K) at the last prompt token, float32."""
    dim: int
    num_classes: int

    @nn.compact
    def __call__(self, hidden, prompt_len):
        """hidden [B, S, D], prompt_len [B] -> [B, K] float32."""
        kernel = _lora_var(self, "kernel", _uniform(1.0 / math.sqrt(self.dim)), (self.dim, self.num_classes),
                           ("embed", "classes"))
        bias = _lora_var(self, "bias", _zeros, (self.num_classes,), ("classes",))
        idx = jnp.clip(prompt_len - 1, 0, hidden.shape[1] - 1)
        h = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        return h @ kernel.astype(jnp.float32) + bias.astype(jnp.float32)


class KVCache(nn.Module):
    """The `cache` collection: every variable of incremental decoding, declared once.

    key_pos holds the absolute position of each filled slot (-1 = empty or padding), so attention
    and routing never depend on slot order or on how the tokens were chunked. batch, max_len and
    dtype matter only when the cache is created (`decoder.init_cache`); afterwards the shapes are
    those of the cache passed in. Returns {name: nn.Variable}. (Pooled routing's stored gate
    weights are the adapted maps' own `cache` variables: `AdaptedLinear._stored_gates`.)
    """
    cfg: ModelConfig

    @nn.compact
    def __call__(self, batch: int = 0, max_len: int = 0, dtype=None, shared: tuple[int, int] = (0, 0)):
        cfg = self.cfg
        dt = as_dtype(dtype or cfg.dtype)

        def zeros_kv(rows, slots):
            return lambda: constrain(jnp.zeros((cfg.num_layers, rows, cfg.num_kv_heads, slots, cfg.head_dim), dt),
                                     CACHE_KV)

        per_row = lambda: jnp.zeros((batch,), jnp.int32)  # noqa: E731
        out = {}
        # A branched cache (`decoder.branch_cache`): B prompts' filled slots, read by each of their
        # N // B rows (shared[0] = B prompts, shared[1] = Ts slots), beside the rows' own slots.
        if shared[1] or self.has_variable("cache", "shared_k"):
            out["shared_k"] = _cache_var(self, "shared_k", zeros_kv(*shared), CACHE_KV)
            out["shared_v"] = _cache_var(self, "shared_v", zeros_kv(*shared), CACHE_KV)
            out["shared_pos"] = _cache_var(self, "shared_pos", lambda: jnp.full(shared, -1, jnp.int32),
                                           ("batch", None))
        out |= {
            "k": _cache_var(self, "k", zeros_kv(batch, max_len), CACHE_KV),
            "v": _cache_var(self, "v", zeros_kv(batch, max_len), CACHE_KV),
            "key_pos": _cache_var(self, "key_pos", lambda: jnp.full((batch, max_len), -1, jnp.int32),
                                  ("batch", None)),
            "index": _cache_var(self, "index", lambda: jnp.zeros((), jnp.int32), ()),
            "next_pos": _cache_var(self, "next_pos", per_row, ("batch",)),
            "user_end": _cache_var(self, "user_end", per_row, ("batch",)),
            "news_end": _cache_var(self, "news_end", per_row, ("batch",)),
        }
        return out


def _positions(attention_mask, start):
    """Absolute positions from a padding mask: real tokens count up from `start` [B] (left or right padding)."""
    return start[:, None] + jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)


class Decoder(nn.Module):
    """The decoder: embed -> layers -> final norm -> LM head (tied or not), plus the sentiment head.

    lc: the adapter configuration, or None for the base model. unrolled: run the layers as a
    Python loop over per-layer variables (see UnrolledLayers) instead of nn.scan.
    """
    cfg: ModelConfig
    lc: LoraConfig | None = None
    deterministic: bool = True
    unrolled: bool = False
    remat_unrolled: bool = False

    def setup(self):
        cfg = self.cfg
        pdt = as_dtype(cfg.param_dtype)
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, pdt)
        if self.unrolled:
            self.layers = UnrolledLayers(cfg, self.lc, self.deterministic, self.remat_unrolled)
        else:
            self.layers = scanned_layers(cfg, self.lc, self.deterministic)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        if not cfg.tie_embeddings:
            self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, pdt)
        if self.lc is not None and self.lc.num_classes > 0:
            self.head = SentimentHead(cfg.hidden_size, self.lc.num_classes)
        self.kv = KVCache(cfg)

    def make_cache(self, batch: int, max_len: int, dtype=None, shared: tuple[int, int] = (0, 0)):
        """Declare the `cache` collection for `batch` rows of `max_len` slots (init only), and a
        shared block of shared[0] prompts x shared[1] slots when shared[1] > 0 (`decoder.branch_cache`).

        With pooled routing the adapted maps declare their stored gate weights themselves, where
        they are used: the model runs once over one token per row (an init: nothing is written;
        `decoder.init_cache` jits it, so only the cache's values are computed).
        """
        self.kv(batch, max_len, dtype, tuple(shared))
        if self.lc is not None and self.lc.routing == "pooled" and self.lc.targets:
            self(jnp.zeros((batch, 1), jnp.int32), use_cache=True, logits_at=None)

    def logits(self, hidden):
        """hidden [B, S, D] -> logits [B, S, V] float32."""
        out = self.embed.attend(hidden) if self.cfg.tie_embeddings else self.lm_head(hidden)
        return constrain(out, ACT_VOCAB)

    def sentiment(self, hidden, prompt_len):
        """hidden [B, S, D], prompt_len [B] -> sentiment logits [B, K] float32 at token prompt_len - 1."""
        return self.head(hidden, prompt_len)

    def init_all(self, input_ids):
        """Touch every declared variable (init only): a forward with the LM head and the sentiment head."""
        head = self.lc is not None and self.lc.num_classes > 0
        out = self(input_ids, sentiment_at=jnp.ones((input_ids.shape[0],), jnp.int32) if head else None)
        return out.logits

    def __call__(self, input_ids, attention_mask=None, positions=None, spans=None, use_cache=False, rng=None,
                 logits_at="all", sentiment_at=None):
        """The whole model on input_ids [B, S]: hidden states, the logits asked for, the sentiment head.

        See `decoder.forward` for the arguments. logits_at: 'all' ([B, S, V]), 'last' (the last
        column, [B, 1, V]: a left-padded prompt's next token, a decode step), positions [B, R]
        int (logits there only, [B, R, V]: the trainer's response positions; a 152k vocabulary
        makes [B, S, V] the largest array of a step), or None (hidden states only).
        sentiment_at: None, or prompt_len [B]: the sentiment head's logits [B, K] at token
        prompt_len - 1 (needs an adapter config with num_classes > 0).
        use_cache: read the `cache` collection (declared by `make_cache`), write this chunk into
        it and update it; apply with mutable=['cache'] to get it back. Gate statistics are sown
        into `intermediates` (apply with mutable=['intermediates'] to get them).
        """
        cfg, lc = self.cfg, self.lc
        cache_vars = cache = None
        if use_cache:
            cache_vars = self.kv()
            cache = _values(cache_vars)
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

        x = constrain(self.embed(input_ids, dt), ACT)
        cos, sin = layers.rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        new_pos = jnp.where(valid, positions, -1)
        ctx = {"seg": pac_lora.segment_ids(positions, user_end, news_end, valid), "valid": valid,
               "cos": cos, "sin": sin, "q_pos": positions}
        if cache is not None:
            index = cache["index"]
            ctx["k_pos"] = jax.lax.dynamic_update_slice(cache["key_pos"], new_pos, (0, index))
            ctx["index"] = index
            kv = (cache["k"], cache["v"])
            if "shared_k" in cache:  # a branched cache: every layer also reads its block of shared slots
                ctx.update(shared_k=cache["shared_k"], shared_v=cache["shared_v"], shared_pos=cache["shared_pos"])
        else:
            index = None
            ctx["k_pos"] = new_pos
            kv = None

        if lc is not None and lc.routing == "pooled" and lc.targets and cache is not None:
            # Prefill (slot index 0) computes the span summaries; later chunks reuse what prefill stored
            # (so does every chunk into a branched cache: its prompt was prefilled before it branched).
            ctx["use_stored"] = (index > 0) | ("shared_k" in cache)
        layer_rngs = None
        if lc is not None and not self.deterministic and lc.dropout > 0.0:
            if rng is None:
                raise ValueError("forward(deterministic=False) with adapter dropout needs an rng")
            layer_rngs = jax.random.split(rng, cfg.num_layers)

        if self.unrolled:
            (x, kv_out), _ = self.layers((x, kv), layer_rngs, ctx)
        else:
            # The stacked KV cache rides in the scan's carry and each layer writes its chunk in place:
            # as a scanned input and output it would be copied twice per decode step.
            (x, kv_out), _ = self.layers((x, kv), (layer_rngs, jnp.arange(cfg.num_layers, dtype=jnp.int32)), ctx)

        hidden = constrain(self.final_norm(x), ACT)
        if logits_at is None:
            logits = None
        elif isinstance(logits_at, str):
            if logits_at not in ("all", "last"):
                raise ValueError(f"logits_at must be 'all', 'last', None or positions [B, R], got {logits_at!r}")
            logits = self.logits(hidden if logits_at == "all" else hidden[:, -1:])
        else:
            idx = jnp.asarray(logits_at, jnp.int32)  # [B, R]
            logits = self.logits(jnp.take_along_axis(hidden, idx[..., None], axis=1))  # [B, R, V]
        sentiment = None
        if sentiment_at is not None:
            if lc is None or lc.num_classes <= 0:
                raise ValueError("sentiment_at needs an adapter config with num_classes > 0 (the sentiment head)")
            sentiment = self.sentiment(hidden, jnp.asarray(sentiment_at, jnp.int32))

        if cache is not None and not self.is_initializing():  # make_cache's pass writes nothing
            _assign(cache_vars, dict(k=kv_out[0], v=kv_out[1], key_pos=ctx["k_pos"], index=index + s,
                                     next_pos=jnp.maximum(start, jnp.max(jnp.where(valid, positions + 1, 0), axis=1)),
                                     user_end=user_end, news_end=news_end))
        return ModelOutput(logits, hidden, sentiment)


def _is_var(x) -> bool:
    return isinstance(x, nn.Variable)


def _values(variables):
    """{name: nn.Variable} (nested) -> {name: value}."""
    return jax.tree.map(lambda v: v.value, variables, is_leaf=_is_var)


def _assign(variables, values) -> None:
    """Write `values` into the matching nested {name: nn.Variable}."""
    for name, value in values.items():
        target = variables[name]
        if _is_var(target):
            target.value = value
        else:
            _assign(target, value)
