"""The default logical axis rules: what each logical dimension name maps to on the mesh.

Pure data, importable without jax, because the config declares its `mesh.rules` from it
(configs/weibo.py): the rules are then config data a user overrides per run, maxtext-style
(`--config.mesh.rules.embed=` replicates the weights' embedding dimension for pure data
parallelism; `--config.mesh.rules.mlp=tensor,fsdp` shards the MLP kernels' width over two
axes), and this table is their one declaration. `parallel/sharding.py` applies them with
Flax's logical API (`nn.logical_to_mesh_sharding`, `nn.with_logical_constraint`).

Three kinds of names, each with rules of its own, so that a rule for one never moves another:
- data: 'batch' and 'length', the rows and positions of what a step is fed and keeps between
  calls (the input batch, `sharding.batch_sharding`; the KV cache's rows and slots);
- activations ('activation_*', maxtext's names): what the model computes inside a step,
  pinned at layer boundaries by model/modules.py's constraints (their defaults are the layout
  the weight names gave them before they had their own: the batch over data x fsdp, the
  residual stream's width replicated, heads / MLP / vocabulary over tensor);
- weights: the declared variables of model/modules.py, and 'cache_kv_heads' for the cache.
In Flax's order, the first rule that names a dimension of an array takes its mesh axes whole;
a later dimension of the same array that asks for a taken axis is replicated.
"""

from __future__ import annotations

from typing import Any

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated)
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # data: the input batch's rows (`sharding.batch_sharding`); the KV cache's rows and slots
    ("batch", ("data", "fsdp")),
    ("length", None),
    # activations (model/modules.py's ACT* constraints, the KV cache's per-layer slices)
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # weights
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    # An adapter dimension whose base counterpart is tensor-parallel (heads, kv_heads, mlp): B of
    # q/k/v/gate/up, A and the gates' w1 of o/down. Also over fsdp, so that adapters and their
    # optimizer state are split over every chip when tensor = 1 (replicated, they cost ~1 GiB
    # per chip at 7B); the base kernels keep their layout. Not divisible: falls back to tensor.
    ("lora_width", ("tensor", "fsdp")),
    ("layers", None),
    ("experts", None),
    ("rank", None),
    ("gate", None),
    ("classes", None),
    ("norm", None),
    # the KV cache's heads (k, v [L, B, Hkv, T, Dh]): as the k/v activations written into it
    ("cache_kv_heads", "tensor"),
)


def as_config_strings(rules=LOGICAL_RULES) -> dict[str, str]:
    """{name: 'axis[,axis]'} ('' = replicated): the rules as a config section holds them."""
    def one(axes):
        if axes is None:
            return ""
        return axes if isinstance(axes, str) else ",".join(axes)
    return {name: one(axes) for name, axes in rules}


def from_config_strings(section) -> tuple[tuple[str, Any], ...]:
    """The rules a config's `mesh.rules` section gives (None or absent: the defaults).

    Every name must be a known logical axis and every axis a mesh axis, used at most once per
    rule; a problem raises ValueError naming `mesh.rules.<name>`.
    """
    if section is None:
        return LOGICAL_RULES
    given = dict(section.items() if hasattr(section, "items") else section)
    known = dict(LOGICAL_RULES)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"mesh.rules.{unknown[0]}: not a logical axis (known: {', '.join(known)})")
    out = []
    for name, default in LOGICAL_RULES:
        if name not in given:
            out.append((name, default))
            continue
        value = given[name]
        axes = tuple(a.strip() for a in (value if isinstance(value, (list, tuple)) else str(value or "").split(","))
                     if a and a.strip())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"mesh.rules.{name}={value!r}: {bad[0]!r} is not a mesh axis ({', '.join(MESH_AXES)})")
        if len(set(axes)) != len(axes):
            raise ValueError(f"mesh.rules.{name}={value!r}: a mesh axis appears twice")
        out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(out)
