"""PAC-LoRA: analyze/compose LoRA experts mixed by two span gates (SPEC section 2).

delta(x) = s * sum_j gB_j ((sum_i gA_i (x' A_i)) B_j), computed as two matmuls against the
concatenated experts so that no [batch, seq, E, d_out] tensor exists in forward or backward:

    z = x' @ A_cat            [B, S, Ea*r]      (A_cat = [d_in, Ea*r])
    h = sum_i gA_i z_i        [B, S, r]
    u = gB (outer) h          [B, S, Eb*r]
    delta = u @ B_cat         [B, S, d_out]     (B_cat = [Eb*r, d_out])

Gate weights depend on segment ids derived from absolute positions, so a KV-cached decode
routes every token exactly as the full forward does (the original code does not).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

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
    (only the head, if num_classes > 0, is trainable).
    """
    num_analyze: int = 3
    num_compose: int = 3
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.1
    gate_width: int = 32
    targets: tuple[str, ...] = ALL_TARGETS
    routing: str = "token"
    num_classes: int = 3

    def __post_init__(self):
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"unknown routing mode {self.routing!r}; expected one of {ROUTING_MODES}")
        bad = [t for t in self.targets if t not in MODULE_BLOCK]
        if bad:
            raise ValueError(f"unknown adapter targets {bad}; known: {ALL_TARGETS}")
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


def _uniform(key, shape, bound):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def init_module_adapter(key, num_layers: int, d_in: int, d_out: int, lc: LoraConfig) -> dict:
    """Adapter params of one target for all layers (stacked on L), float32.

    A ~ U(+-1/sqrt(d_in)) (PyTorch kaiming_uniform with a=sqrt(5)), B = 0 so the adapted model
    starts equal to the base; gate kernels ~ U(+-1/sqrt(fan_in)).
    """
    ka, k1a, k2a, k1b, k2b = jax.random.split(key, 5)
    g, ea, eb, r = lc.gate_width, lc.num_analyze, lc.num_compose, lc.rank
    return {
        "A": _uniform(ka, (num_layers, ea, d_in, r), 1.0 / math.sqrt(d_in)),
        "B": jnp.zeros((num_layers, eb, r, d_out), jnp.float32),
        "gate_a": {"w1": _uniform(k1a, (num_layers, d_in, g), 1.0 / math.sqrt(d_in)),
                   "w2": _uniform(k2a, (num_layers, g, ea), 1.0 / math.sqrt(g))},
        "gate_b": {"w1": _uniform(k1b, (num_layers, d_in, g), 1.0 / math.sqrt(d_in)),
                   "w2": _uniform(k2b, (num_layers, g, eb), 1.0 / math.sqrt(g))},
    }


def gate_probs(x, gate) -> jax.Array:
    """Dense(d_in->G, no bias) -> exact GELU -> Dense(G->E, no bias) -> float32 softmax.  x [..., d_in]."""
    hdn = jnp.einsum("...d,dg->...g", x, gate["w1"].astype(x.dtype))
    hdn = jax.nn.gelu(hdn, approximate=False)
    logits = jnp.einsum("...g,ge->...e", hdn, gate["w2"].astype(x.dtype))
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def segment_ids(positions, user_end, news_end, valid):
    """positions [B, S] absolute; user_end, news_end [B] -> segment ids [B, S] (padding is OTHER)."""
    seg = jnp.where(positions < user_end[:, None], USER,
                    jnp.where(positions < news_end[:, None], NEWS, OTHER))
    return jnp.where(valid, seg, OTHER).astype(jnp.int32)


def span_means(x, seg):
    """Mean of x over the news span and over the user span of each sequence: 2 x [B, d_in]."""
    def mean_over(s):
        m = (seg == s).astype(x.dtype)[..., None]
        total = jnp.sum(x * m, axis=1)
        count = jnp.maximum(jnp.sum(m, axis=1), 1)
        return total / count  # an empty span gives 0 -> uniform gate weights
    return mean_over(NEWS), mean_over(USER)


def routing_weights(xd, seg, adapter, lc: LoraConfig, pooled_state=None, use_stored=False):
    """Gate weights gA [B, S, Ea], gB [B, S, Eb] (float32) for one module.

    pooled_state: in `pooled` decoding, the per-sequence weights stored at prefill
    ({'a': [B, Ea], 'b': [B, Eb]}), used instead of this chunk's span means where `use_stored`
    (a traced bool: false at prefill, true for later chunks). Also returns the pooled weights
    to carry in the cache (pooled mode) or None.
    """
    b, s, _ = xd.shape
    ea, eb = lc.num_analyze, lc.num_compose
    if lc.routing == "pooled":
        news_mean, user_mean = span_means(xd, seg)
        pa = gate_probs(news_mean, adapter["gate_a"])  # [B, Ea]
        pb = gate_probs(user_mean, adapter["gate_b"])  # [B, Eb]
        if pooled_state is not None:
            pa = jnp.where(use_stored, pooled_state["a"], pa)
            pb = jnp.where(use_stored, pooled_state["b"], pb)
        ga = jnp.broadcast_to(pa[:, None], (b, s, ea))
        gb = jnp.broadcast_to(pb[:, None], (b, s, eb))
        return ga, gb, {"a": pa, "b": pb}
    if lc.gated_a:
        ga = gate_probs(xd * (seg == NEWS)[..., None].astype(xd.dtype), adapter["gate_a"])
    else:
        ga = jnp.full((b, s, ea), 1.0 / ea, jnp.float32)
    if lc.gated_b:
        gb = gate_probs(xd * (seg == USER)[..., None].astype(xd.dtype), adapter["gate_b"])
    else:
        gb = jnp.full((b, s, eb), 1.0 / eb, jnp.float32)
    return ga, gb, None


def lora_delta(xd, ga, gb, adapter, lc: LoraConfig):
    """The two-matmul PAC-LoRA delta. xd [B, S, d_in] (dropout applied) -> [B, S, d_out]."""
    dt = xd.dtype
    ea, d_in, r = adapter["A"].shape
    eb, _, d_out = adapter["B"].shape
    a_cat = jnp.transpose(adapter["A"], (1, 0, 2)).reshape(d_in, ea * r).astype(dt)
    b_cat = adapter["B"].reshape(eb * r, d_out).astype(dt)
    z = jnp.einsum("bsd,dk->bsk", xd, a_cat).reshape(*xd.shape[:2], ea, r)
    h = jnp.einsum("bser,bse->bsr", z, ga.astype(dt))
    u = (gb.astype(dt)[..., :, None] * h[..., None, :]).reshape(*xd.shape[:2], eb * r)
    return jnp.einsum("bsk,kd->bsd", u, b_cat) * jnp.asarray(lc.scale, dt)


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


def summarize_gate_stats(stats: dict) -> dict:
    """{module: sums [L, 3, E]} -> {module: {'a': mean weights [L, 3, Ea], 'b': ..., entropies [L, 3]}}."""
    out = {}
    for name, st in stats.items():
        cnt = jnp.maximum(st["count"], 1.0)
        out[name] = {
            "a": st["a"] / cnt[..., None], "b": st["b"] / cnt[..., None],
            "a_entropy": st["a_entropy"] / cnt, "b_entropy": st["b_entropy"] / cnt,
            "count": st["count"],
        }
    return out


def adapted_linear(x, base: dict, adapter: dict | None, lc: LoraConfig | None, route: dict,
                   rng=None, pooled_state=None):
    """y = x W0 (+ b) + PAC-LoRA delta.  x [B, S, d_in] -> (y [B, S, d_out], stats, pooled_state).

    route: {'seg': [B, S] segment ids, 'valid': [B, S] bool, 'deterministic': bool,
            'use_stored': traced bool, pooled decoding only}.
    """
    y = jnp.einsum("bsd,de->bse", x, base["kernel"].astype(x.dtype))
    if "bias" in base:
        y = y + base["bias"].astype(x.dtype)
    if adapter is None:
        return y, None, None
    xd = x
    if lc.dropout > 0.0 and not route["deterministic"]:
        keep = jax.random.bernoulli(rng, 1.0 - lc.dropout, x.shape)
        xd = jnp.where(keep, x / (1.0 - lc.dropout), 0).astype(x.dtype)
    ga, gb, new_pooled = routing_weights(xd, route["seg"], adapter, lc, pooled_state,
                                         route.get("use_stored", False))
    y = y + lora_delta(xd, ga, gb, adapter, lc)
    return y, gate_stats(ga, gb, route["seg"], route["valid"]), new_pooled


def init_adapters(key, cfg, lc: LoraConfig) -> dict[str, Any]:
    """The trainable tree: {'layers': {'attn': {...}, 'mlp': {...}}, 'head': {...}} (float32)."""
    dims = cfg.module_dims()
    tree: dict[str, Any] = {}
    layers: dict[str, dict] = {}
    keys = jax.random.split(key, len(lc.targets) + 1)
    for k, name in zip(keys[:-1], lc.targets):
        block = MODULE_BLOCK[name]
        d_in, d_out = dims[(block, name)]
        layers.setdefault(block, {})[name] = init_module_adapter(k, cfg.num_layers, d_in, d_out, lc)
    if layers:
        tree["layers"] = layers
    if lc.num_classes > 0:
        bound = 1.0 / math.sqrt(cfg.hidden_size)
        tree["head"] = {"kernel": _uniform(keys[-1], (cfg.hidden_size, lc.num_classes), bound),
                        "bias": jnp.zeros((lc.num_classes,), jnp.float32)}
    return tree
