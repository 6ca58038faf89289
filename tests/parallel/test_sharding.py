"""Mesh construction and logical-axis sharding on 8 fake CPU devices."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from socialalign_jax.model import axes as model_axes
from socialalign_jax.parallel import mesh as mesh_lib, sharding

L, D, F, HQ, HKV, DH, V, E, R, G, K = 2, 16, 32, 4, 2, 4, 64, 3, 2, 4, 3
DIMS = {"q": (D, HQ * DH), "k": (D, HKV * DH), "v": (D, HKV * DH), "o": (HQ * DH, D),
        "gate": (D, F), "up": (D, F), "down": (F, D)}
BLOCK = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}


def base_tree(d=D, tied=False):
    dims = {m: tuple(d if x == D else x for x in io) for m, io in DIMS.items()}
    layers = {"input_norm": {"scale": np.zeros((L, d))}, "post_attn_norm": {"scale": np.zeros((L, d))},
              "attn": {}, "mlp": {}}
    for m, (i, o) in dims.items():
        layers[BLOCK[m]][m] = {"kernel": np.zeros((L, i, o), np.float32)}
        if m in ("q", "k", "v"):
            layers[BLOCK[m]][m]["bias"] = np.zeros((L, o), np.float32)
    tree = {"embed": {"embedding": np.zeros((V, d))}, "layers": layers, "final_norm": {"scale": np.zeros((d,))}}
    if not tied:
        tree["lm_head"] = {"kernel": np.zeros((d, V))}
    return tree


def adapter_tree():
    layers = {"attn": {}, "mlp": {}}
    for m, (i, o) in DIMS.items():
        layers[BLOCK[m]][m] = {"A": np.zeros((L, E, i, R), np.float32), "B": np.zeros((L, E, R, o), np.float32),
                               "gate_a": {"w1": np.zeros((L, i, G)), "w2": np.zeros((L, G, E))},
                               "gate_b": {"w1": np.zeros((L, i, G)), "w2": np.zeros((L, G, E))}}
    return {"layers": layers, "head": {"kernel": np.zeros((D, K)), "bias": np.zeros((K,))}}


def _check_valid(tree, shardings, mesh):
    """Every leaf can be placed and each sharded dim is divisible by its mesh axes."""
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(
            shardings, is_leaf=lambda n: isinstance(n, jax.sharding.NamedSharding))):
        assert s.mesh is mesh
        for size, ax in zip(np.shape(x), s.spec):
            axes = () if ax is None else ((ax,) if isinstance(ax, str) else ax)
            assert size % int(np.prod([mesh.shape[a] for a in axes])) == 0, (path, s.spec)
        arr = jax.device_put(x, s)
        assert arr.sharding == s and len(arr.sharding.device_set) == 8


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_param_shardings_valid(shape):
    mesh = mesh_lib.make_mesh(*shape)
    assert mesh.axis_names == ("data", "fsdp", "tensor") and tuple(mesh.devices.shape) == shape
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    for tree in (base_tree(), base_tree(tied=True), adapter_tree()):
        _check_valid(tree, model_axes.shardings(tree, mesh), mesh)


def test_expected_specs():
    mesh = mesh_lib.make_mesh(1, 4, 2)
    base = model_axes.shardings(base_tree(), mesh)
    ad = model_axes.shardings(adapter_tree(), mesh)
    spec = lambda t, *ks: _get(t, ks).spec
    assert spec(base, "layers", "attn", "q", "kernel") == P(None, "fsdp", "tensor")
    assert spec(base, "layers", "attn", "q", "bias") == P(None, "tensor")
    assert spec(base, "layers", "attn", "k", "kernel") == P(None, "fsdp", "tensor")
    assert spec(base, "layers", "attn", "o", "kernel") == P(None, "tensor", "fsdp")
    assert spec(base, "layers", "mlp", "down", "kernel") == P(None, "tensor", "fsdp")
    assert spec(base, "embed", "embedding") == P("tensor", "fsdp")
    assert spec(base, "lm_head", "kernel") == P("fsdp", "tensor")
    assert spec(base, "layers", "input_norm", "scale") == P(None, None)
    # adapters: replicated over L, E, r; on embed like their base kernel; where the base kernel is
    # tensor-parallel, over tensor x fsdp (lora_width), so nothing of theirs is whole on every chip
    assert spec(ad, "layers", "attn", "q", "A") == P(None, None, "fsdp", None)
    assert spec(ad, "layers", "attn", "q", "B") == P(None, None, None, ("tensor", "fsdp"))
    assert spec(ad, "layers", "attn", "o", "A") == P(None, None, ("tensor", "fsdp"), None)
    assert spec(ad, "layers", "mlp", "down", "B") == P(None, None, None, "fsdp")
    assert spec(ad, "layers", "mlp", "down", "gate_b", "w1") == P(None, ("tensor", "fsdp"), None)
    assert spec(ad, "layers", "attn", "k", "B") == P(None, None, None, ("tensor", "fsdp"))
    assert spec(ad, "layers", "attn", "v", "gate_a", "w2") == P(None, None, None)
    assert spec(ad, "head", "kernel") == P("fsdp", None)
    # with tensor = 1 (pure fsdp) every adapter matrix is split over fsdp; the base kernels are as before
    m18 = mesh_lib.make_mesh(1, 8, 1)
    ad8, base8 = model_axes.shardings(adapter_tree(), m18), model_axes.shardings(base_tree(), m18)
    for m in DIMS:
        for leaf in ("A", "B"):
            assert "fsdp" in str(spec(ad8, "layers", BLOCK[m], m, leaf)), (m, leaf)
    assert spec(base8, "layers", "attn", "q", "kernel") == P(None, "fsdp", "tensor")
    assert spec(base8, "layers", "mlp", "down", "kernel") == P(None, "tensor", "fsdp")
    # on the 2x2x2 mesh the q kernel keeps the same layout
    q = _get(model_axes.shardings(base_tree(), mesh_lib.make_mesh(2, 2, 2)), ("layers", "attn", "q", "kernel"))
    assert q.spec == P(None, "fsdp", "tensor")


def _get(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def test_divisibility_fallback(caplog):
    mesh = mesh_lib.make_mesh(1, 4, 2)
    tree = base_tree(d=6)  # 6 is not divisible by fsdp = 4
    with caplog.at_level(logging.DEBUG, logger="socialalign_jax.parallel.sharding"):
        sh = model_axes.shardings(tree, mesh)
    _check_valid(tree, sh, mesh)
    assert _get(sh, ("layers", "attn", "q", "kernel")).spec == P(None, None, "tensor")
    assert _get(sh, ("embed", "embedding")).spec == P("tensor", None)
    assert any("layers/attn/q/kernel" in r.getMessage() and "not divisible" in r.getMessage()
               for r in caplog.records)
    # batch over ('data', 'fsdp') falls back to the divisible prefix
    m222 = mesh_lib.make_mesh(2, 2, 2)
    assert sharding.logical_to_spec(("batch", "length"), (2, 5), m222) == P("data", None)
    assert sharding.logical_to_spec(("batch", "length"), (8, 5), m222) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("batch",), (3,), m222) == P(None)


def test_optimizer_state_and_batch_shardings():
    mesh = mesh_lib.make_mesh(2, 2, 2)
    ad = jax.tree.map(jnp.asarray, adapter_tree())
    state = optax.MultiSteps(optax.adamw(1e-3), every_k_schedule=2).init(ad)
    sh = model_axes.shardings(state, mesh)
    _check_valid(state, sh, mesh)
    mu_q = sh.inner_opt_state[0].mu["layers"]["attn"]["q"]["A"]
    assert mu_q.spec == P(None, None, "fsdp", None)
    bs = sharding.batch_sharding(mesh)
    x = jax.device_put(np.zeros((8, 5), np.int32), bs)
    assert x.sharding.spec == P(("data", "fsdp")) and x.addressable_shards[0].data.shape == (2, 5)
    sharding.check_batch_divisible(8, mesh)
    with pytest.raises(ValueError, match="not divisible by data x fsdp = 4"):
        sharding.check_batch_divisible(6, mesh)


def test_unknown_leaf_and_bad_rank():
    with pytest.raises(ValueError, match="layers/attn/qq/kernel"):
        model_axes.logical_axes({"layers": {"attn": {"qq": {"kernel": np.zeros((2, 3, 4))}}}})
    assert model_axes.logical_axes({"extra": np.zeros((3, 4))}, strict=False) == {"extra": (None, None)}
    with pytest.raises(ValueError, match="embed/embedding"):
        model_axes.logical_axes({"embed": {"embedding": np.zeros((3,))}})
    with pytest.raises(ValueError, match="no rule"):
        sharding.logical_to_spec(("nonsense",), (8,), mesh_lib.make_mesh(8))


def test_make_mesh_validation():
    assert tuple(mesh_lib.make_mesh().devices.shape) == (8, 1, 1)
    assert tuple(mesh_lib.make_mesh(data=2, fsdp=-1, tensor=2).devices.shape) == (2, 2, 2)
    assert tuple(mesh_lib.make_mesh(data=1, fsdp=2, tensor=1, devices=jax.devices()[:2]).devices.shape) == (1, 2, 1)
    with pytest.raises(ValueError, match="data=2 x fsdp=2 x tensor=1 = 4 but there are 8 devices"):
        mesh_lib.make_mesh(2, 2, 1)
    with pytest.raises(ValueError, match="not divisible"):
        mesh_lib.make_mesh(-1, 3, 1)
    with pytest.raises(ValueError, match="only one axis"):
        mesh_lib.make_mesh(-1, -1, 1)
    with pytest.raises(ValueError, match="positive"):
        mesh_lib.make_mesh(0, 8, 1)


# ----------------------------------------------------------------------------- Flax's logical API


def _rules_with(**override):
    from socialalign_jax.parallel.axis_rules import LOGICAL_RULES

    return tuple((name, override.get(name, axes)) for name, axes in LOGICAL_RULES)


def _constraints(text: str) -> list[str]:
    return [ln.split("sharding_constraint", 1)[1] for ln in text.splitlines() if "sharding_constraint" in ln]


def test_specs_are_flax_logical_to_mesh_axes_fitted_to_the_shape():
    """logical_to_spec is Flax's mapping (nn.logical_to_mesh_axes by the same rules) wherever the
    dimensions divide their mesh axes; where they do not, only the fallback differs."""
    import flax.linen as nn

    from socialalign_jax.parallel.axis_rules import LOGICAL_RULES

    mesh = mesh_lib.make_mesh(1, 4, 2)
    for axes, shape in [(("layers", "embed", "heads"), (2, 16, 8)), (("vocab", "embed"), (64, 16)),
                        (("experts", "rank", "lora_width"), (3, 2, 16)), (("batch", "length"), (8, 5)),
                        (("layers", "batch", "length", "cache_kv_heads", None), (2, 4, 6, 2, 4))]:
        assert sharding.logical_to_spec(axes, shape, mesh) == nn.logical_to_mesh_axes(axes, LOGICAL_RULES), axes
    # not divisible: kv heads 1 on tensor 2 -> replicated; lora_width 6 on tensor x fsdp 8 -> tensor
    assert sharding.logical_to_spec(("cache_kv_heads",), (1,), mesh) == P(None)
    assert sharding.logical_to_spec(("lora_width",), (6,), mesh) == P("tensor")
    assert sharding.fit_spec(P(("data", "fsdp"), "tensor"), (2, 3), {"data": 2, "fsdp": 2, "tensor": 2}) == \
        P("data", None)
    # Flax's priority when two dimensions of one array ask for the same mesh axis: the earlier rule wins it whole
    rules = _rules_with(embed="tensor")
    assert sharding.logical_to_spec(("embed", "heads"), (16, 8), mesh, rules) == P("tensor", None)
    assert sharding.logical_to_spec(("heads", "embed"), (8, 16), mesh, rules) == P(None, "tensor")


def test_shardings_for_maps_with_flax_and_names_no_rule_as_an_error():
    mesh = mesh_lib.make_mesh(1, 4, 2)
    tree = {"w": np.zeros((16, 8)), "odd": np.zeros((6, 3)), "s": np.zeros(())}
    sh = sharding.shardings_for(tree, {"w": ("embed", "heads"), "odd": ("embed", "heads"), "s": ()}, mesh)
    assert (sh["w"].spec, sh["odd"].spec, sh["s"].spec) == (P("fsdp", "tensor"), P(None, None), P())
    with pytest.raises(ValueError, match="'embedding' of w has no rule"):
        sharding.shardings_for({"w": np.zeros((4,))}, {"w": ("embedding",)}, mesh)


def test_activations_follow_their_own_rules_not_the_weights():
    """The residual stream is constrained by 'activation_embed', never by the kernels' 'embed': a
    table that splits the weights' model width over tensor leaves the activations' whole, and one
    that splits only the activations' splits them alone (lowered program and parameter specs)."""
    from socialalign_jax.model import decoder
    from socialalign_jax.model.config import ModelConfig

    cfg = ModelConfig("llama", 64, 16, 40, 1, 4, 2, 4, qkv_bias=False)
    mesh = mesh_lib.make_mesh(4, 1, 2)
    params = jax.eval_shape(lambda: decoder.init_params(cfg, jax.random.PRNGKey(0)))
    ids = jax.ShapeDtypeStruct((8, 4), jnp.int32)

    def residual(rules):
        fwd = sharding.under_mesh(lambda p, x: decoder.forward(p, x, cfg).hidden, mesh, rules)
        return [c for c in _constraints(jax.jit(fwd).lower(params, ids).as_text()) if "tensor<8x4x16xf32>" in c]

    weights_split = _rules_with(embed="tensor", heads=None, kv_heads=None, mlp=None, vocab=None)
    assert model_axes.shardings(params, mesh, weights_split)["embed"]["embedding"].spec == P(None, "tensor")
    got = residual(weights_split)
    assert got and all('[{"data", "fsdp"}, {}, {}]' in c for c in got), got
    acts_split = _rules_with(embed=None, activation_embed="tensor")
    assert model_axes.shardings(params, mesh, acts_split)["embed"]["embedding"].spec == P("tensor", None)
    got = residual(acts_split)
    assert got and all('[{"data", "fsdp"}, {}, {"tensor"}]' in c for c in got), got


def test_logical_constraint_is_flax_with_the_fallback():
    """Outside `mesh_rules` nothing is constrained (no mesh or no rules in context); inside, a
    dimension that divides its axes gets Flax's constraint and one that does not the fallback."""
    import flax.linen as nn

    x = jnp.ones((8, 4, 2, 4))
    axes = ("activation_batch", "activation_length", "activation_kv_heads", None)
    assert sharding.logical_constraint(x, axes) is x
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
        assert sharding.logical_constraint(x, axes) is x  # rules but no mesh
    for shape, want in [((2, 2, 2), '[{"data", "fsdp"}, {}, {"tensor"}, {}]'),
                        ((1, 1, 8), '[{"data", "fsdp"}, {}, {}, {}]')]:  # 2 kv heads on tensor = 8: replicated
        mesh = mesh_lib.make_mesh(*shape)
        text = jax.jit(sharding.under_mesh(lambda a: sharding.logical_constraint(a * 2, axes), mesh)).lower(x).as_text()
        assert [want in c for c in _constraints(text)] == [True], text
    with pytest.raises(ValueError, match="'activation_embd' of activation has no rule"):
        jax.jit(sharding.under_mesh(lambda a: sharding.logical_constraint(a, ("activation_embd",) * 4),
                                    mesh_lib.make_mesh(8))).lower(x)
