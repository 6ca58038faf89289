"""Sharding by logical axis names: Flax's logical API, plus the little it lacks.

Arrays are annotated with logical names that say what a dimension IS; the rules table
(parallel/axis_rules.py, data a config overrides) says where each name lives on the mesh.
Weights, activations and data have names of their own ('embed' for a kernel's model width,
'activation_embed' for the residual stream's, 'batch' for the input rows), so a rule for one
never moves another. Flax does the mapping:
- `nn.get_partition_spec` reads the names from the boxed variables (model/axes.py);
- `nn.logical_to_mesh_sharding` / `nn.logical_to_mesh_axes` map them by the rules: in table
  order, a rule gives a dimension all its mesh axes if none of them is taken by an earlier
  rule of the same array, else the dimension stays replicated;
- `nn.with_logical_constraint` pins activations inside a traced step, by the rules of
  `nn.logical_axis_rules` and the mesh in context; `under_mesh` binds both to a step function.

What Flax lacks, and this module adds:
- the divisibility fallback (`fit_spec`): a dimension whose size is not divisible by the
  product of its mesh axes keeps the longest divisible prefix of them (finally replication),
  logged at debug level, so one table serves every model size (two KV heads on tensor = 4, a
  batch of 2 on data x fsdp = 4). It adjusts the spec after Flax computes it;
- a logical name without a rule is an error, not silent replication (a typo in a declaration
  or a config);
- the batch's sharding (`batch_sharding`: the 'batch' rule on the leading dimension) and the
  check that the global batch divides it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Mapping, Sequence

import flax.linen as nn
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


def _rules(rules) -> tuple:
    return tuple(rules) if rules is not None else LOGICAL_RULES


def _as_tuple(x) -> tuple[str, ...]:
    if x is None:
        return ()
    return (x,) if isinstance(x, str) else tuple(x)


def _check_names(axes: Sequence[str | None], rules, where: str) -> None:
    known = {name for name, _ in rules}
    for name in axes:
        if name is not None and name not in known:
            raise ValueError(f"sharding: logical axis {name!r} of {where or 'array'} has no rule; "
                             f"known: {sorted(known)}")


def fit_spec(spec: P, shape: Sequence[int], mesh_shape: Mapping[str, int], where: str = "") -> P:
    """`spec` with every dimension's mesh axes cut to the longest prefix whose product divides
    the dimension's size (finally replication): the fallback Flax does not have."""
    out = []
    for dim, (axes, size) in enumerate(zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape)):
        want = _as_tuple(axes)
        got = want
        while got and size % int(np.prod([mesh_shape[a] for a in got])):
            got = got[:-1]
        if got != want:
            log.debug("sharding: %s dim %d (size %d) is not divisible by mesh axes %s; using %s",
                      where or "array", dim, size, want, got or "replication")
        out.append(None if not got else (got[0] if len(got) == 1 else got))
    return P(*out)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh, rules=None, where: str = "") -> P:
    """PartitionSpec of one array: Flax's `nn.logical_to_mesh_axes` by the rules (default
    `LOGICAL_RULES`), then `fit_spec` to its shape on `mesh` (a Mesh or an AbstractMesh)."""
    rules = _rules(rules)
    _check_names(axes, rules, where)
    return fit_spec(nn.logical_to_mesh_axes(tuple(axes), rules), shape, mesh.shape, where)


def shardings_for(tree, logical, mesh: Mesh, rules=None):
    """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs).

    `logical`: a matching tree of logical-axis tuples (`model.axes.logical_axes` for the model's
    trees, `decoder.cache_axes` for the KV cache). `nn.logical_to_mesh_sharding` maps them by the
    rules; `fit_spec` then fits each to its leaf's shape.
    """
    rules = _rules(rules)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    axes_leaves = treedef.flatten_up_to(logical)
    for (path, _), ax in zip(leaves, axes_leaves):
        _check_names(ax, rules, path_str(path))
    flax_sh = nn.logical_to_mesh_sharding([P(*ax) for ax in axes_leaves], mesh, rules)
    out = [NamedSharding(mesh, fit_spec(s.spec, np.shape(x) if not hasattr(x, "shape") else x.shape, mesh.shape,
                                        path_str(path)))
           for (path, x), s in zip(leaves, flax_sh)]
    return jax.tree_util.tree_unflatten(treedef, out)


def batch_axes(rules=None) -> tuple[str, ...]:
    """The mesh axes the batch's rows are split over (the 'batch' rule; default data, fsdp)."""
    return _as_tuple(nn.logical_to_mesh_axes(("batch",), _rules(rules))[0])


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


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules=None):
    """Flax's logical rules (`nn.logical_axis_rules`) and `mesh` (as JAX's abstract mesh) in context:
    what `nn.with_logical_constraint` reads. Enter it where a program is traced (`under_mesh`)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(_rules(rules)):
        yield


def under_mesh(fn, mesh: Mesh, rules=None):
    """fn traced inside `mesh_rules(mesh, rules)`: wrap a step before jax.jit.

    The context is entered inside the traced function, so the constraints are baked into the
    program of this jax.jit object and of no other. Backend choices are not made here: the
    configs are resolved for the mesh's platform before the step is built (model/backend.py).
    """
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with mesh_rules(mesh, rules):
            return fn(*args, **kwargs)
    return wrapped


def logical_constraint(x, axes: Sequence[str | None]):
    """`nn.with_logical_constraint(x, axes)`, with the divisibility fallback.

    Under `mesh_rules` (a step traced by `under_mesh`) x is pinned to the rules' layout; with no
    rules or no mesh in context (single-device code paths) it is returned unchanged, as Flax's is.
    A dimension not divisible by its mesh axes gets `fit_spec`'s layout instead of an error.
    """
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"sharding: constraint axes {tuple(axes)} do not match an array of shape {x.shape}")
    _check_names(axes, rules, "activation")
    want = nn.logical_to_mesh_axes(tuple(axes), rules)
    got = fit_spec(want, x.shape, mesh.shape, f"activation {tuple(axes)}")
    if got == want:
        return nn.with_logical_constraint(x, tuple(axes))
    return jax.lax.with_sharding_constraint(x, got)
