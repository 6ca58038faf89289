"""The Flax model declares the trees every consumer reads, each variable once with its logical axes.

References: the base and adapter layouts written out by hand from docs/DESIGN.md (the layout
checkpoints, weights.hf, weights.gguf, weights.adapters and export read), and the sharding rules of
sharding.LOGICAL_RULES applied to hand-written logical axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from socialalign_jax.model import decoder, pac_lora
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model import axes as model_axes
from socialalign_jax.parallel import mesh as mesh_lib, sharding

BLOCK = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}
# (logical d_in, logical d_out) of each linear map, written out from DESIGN.md
IO = {"q": ("embed", "heads"), "k": ("embed", "kv_heads"), "v": ("embed", "kv_heads"), "o": ("heads", "embed"),
      "gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed")}

CFGS = {
    "qwen2_tied": ModelConfig("qwen2", 96, 24, 40, 3, 4, 2, 6, tie_embeddings=True),
    "qwen2_untied_bf16": ModelConfig("qwen2", 96, 24, 40, 3, 4, 2, 6, tie_embeddings=False,
                                     param_dtype="bfloat16", dtype="bfloat16"),
    "llama": ModelConfig("llama", 96, 24, 40, 2, 4, 1, 6, qkv_bias=False, tie_embeddings=False),
}


def expected_base(cfg):
    """{path: (shape, dtype, logical axes)} of the base tree, from DESIGN.md's layout."""
    n, d, f, v = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    dims = {"q": (d, cfg.num_heads * cfg.head_dim), "k": (d, cfg.num_kv_heads * cfg.head_dim),
            "v": (d, cfg.num_kv_heads * cfg.head_dim), "o": (cfg.num_heads * cfg.head_dim, d),
            "gate": (d, f), "up": (d, f), "down": (f, d)}
    dt = jnp.dtype(cfg.param_dtype)
    out = {("embed", "embedding"): ((v, d), dt, ("vocab", "embed")),
           ("final_norm", "scale"): ((d,), dt, ("norm",)),
           ("layers", "input_norm", "scale"): ((n, d), dt, ("layers", "norm")),
           ("layers", "post_attn_norm", "scale"): ((n, d), dt, ("layers", "norm"))}
    for m, (i, o) in dims.items():
        out[("layers", BLOCK[m], m, "kernel")] = ((n, i, o), dt, ("layers",) + IO[m])
        if cfg.qkv_bias and m in ("q", "k", "v"):
            out[("layers", BLOCK[m], m, "bias")] = ((n, o), dt, ("layers", IO[m][1]))
    if not cfg.tie_embeddings:
        out[("lm_head", "kernel")] = ((d, v), dt, ("embed", "vocab"))
    return out, dims


def expected_adapters(cfg, lc):
    n = cfg.num_layers
    _, dims = expected_base(cfg)
    f32 = jnp.dtype(jnp.float32)
    ea, eb, r, g = lc.num_analyze, lc.num_compose, lc.rank, lc.gate_width
    out = {}
    for m in lc.targets:
        i, o = dims[m]
        pre = ("layers", BLOCK[m], m)
        a_in, a_out = (ax if ax == "embed" else "lora_width" for ax in IO[m])  # tensor-parallel sides
        out[pre + ("A",)] = ((n, ea, i, r), f32, ("layers", "experts", a_in, "rank"))
        out[pre + ("B",)] = ((n, eb, r, o), f32, ("layers", "experts", "rank", a_out))
        for gate, e in (("gate_a", ea), ("gate_b", eb)):
            out[pre + (gate, "w1")] = ((n, i, g), f32, ("layers", a_in, "gate"))
            out[pre + (gate, "w2")] = ((n, g, e), f32, ("layers", "gate", "experts"))
    if lc.num_classes:
        out[("head", "kernel")] = ((cfg.hidden_size, lc.num_classes), f32, ("embed", "classes"))
        out[("head", "bias")] = ((lc.num_classes,), f32, ("classes",))
    return out


def _flat(tree, is_leaf=None):
    return {tuple(sharding.key_name(k) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _check_layout(tree, expected):
    flat = _flat(tree)
    assert set(flat) == set(expected)
    for path, (shape, dtype, _) in expected.items():
        assert flat[path].shape == shape and flat[path].dtype == dtype, path
    # plain nested dicts (not FrozenDicts), as checkpoints / weights.adapters / export expect
    def nodes(t):
        if hasattr(t, "items"):
            yield t
            for v in t.values():
                yield from nodes(v)
    assert all(type(t) is dict for t in nodes(tree))


@pytest.mark.parametrize("name", sorted(CFGS))
def test_param_tree_is_the_documented_layout(name):
    cfg = CFGS[name]
    params = decoder.init_params(cfg, jax.random.PRNGKey(0))
    expected, _ = expected_base(cfg)
    _check_layout(params, expected)
    # initializers: norms at one, weights N(0, 0.02), layers drawn independently
    assert bool(jnp.all(params["layers"]["input_norm"]["scale"] == 1))
    q = np.asarray(params["layers"]["attn"]["q"]["kernel"], np.float32)
    assert 0.015 < q.std() < 0.025 and not np.allclose(q[0], q[1])


@pytest.mark.parametrize("lc", [pac_lora.LoraConfig(),
                                pac_lora.LoraConfig(num_analyze=2, num_compose=4, rank=3, gate_width=5,
                                                    targets=("v", "down"), num_classes=0),
                                pac_lora.LoraConfig(targets=(), num_classes=5)])
def test_adapter_tree_is_the_documented_layout(lc):
    cfg = CFGS["llama"]
    ad = decoder.init_adapters(jax.random.PRNGKey(1), cfg, lc)
    _check_layout(ad, expected_adapters(cfg, lc))
    if lc.targets:  # B = 0 so the adapted model starts equal to the base; A drawn per layer
        m = lc.targets[0]
        a = ad["layers"][BLOCK[m]][m]
        assert not np.any(np.asarray(a["B"])) and not np.allclose(a["A"][0], a["A"][1])
        bound = 1 / np.sqrt(a["A"].shape[2])
        assert np.abs(np.asarray(a["A"])).max() <= bound


@pytest.mark.parametrize("name", sorted(CFGS))
def test_every_variable_declares_its_logical_axes(name):
    cfg = CFGS[name]
    lc = pac_lora.LoraConfig(num_analyze=2, num_compose=3, rank=2, gate_width=4)
    boxed = decoder.init_boxed(cfg, lc)
    expected = {**{("params",) + k: v for k, v in expected_base(cfg)[0].items()},
                **{("lora",) + k: v for k, v in expected_adapters(cfg, lc).items()}}
    flat = _flat(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert set(flat) == set(expected)
    for path, leaf in flat.items():
        assert isinstance(leaf, nn.Partitioned), path  # declared with with_logical_partitioning
        assert tuple(leaf.names) == expected[path][2], path
        assert leaf.value.shape == expected[path][0], path
    # sharding derives the same axes, also under optimizer-state prefixes
    for col in ("params", "lora"):
        tree = decoder._to_dict(nn.unbox(boxed[col]))
        axes = _flat(model_axes.logical_axes(tree), is_leaf=lambda x: isinstance(x, tuple))
        assert axes == {k[1:]: v[2] for k, v in expected.items() if k[0] == col}
        nested = model_axes.logical_axes({"opt": {"mu": tree}})
        assert nested["opt"]["mu"] == model_axes.logical_axes(tree)


def test_declared_shardings_on_a_mesh():
    """NamedShardings from the declarations equal the rules applied to the hand-written axes."""
    cfg = CFGS["qwen2_untied_bf16"]
    mesh = mesh_lib.make_mesh(1, 4, 2)
    shapes = jax.eval_shape(lambda: decoder.init_params(cfg, jax.random.PRNGKey(0)))
    sh = _flat(model_axes.shardings(shapes, mesh), is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    for path, (shape, _, axes) in expected_base(cfg)[0].items():
        assert sh[path].spec == sharding.logical_to_spec(axes, shape, mesh), path
    assert sh[("layers", "attn", "q", "kernel")].spec == P(None, "fsdp", "tensor")
    assert sh[("lm_head", "kernel")].spec == P("fsdp", "tensor")


def test_activation_shardings_in_the_compiled_forward():
    """On 2x2x2 fake devices the constraints at layer boundaries lay out the activations.

    Parameters are replicated and only the batch is split, so nothing but the constraints asks
    for the MLP activation [B, S, F] to be split over 'tensor' as well: compiled under the mesh,
    the per-device [B/4, S, F/2] shape appears; compiled without it, it does not.
    """
    cfg = ModelConfig("llama", 64, 16, 40, 2, 4, 2, 4, qkv_bias=False)
    mesh = mesh_lib.make_mesh(2, 2, 2)
    params = jax.device_put(decoder.init_params(cfg, jax.random.PRNGKey(0)),
                            jax.sharding.NamedSharding(mesh, P()))
    ids = jax.device_put(jnp.ones((8, 4), jnp.int32), sharding.batch_sharding(mesh))

    def fwd(p, x):
        return decoder.forward(p, x, cfg).logits

    local_mlp = "f32[2,4,20]"  # [B/(data*fsdp), S, F/tensor]
    constrained = jax.jit(sharding.under_mesh(fwd, mesh)).lower(params, ids).compile().as_text()
    assert local_mlp in constrained
    assert "f32[2,4,32]" in constrained  # logits [B/4, S, V/tensor]
    plain = jax.jit(fwd).lower(params, ids).compile().as_text()
    assert local_mlp not in plain


@pytest.mark.parametrize("batch,seq", [(8, 1), (4, 8), (5, 9)])  # 8 and 32 rows vocab-major; 45 rows the plain form
def test_tied_head_logits_and_gradients_equal_numpy(batch, seq):
    """`Embed.attend` (the tied LM head) against float64 numpy on both sides of ATTEND_ROWS_VOCAB_MAJOR:
    logits = h E^T; for a loss sum(logits * c), dL/dh = c E and dL/dE = c^T h."""
    from socialalign_jax.model.modules import ATTEND_ROWS_VOCAB_MAJOR, Embed

    rng = np.random.default_rng(0)
    vocab, dim = 97, 24
    emb = rng.normal(size=(vocab, dim)).astype(np.float32)
    h = rng.normal(size=(batch, seq, dim)).astype(np.float32)
    c = rng.normal(size=(batch, seq, vocab)).astype(np.float32)
    mod = Embed(vocab, dim, jnp.float32)
    assert (batch * seq <= ATTEND_ROWS_VOCAB_MAJOR) == (batch * seq in (8, 32))

    def loss(e, x):
        out = mod.apply({"params": {"embedding": e}}, x, method=Embed.attend)
        return jnp.sum(out * c), out

    (_, out), (g_e, g_h) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(jnp.asarray(emb),
                                                                                           jnp.asarray(h))
    e64, h64, c64 = emb.astype(np.float64), h.astype(np.float64), c.astype(np.float64)
    assert out.shape == (batch, seq, vocab) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), h64 @ e64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_h), c64 @ e64, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g_e), np.einsum("bsv,bsd->vd", c64, h64), rtol=1e-5, atol=1e-4)
