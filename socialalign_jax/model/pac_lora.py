"""PAC-LoRA: analyze/compose LoRA experts mixed by two span gates (SPEC section 2).

delta(x) = s * sum_j gB_j ((sum_i gA_i (x' A_i)) B_j), computed so that no [batch, seq, E,
d_out] tensor exists in forward or backward, and so that x' is read by ONE skinny matmul:

    p = x' @ [A_cat | Wa1 | Wb1]  [B, S, Ea*r + 2G]  (experts and both gates' first layers)
    z, pre_a, pre_b = split(p)    gate pre-activations masked to their span afterwards, which
                                  equals masking x' first because the gates have no bias
    h = sum_i gA_i z_i            [B, S, r]
    u = s * (gB outer h)          [B, S, Eb*r]   (the scale lives on this small tensor)
    y = x W0 + u @ B_cat          [B, S, d_out]  (on the CPU: ONE matmul [x | u] @ [W0; B_cat])

Gate weights depend on segment ids derived from absolute positions, so a KV-cached decode
routes every token exactly as the full forward does (the original code does not).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from einops import rearrange

from socialalign_jax.model import backend, layers

USER, NEWS, OTHER = 0, 1, 2
SEGMENTS = ("user", "news", "other")
ROUTING_MODES = ("token", "pooled", "uniform_a", "uniform_b", "uniform")
MODULE_BLOCK = {"q": "attn", "k": "attn", "v": "attn", "o": "attn",
                "gate": "mlp", "up": "mlp", "down": "mlp"}
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Trainable-tree configuration: PAC-LoRA experts on `targets` plus the sentiment head.

    num_analyze = num_compose = 1 is plain LoRA; targets=() leaves the base model untouched
    (only the head, if num_classes > 0, is trainable). Also a run's `lora` config section
    (runs/run_config.py), so these defaults are the run's: the paper's 3x3 experts, r 8, alpha 16.
    """
    num_analyze: int = 3
    num_compose: int = 3
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.1
    gate_width: int = 32
    targets: tuple[str, ...] = ALL_TARGETS  # on the command line comma-separated; '' trains only the sentiment head
    routing: str = "token"  # token | pooled | uniform_a | uniform_b | uniform
    num_classes: int = 3
    # [x | u] @ [W0; B] as one matmul: 'auto' ('by_size' on CPUs, else 'never') | 'by_size' (where the
    # [B, S, d_out] delta it saves outweighs copying the weight) | 'always' | 'never' (docs/pac_lora.md)
    fuse_base: str = "auto"

    def __post_init__(self):
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"unknown routing mode {self.routing!r}; expected one of {ROUTING_MODES}")
        bad = [t for t in self.targets if t not in MODULE_BLOCK]
        if bad:
            raise ValueError(f"unknown adapter targets {bad}; known: {ALL_TARGETS}")
        if self.fuse_base not in ("auto", "by_size", "always", "never"):
            raise ValueError(f"fuse_base must be 'auto', 'by_size', 'always' or 'never', got {self.fuse_base!r}")
        if min(self.num_analyze, self.num_compose, self.rank) < 1:
            raise ValueError("num_analyze, num_compose and rank must be >= 1")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def gated_a(self) -> bool:
        return self.routing in ("token", "pooled", "uniform_b")

    @property
    def gated_b(self) -> bool:
        return self.routing in ("token", "pooled", "uniform_a")

    @property
    def causal_routing(self) -> bool:
        """Whether a token's gate weights depend on nothing after it: every mode but `pooled`, whose
        gates give every token (the user span's too) the news span's mean. A prompt prefix can be
        computed once for prompts that continue it differently only when routing is causal."""
        return self.routing != "pooled" or not self.targets


def gate_probs_from_pre(pre, gate) -> jax.Array:
    """The gate after its first Dense: exact GELU -> Dense(G->E, no bias) -> float32 softmax.  pre [..., G]."""
    hdn = jax.nn.gelu(pre, approximate=False)
    logits = jnp.einsum("...g,ge->...e", hdn, gate["w2"].astype(pre.dtype))
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def segment_ids(positions, user_end, news_end, valid):
    """positions [B, S] absolute; user_end, news_end [B] -> segment ids [B, S] (padding is OTHER)."""
    seg = jnp.where(positions < user_end[:, None], USER,
                    jnp.where(positions < news_end[:, None], NEWS, OTHER))
    return jnp.where(valid, seg, OTHER).astype(jnp.int32)


def span_mean(x, seg, segment: int):
    """Mean of x [B, S, F] over the tokens of one segment of each sequence -> [B, F] (0 for an empty span)."""
    m = (seg == segment).astype(x.dtype)[..., None]
    return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)


def routing_weights(xd, seg, adapter, lc: LoraConfig, pooled_state=None, use_stored=False, pre=None):
    """Gate weights gA [B, S, Ea], gB [B, S, Eb] (float32) for one module.

    pre: the gates' first-layer outputs (xd @ gate_a.w1, xd @ gate_b.w1), [B, S, G] each, when
    the caller has them from its fused matmul; otherwise they are computed here from xd. Token
    gates see only their span: pre-activations outside it are zeroed, which equals zeroing xd
    there (no bias). Pooled gates read the span mean of the pre-activations, which equals the
    first layer applied to the span mean of xd (linearity).

    pooled_state: in `pooled` decoding, the per-sequence weights stored at prefill
    ({'a': [B, Ea], 'b': [B, Eb]}), used instead of this chunk's span means where `use_stored`
    (a traced bool: false at prefill, true for later chunks). Also returns the pooled weights
    to carry in the cache (pooled mode) or None.
    """
    b, s = seg.shape
    ea, eb = lc.num_analyze, lc.num_compose
    if pre is None:
        pre = (jnp.einsum("bsd,dg->bsg", xd, adapter["gate_a"]["w1"].astype(xd.dtype)) if lc.gated_a else None,
               jnp.einsum("bsd,dg->bsg", xd, adapter["gate_b"]["w1"].astype(xd.dtype)) if lc.gated_b else None)
    pre_a, pre_b = pre
    if lc.routing == "pooled":
        pa = gate_probs_from_pre(span_mean(pre_a, seg, NEWS), adapter["gate_a"])  # [B, Ea]
        pb = gate_probs_from_pre(span_mean(pre_b, seg, USER), adapter["gate_b"])  # [B, Eb]
        if pooled_state is not None:
            pa = jnp.where(use_stored, pooled_state["a"], pa)
            pb = jnp.where(use_stored, pooled_state["b"], pb)
        ga = jnp.broadcast_to(pa[:, None], (b, s, ea))
        gb = jnp.broadcast_to(pb[:, None], (b, s, eb))
        return ga, gb, {"a": pa, "b": pb}
    if lc.gated_a:
        ga = gate_probs_from_pre(pre_a * (seg == NEWS)[..., None].astype(pre_a.dtype), adapter["gate_a"])
    else:
        ga = jnp.full((b, s, ea), 1.0 / ea, jnp.float32)
    if lc.gated_b:
        gb = gate_probs_from_pre(pre_b * (seg == USER)[..., None].astype(pre_b.dtype), adapter["gate_b"])
    else:
        gb = jnp.full((b, s, eb), 1.0 / eb, jnp.float32)
    return ga, gb, None


def mix_experts(z, ga, gb, lc: LoraConfig):
    """z [B, S, Ea*r] (x' A_cat) -> u = s * (gB outer sum_i gA_i z_i)  [B, S, Eb*r].

    Elementwise products and a sum over the (tiny) expert axis: a batched dot over B*S rows of
    [E] x [E, r] would run as thousands of tiny matmuls on the CPU.
    """
    dt = z.dtype
    ea, eb = ga.shape[-1], gb.shape[-1]
    zr = rearrange(z, "... (ea r) -> ... ea r", ea=ea)
    h = jnp.sum(zr * ga.astype(dt)[..., None], axis=-2)  # [B, S, r]
    u = (gb.astype(dt) * jnp.asarray(lc.scale, dt))[..., :, None] * h[..., None, :]  # [B, S, Eb, r]
    return rearrange(u, "... eb r -> ... (eb r)", eb=eb)


def projection(adapter: dict, lc: LoraConfig, dt=None):
    """[A_cat | gate_a.w1 | gate_b.w1] [d_in, Ea*r (+ G) (+ G)]: the experts' and the gates' first
    layers as one matrix, so x' is read once (`adapted_linear`)."""
    dt = dt or adapter["A"].dtype
    cols = [_a_cat(adapter["A"], dt)]
    if lc.gated_a:
        cols.append(adapter["gate_a"]["w1"].astype(dt))
    if lc.gated_b:
        cols.append(adapter["gate_b"]["w1"].astype(dt))
    return jnp.concatenate(cols, axis=1) if len(cols) > 1 else cols[0]


def with_projections(layer_adapters, lc: LoraConfig):
    """One layer's adapters with each map's `projection` made once, as 'proj' beside its A and gates.

    Why: `adapted_linear` would otherwise build the matrix (a transposing copy of A and a
    concatenation) at every call; in a decode loop that is every adapted map at every generated
    token, which on the CPU cost more than the map's matmuls. Made once before the loop
    (`decoder.unstack_adapters`), it is read as it lies. Only what `adapted_linear` reads changes.
    """
    def walk(tree):
        if "A" in tree:
            return dict(tree, proj=projection(tree, lc))
        return {k: walk(v) if isinstance(v, dict) else v for k, v in tree.items()}

    return walk(layer_adapters)


def fixed_factors(adapter: dict):
    """(A [..., d_in, r], B [..., r, d_out]) float32: the one rank-r LoRA an adapted map is where its
    gate weights do not depend on the input (leading axes, e.g. layers, are kept).

    The mix is then the experts' mean: 1/E each on an ungated side or for a token outside the
    gate's span (its pre-activations are zeroed, so the softmax is uniform), and 1 for a single
    expert. delta = s x mean_i(A_i) mean_j(B_j).
    """
    return (jnp.mean(jnp.asarray(adapter["A"], jnp.float32), axis=-3),
            jnp.mean(jnp.asarray(adapter["B"], jnp.float32), axis=-3))


def merged_kernel(kernel, adapter: dict, lc: LoraConfig):
    """W0 + s mean_i(A_i) mean_j(B_j): kernel [..., d_in, d_out] with the fixed-gate LoRA folded in
    (summed in float32, returned in the kernel's dtype; `fixed_factors`)."""
    a, b = fixed_factors(adapter)
    delta = jnp.einsum("...dr,...re->...de", a, b, precision=jax.lax.Precision.HIGHEST) * lc.scale
    return (jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype)


def decode_gates_fixed(lc: LoraConfig) -> bool:
    """Whether every generated token's gate weights are fixed, so that the decode loop may run the
    adapters merged into the base kernels (`decoder.decode_form`).

    A generated token lies after its prompt, outside both spans (`sampling.prefill` clips the
    spans to the prompt), so token gates read zeros there and weigh their experts equally; the
    uniform modes are fixed everywhere. Pooled gates give it its prompt's span means instead.
    """
    return lc.routing != "pooled"


def _a_cat(a, dt):
    """A [Ea, d_in, r] -> [d_in, Ea*r] (expert-major columns)."""
    return rearrange(a, "ea d r -> d (ea r)").astype(dt)


def _b_cat(b, dt):
    """B [Eb, r, d_out] -> [Eb*r, d_out]."""
    return rearrange(b, "eb r o -> (eb r) o").astype(dt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def base_plus_lora(x, u, w, b_cat, out32: bool = False):
    """x @ w + u @ b_cat as ONE matmul [x | u] @ [w; b_cat]: x [B, S, d_in], u [B, S, k] -> [B, S, d_out].

    XLA:CPU does not fuse the add of two matmul outputs, so the separate form writes and
    re-reads a [B, S, d_out] delta; concatenating along the contraction axis costs one copy
    of w instead. The backward is written out so the concatenation is not differentiated
    (which would compute a [d_in + k, d_out] weight gradient and slice it). out32: every
    product asks for float32 (`layers.matmul`).
    """
    return layers.matmul("bsk,ke->bse", jnp.concatenate([x, u], axis=-1), jnp.concatenate([w, b_cat], axis=0), out32)


def _base_plus_lora_fwd(x, u, w, b_cat, out32):
    return base_plus_lora(x, u, w, b_cat, out32), (x, u, w, b_cat)


def _base_plus_lora_bwd(out32, res, dy):
    x, u, w, b_cat = res
    dx = layers.matmul("bse,de->bsd", dy, w, out32)
    du = layers.matmul("bse,ke->bsk", dy, b_cat, out32)
    dw = layers.matmul("bsd,bse->de", x, dy, out32)  # dead code (removed by XLA) unless the base is trained
    db = layers.matmul("bsk,bse->ke", u, dy, out32)
    return dx, du, dw, db


base_plus_lora.defvjp(_base_plus_lora_fwd, _base_plus_lora_bwd)


def _fuse_base(lc: LoraConfig, rows: int, d_in: int, k: int) -> bool:
    """Whether to compute [x | u] @ [W0; B] ([d_in + k, d_out]) as one matmul for `rows` = B * S tokens.

    lc.fuse_base is resolved on the host for the devices a step is built for
    (`backend.resolve_for_platform`: 'by_size' on CPUs, 'never' on GPUs and TPUs, which fuse the
    add into the matmul themselves); an 'auto' that reaches here unresolved takes the choice for
    the default devices. 'by_size' fuses where the [rows, d_out] delta written and read back
    (2 * rows) outweighs the weight copy (d_in + k): a prefill or a training step, not a decode
    step of a few rows, where the copy (every base weight at every generated token) cost more
    than the step's matmuls.
    """
    mode = backend.fuse_base(lc)
    return mode == "always" or (mode == "by_size" and 2 * rows > d_in + k)


def dropout(x, rate: float, rng):
    """Inverted dropout with the drop probability rounded to a multiple of 2^-16.

    Each 32-bit threefry word gives the 16-bit draws of two entries (its halves), halving the
    random-bit work, which is a visible share of a CPU step; 0.1 becomes 6554/65536 (0.100006),
    and kept values are scaled by the exact inverse keep probability. Written as a multiply by
    the mask so the backward is a multiply too (a select's backward materialises zeros).
    """
    threshold = int(round(rate * 65536))
    if threshold <= 0:
        return x
    keep_scale = 65536.0 / (65536 - threshold)
    d = x.shape[-1]
    words = jax.random.bits(rng, (*x.shape[:-1], (d + 1) // 2), jnp.uint32)
    draws = jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)[..., :d]  # [..., d] in [0, 65536)
    mask = jnp.where(draws >= threshold, keep_scale, 0.0).astype(x.dtype)
    return x * mask


def gate_stats(ga, gb, seg, valid):
    """Per-segment sums of gate weights and their entropies, plus token counts.

    Sums rather than means so that statistics add up exactly across batches and devices;
    `summarize_gate_stats` turns them into means. Shapes: a [3, Ea], b [3, Eb], count [3].
    """
    onehot = jax.nn.one_hot(seg, 3, dtype=jnp.float32) * valid[..., None].astype(jnp.float32)

    def ent(p):
        return -jnp.sum(p * jnp.log(jnp.clip(p, 1e-30)), axis=-1)

    return {
        "a": jnp.einsum("bse,bsc->ce", ga, onehot),
        "b": jnp.einsum("bse,bsc->ce", gb, onehot),
        "a_entropy": jnp.einsum("bs,bsc->c", ent(ga), onehot),
        "b_entropy": jnp.einsum("bs,bsc->c", ent(gb), onehot),
        "count": jnp.sum(onehot, axis=(0, 1)),
    }


def summarize_gate_stats(stats: dict, *, pool: bool = False) -> dict:
    """Gate-stat sums -> means: the one place a count divides a sum.

    stats {module: {'a': [L, 3, Ea], 'b': [L, 3, Eb], 'a_entropy'|'b_entropy'|'count': [L, 3]}} (the
    sums `decoder.forward` collects; they add up exactly across batches and devices). Returns
    {module: {'a': mean weights [L, 3, Ea], 'b': ..., entropies [L, 3], 'count'}}, or with pool=True
    one summary over every layer and module, token-weighted: {'a': [3, Ea], 'b': [3, Eb],
    'a_entropy'|'b_entropy': [3], 'count': [3]} ({} when there are no stats).
    """
    if pool:
        if not stats:
            return {}
        sums = [jax.tree.map(lambda x: jnp.sum(x, axis=0), st) for st in stats.values()]  # over layers
        stats = {"all": jax.tree.map(lambda *x: sum(x), *sums)}  # over modules
    out = {}
    for name, st in stats.items():
        cnt = jnp.maximum(st["count"], 1.0)
        out[name] = {
            "a": st["a"] / cnt[..., None], "b": st["b"] / cnt[..., None],
            "a_entropy": st["a_entropy"] / cnt, "b_entropy": st["b_entropy"] / cnt,
            "count": st["count"],
        }
    return out["all"] if pool else out


# The decode form's linear maps (kernel_t [d_out, d_in]) run weight-major up to this many rows (B * S):
# measured on XLA:CPU for SmolLM2's shapes, 1.3-2x faster at 8-32 rows, ~1.1x at 64, mixed at 128.
WEIGHT_MAJOR_ROWS = 64


def base_matmul(x, base: dict, preferred_element_type=None, weight_major_rows: int = WEIGHT_MAJOR_ROWS,
                out32: bool = False):
    """x [B, S, d_in] @ the frozen kernel -> [B, S, d_out] (no bias).

    The result is preferred_element_type's, else x's; with out32 a half-precision product asks the
    dot for float32 and is rounded to x's dtype after (`layers.matmul`).

    base holds 'kernel' [d_in, d_out] (as declared), or in the decode loop's form 'kernel_t'
    [d_out, d_in] (`decoder.decode_form`, stored transposed once before the loop), whose product
    is formed weight-major up to `weight_major_rows` rows (`layers.weight_major_dot`; an LM head
    passes its own crossover, `modules.ATTEND_ROWS_VOCAB_MAJOR`).
    """
    if out32 and preferred_element_type is None and x.dtype != jnp.float32:
        return base_matmul(x, base, jnp.float32, weight_major_rows).astype(x.dtype)
    if "kernel_t" in base:
        w_t = base["kernel_t"].astype(x.dtype)
        if x.shape[0] * x.shape[1] <= weight_major_rows:
            return layers.weight_major_dot(x, w_t, preferred_element_type)
        return jnp.einsum("bsd,ed->bse", x, w_t, preferred_element_type=preferred_element_type)
    return jnp.einsum("bsd,de->bse", x, base["kernel"].astype(x.dtype), preferred_element_type=preferred_element_type)


def adapted_linear(x, base: dict, adapter: dict | None, lc: LoraConfig | None, route: dict,
                   rng=None, pooled_state=None, *, out32: bool = False):
    """y = x W0 (+ b) + PAC-LoRA delta.  x [B, S, d_in] -> (y [B, S, d_out], stats, pooled_state).

    out32: the products of a half-precision x ask their dots for float32 (ModelConfig.matmul_out;
    `layers.matmul`), the base's, the experts' and the gates' first layers'.

    route: {'seg': [B, S] segment ids, 'valid': [B, S] bool, 'deterministic': bool,
            'use_stored': traced bool, pooled decoding only}.
    """
    if adapter is None:
        y = base_matmul(x, base, out32=out32)
        return (y + base["bias"].astype(x.dtype) if "bias" in base else y), None, None
    dt = x.dtype
    xd = x
    if lc.dropout > 0.0 and not route["deterministic"]:
        xd = dropout(x, lc.dropout, rng)
    # One read of x' for the experts and both gates' first layers ([A_cat | w1_a | w1_b], or the
    # same matrix made once before a decode loop: `with_projections`).
    w_proj = adapter["proj"].astype(dt) if "proj" in adapter else projection(adapter, lc, dt)
    proj = layers.matmul("bsd,dk->bsk", xd, w_proj, out32)
    k = lc.num_analyze * lc.rank
    g = lc.gate_width
    z = proj[..., :k]
    pre_a = proj[..., k:k + g] if lc.gated_a else None
    pre_b = proj[..., proj.shape[-1] - g:] if lc.gated_b else None
    ga, gb, new_pooled = routing_weights(xd, route["seg"], adapter, lc, pooled_state,
                                         route.get("use_stored", False), pre=(pre_a, pre_b))
    u = mix_experts(z, ga, gb, lc)  # [B, S, Eb*r], scale included
    b_cat = _b_cat(adapter["B"], dt)
    if "kernel" in base and _fuse_base(lc, x.shape[0] * x.shape[1], base["kernel"].shape[0], b_cat.shape[0]):
        y = base_plus_lora(x, u, base["kernel"].astype(dt), b_cat, out32)
    else:
        y = base_matmul(x, base, out32=out32) + layers.matmul("bsk,ke->bse", u, b_cat, out32)
    if "bias" in base:
        y = y + base["bias"].astype(dt)
    return y, gate_stats(ga, gb, route["seg"], route["valid"]), new_pooled
