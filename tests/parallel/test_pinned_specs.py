"""Every PartitionSpec of the tiny models on a few meshes, pinned.

pinned_specs.json was written by this file (`python -m tests.parallel.test_pinned_specs --write`)
from the code as it stood before sharding moved onto Flax's logical API (issue #28, item 4):
parameters, adapters, optimizer state (AdamW), the KV cache and the batch, on
five meshes with the default rules, and on one with a config's override; and the shardings that
the activation constraints of a traced forward and a cached decode step ask for. The test
recomputes them with today's code and compares, so a change in the layout of any array shows up
here as a named difference.
"""

from __future__ import annotations

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

from socialalign_jax.model import axes as model_axes
from socialalign_jax.model import decoder
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.model.presets import get_preset
from socialalign_jax.parallel import axis_rules, sharding
from socialalign_jax.parallel.mesh import make_mesh
from socialalign_jax.train import step as step_lib

PINNED = os.path.join(os.path.dirname(__file__), "pinned_specs.json")

MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 8, 1), (1, 1, 8)]
# A config's mesh.rules override (the one tests/train/test_train_sharding.py trains with).
OVERRIDE = {"embed": "", "mlp": "tensor,fsdp", "batch": "data"}
MODELS = {"tiny-qwen2": get_preset("tiny-qwen2"), "tiny-llama": get_preset("tiny-llama")}
LC = LoraConfig(routing="pooled", rank=2, gate_width=4)  # every target; pooled: the cache's gate entries too
CACHE_ROWS = (8, 2)  # 2 rows are not divisible by data x fsdp on most meshes (the fallback)
CACHE_SLOTS = 24


def _spec(s) -> list:
    return [None if a is None else (a if isinstance(a, str) else list(a)) for a in s.spec]


def _flat(tree) -> dict[str, list]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return {jax.tree_util.keystr(p): _spec(s) for p, s in leaves}


def tree_specs(mesh_shape, rules=None) -> dict:
    mesh = make_mesh(*mesh_shape)
    out = {}
    for name, cfg in MODELS.items():
        params = jax.eval_shape(lambda cfg=cfg: decoder.init_params(cfg, jax.random.PRNGKey(0)))
        adapters = jax.eval_shape(lambda cfg=cfg: decoder.init_adapters(jax.random.PRNGKey(1), cfg, LC))
        state = jax.eval_shape(lambda a=adapters: step_lib.init_train_state(a, optax.adamw(1e-3)))
        out[f"{name}/params"] = _flat(model_axes.shardings(params, mesh, rules))
        out[f"{name}/adapters"] = _flat(model_axes.shardings(adapters, mesh, rules))
        out[f"{name}/state"] = _flat(model_axes.shardings(state, mesh, rules, strict=False))
        for rows in CACHE_ROWS:
            cache = jax.eval_shape(lambda cfg=cfg, rows=rows: decoder.init_cache(cfg, rows, CACHE_SLOTS, LC))
            logical = decoder.cache_axes(cfg, rows, CACHE_SLOTS, LC)
            out[f"{name}/cache{rows}"] = _flat(sharding.shardings_for(cache, logical, mesh, rules))
    out["batch"] = _spec(sharding.batch_sharding(mesh, rules))
    return out


_CONSTRAINT = re.compile(r"sdy\.sharding_constraint %\S+ <@\w+, (\[.*\])> : (tensor<[^>]*>)")


def _constraints(text: str) -> list[str]:
    """'tensor<...> [dims]' of every sharding constraint in a lowered program (the mesh's name dropped)."""
    out = []
    for line in text.splitlines():
        if "sharding_constraint" not in line:
            continue
        m = _CONSTRAINT.search(line)
        assert m, line
        out.append(f"{m.group(2)} {m.group(1)}")
    return sorted(set(out))


def activation_specs(mesh_shape) -> dict:
    """The distinct constraints of a forward (B 8, S 4) and of a cached one-token decode step."""
    mesh = make_mesh(*mesh_shape)
    cfg = MODELS["tiny-llama"]
    lc = LoraConfig(rank=2, gate_width=4, targets=("q", "v", "down"))
    params = jax.eval_shape(lambda: decoder.init_params(cfg, jax.random.PRNGKey(0)))
    adapters = jax.eval_shape(lambda: decoder.init_adapters(jax.random.PRNGKey(1), cfg, lc))
    ids = jax.ShapeDtypeStruct((8, 4), jnp.int32)

    def fwd(p, a, x):
        return decoder.forward(p, x, cfg, adapters=a, lora_cfg=lc).logits

    def decode(p, a, x):
        cache = decoder.init_cache(cfg, 8, CACHE_SLOTS, lc)
        out = decoder.forward(p, x, cfg, adapters=a, lora_cfg=lc, cache=cache, logits_at=None)
        return decoder.forward(p, x[:, :1], cfg, adapters=a, lora_cfg=lc, cache=out.cache).logits

    return {name: _constraints(jax.jit(sharding.under_mesh(fn, mesh)).lower(params, adapters, ids).as_text())
            for name, fn in (("forward", fwd), ("decode", decode))}


LAYOUTS = [(str(m), m, None) for m in MESHES] + [("(2, 2, 2) override", (2, 2, 2), OVERRIDE)]


def _by_leaf(layouts) -> dict[str, list]:
    """{'model/tree/path': [its spec under each layout]}: every leaf once, its specs side by side."""
    out: dict[str, list] = {}
    for _, mesh_shape, override in layouts:
        rules = None if override is None else axis_rules.from_config_strings(override)
        for group, leaves in tree_specs(mesh_shape, rules).items():
            if group == "batch":
                out.setdefault("batch", []).append(leaves)
                continue
            for path, spec in leaves.items():
                out.setdefault(f"{group}{path}", []).append(spec)
    return json.loads(json.dumps(out))


def all_specs() -> dict:
    return {"layouts": [name for name, _, _ in LAYOUTS], "trees": _by_leaf(LAYOUTS),
            "activations": {str(m): json.loads(json.dumps(activation_specs(m))) for m in ((2, 2, 2), (1, 1, 8))}}


@pytest.fixture(scope="module")
def pinned():
    with open(PINNED, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[name for name, _, _ in LAYOUTS])
def test_tree_specs_unchanged(pinned, layout):
    """Parameters, adapters, optimizer state, the KV cache (8 and 2 rows) and the batch."""
    i = pinned["layouts"].index(layout[0])
    got = _by_leaf([layout])
    assert set(got) == set(pinned["trees"])
    for leaf, specs in pinned["trees"].items():
        assert got[leaf][0] == specs[i], f"{layout[0]}: {leaf}"


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 1, 8)])
def test_activation_constraints_unchanged(pinned, mesh_shape):
    got = json.loads(json.dumps(activation_specs(mesh_shape)))
    assert got == pinned["activations"][str(mesh_shape)]


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: python -m tests.parallel.test_pinned_specs --write  (run under tests/conftest.py's 8 devices)")
    specs = all_specs()

    def one(v):
        return json.dumps(v, separators=(",", ":"))

    lines = ['{"layouts": ' + one(specs["layouts"]) + ",", '"activations": ' + one(specs["activations"]) + ",",
             '"trees": {']
    lines += [f"{one(k)}: {one(v)}," for k, v in sorted(specs["trees"].items())]
    lines[-1] = lines[-1].rstrip(",")
    with open(PINNED, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n}}\n")
    assert json.load(open(PINNED, encoding="utf-8")) == specs
    print(f"wrote {PINNED}")
