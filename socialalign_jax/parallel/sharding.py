"""Logical axis names for every array the trainer holds, and their mapping to the mesh.

Arrays are annotated with logical names ('embed', 'heads', ...) that say what a dimension
IS; a rules table (maxtext style) says where each name lives on the mesh. Changing the
parallelism layout then means editing the rules, not the model. The base model follows
FSDP on 'embed' + tensor parallelism on heads / MLP / vocab; adapters are replicated over
experts and rank, and split on their model-side dimensions like their base kernel on 'embed'
and over tensor x fsdp where the base kernel is tensor-parallel ('lora_width').
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from socialalign_jax.parallel.axis_rules import LOGICAL_RULES

log = logging.getLogger(__name__)


def key_name(k) -> str:
    """The name of one pytree path entry (dict key, attribute or index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    """A pytree path as 'a/b/c' for messages."""
    return "/".join(key_name(k) for k in path)


def _rules_dict(rules) -> dict:
    return dict(rules if rules is not None else LOGICAL_RULES)


def _as_tuple(x) -> tuple[str, ...]:
    if x is None:
        return ()
    return (x,) if isinstance(x, str) else tuple(x)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=None,
                    where: str = "") -> P:
    """PartitionSpec for one array. A dimension whose size is not divisible by the product
    of its mesh axes falls back to the longest divisible prefix of those axes (finally
    replication), logged at debug level; a mesh axis already used by an earlier dimension
    is not reused."""
    table = _rules_dict(rules)
    used: set[str] = set()
    spec = []
    for dim, (name, size) in enumerate(zip(axes, shape)):
        if name is not None and name not in table:
            raise ValueError(f"sharding: logical axis {name!r} of {where or 'array'} has no rule; "
                             f"known: {sorted(table)}")
        want = tuple(a for a in _as_tuple(table.get(name)) if a not in used)
        got = want
        while got and size % int(np.prod([mesh.shape[a] for a in got])):
            got = got[:-1]
        if got != want:
            log.debug("sharding: %s dim %d (%s, size %d) is not divisible by mesh axes %s; using %s",
                      where or "array", dim, name, size, want, got or "replication")
        used.update(got)
        spec.append(None if not got else (got[0] if len(got) == 1 else got))
    return P(*spec)


def shardings_for(tree, logical, mesh: Mesh, rules=None):
    """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs).

    `logical`: a matching tree of logical-axis tuples. For the model's own trees (params,
    adapters, optimizer states) that is `model.axes.logical_axes`; `model.axes.shardings`
    does both steps.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    axes_leaves = treedef.flatten_up_to(logical)
    out = [NamedSharding(mesh, logical_to_spec(ax, np.shape(x) if not hasattr(x, "shape") else x.shape,
                                               mesh, rules, path_str(path)))
           for (path, x), ax in zip(leaves, axes_leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


def batch_axes(rules=None) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over (the 'batch' rule; default data, fsdp)."""
    return _as_tuple(_rules_dict(rules).get("batch"))


def batch_shards(mesh: Mesh, rules=None) -> int:
    """How many ways the global batch is split: the product of the batch axes' sizes."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(rules)]))


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
    """Leading (batch) dimension over the 'batch' rule's axes, everything else replicated.
    The global batch size must be divisible by their product (see `check_batch_divisible`)."""
    axes = batch_axes(rules)
    return NamedSharding(mesh, P(axes if axes else None))


def check_batch_divisible(batch_size: int, mesh: Mesh, rules=None) -> None:
    n = batch_shards(mesh, rules)
    if batch_size % n:
        raise ValueError(f"sharding: global batch size {batch_size} is not divisible by "
                         f"{' x '.join(batch_axes(rules))} = {n}; pad the batch with example_mask = 0 rows")


# The mesh (and rules) that activations are constrained to while a step is traced; None
# outside `activation_sharding`. A context rather than an argument threaded through the model,
# as Flax's `nn.with_logical_constraint` reads the mesh and `nn.logical_axis_rules` from context:
# the call sites in model/decoder.py name logical axes only, and carry over to Flax unchanged.
_ACTIVATION_MESH: contextvars.ContextVar = contextvars.ContextVar("socialalign_activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=None):
    """Within this block (at trace time), `logical_constraint` pins activations to `mesh` (None: to
    nothing, e.g. for an abstract init traced without any step's mesh)."""
    token = _ACTIVATION_MESH.set(None if mesh is None else (mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def under_mesh(fn, mesh: Mesh, rules=None):
    """fn traced inside `activation_sharding(mesh, rules)`: wrap a step before jax.jit.

    The context is read while jit traces `fn`, so the constraints are baked into the compiled
    program for this mesh. Backend choices are not made here: the configs are resolved for the
    mesh's platform before the step is built (model/backend.py).
    """
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)
    return wrapped


def logical_constraint(x, axes: Sequence[str | None], mesh: Mesh | None = None, rules=None):
    """with_sharding_constraint by logical names (for activations inside jit).

    mesh/rules default to the enclosing `activation_sharding` context; with neither, x is
    returned unchanged (single-device code paths carry no constraint). Dimensions not
    divisible by their mesh axes fall back as in `logical_to_spec`.
    """
    if mesh is None:
        ctx = _ACTIVATION_MESH.get()
        if ctx is None:
            return x
        mesh, ctx_rules = ctx
        rules = ctx_rules if rules is None else rules
    if len(axes) != x.ndim:
        raise ValueError(f"sharding: constraint axes {tuple(axes)} do not match an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))
