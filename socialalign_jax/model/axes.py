"""The logical axes of every array the model owns, read from its declarations, and their shardings.

Each variable is declared once, in model/modules.py, with `nn.with_logical_partitioning`. This
module reads those declarations back, so that the base tree, the adapter tree and any tree
that nests them (optimizer states, accumulators) can be laid out on a mesh without a second,
hand-written table. How a logical name maps to mesh axes is parallel/ (the rules); what each
dimension of a model array *is* lives here, with the model.
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, PartitionSpec as P

from socialalign_jax.model import decoder
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.parallel import sharding

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def declared_axes() -> dict[tuple[str, ...], tuple]:
    """Path -> logical axes of every variable the model declares, `params` and `lora` alike.

    Read with `nn.get_partition_spec` from the boxed abstract init (`jax.eval_shape`) of the
    Flax model. The declarations do not depend on sizes, so one tiny configuration that has
    every variable (Qwen2 q/k/v biases, an untied LM head, every adapter target, the sentiment
    head) covers all models.
    """
    cfg = ModelConfig("qwen2", 8, 4, 8, 1, 2, 1, 2, qkv_bias=True, tie_embeddings=False)
    lc = LoraConfig(num_analyze=1, num_compose=1, rank=1, gate_width=1, num_classes=1)
    with nn.logical_axis_rules(()):  # the abstract init carries no activation constraint
        specs = nn.get_partition_spec(decoder.init_boxed(cfg, lc))
    table = {}
    for col in specs.values():
        for path, spec in jax.tree_util.tree_flatten_with_path(col, is_leaf=lambda x: isinstance(x, P))[0]:
            table[tuple(sharding.key_name(k) for k in path)] = tuple(spec)
    return table


def _axes_for_path(names: Sequence[str]):
    """Logical axes of one leaf: the declaration whose path is the longest tail of `names`, or None.

    Matching on the tail lets the same function annotate optimizer states (adam mu/nu,
    MultiSteps accumulators), whose leaves sit under extra prefixes.
    """
    table = declared_axes()
    names = tuple(names)
    for start in range(len(names)):
        axes = table.get(names[start:])
        if axes is not None:
            return axes
    return None


def logical_axes(tree, *, strict: bool = True):
    """Tree of logical-axis tuples, one per leaf, for the base tree, the adapter tree, or
    anything that nests them (optimizer states), from the model's declarations
    (`declared_axes`). Scalars get (). A leaf the model does not declare raises (strict) or is
    replicated with a debug log (strict=False); a declared one whose rank differs raises.
    """
    def one(path, leaf):
        ndim = np.ndim(leaf) if not hasattr(leaf, "ndim") else leaf.ndim
        if ndim == 0:
            return ()
        axes = _axes_for_path([sharding.key_name(k) for k in path])
        where = sharding.path_str(path)
        if axes is not None and len(axes) != ndim:
            raise ValueError(f"sharding: leaf {where} has shape {tuple(np.shape(leaf))} but its layout "
                             f"{axes} has {len(axes)} axes")
        if axes is None:
            if strict:
                raise ValueError(f"sharding: no logical axes known for leaf {where} (shape "
                                 f"{tuple(np.shape(leaf))}); the model (model.modules) declares no such variable")
            log.debug("sharding: %s (shape %s) is not a known param; replicating", where, np.shape(leaf))
            return (None,) * ndim
        return axes

    return jax.tree_util.tree_map_with_path(one, tree)


def shardings(tree, mesh: Mesh, rules=None, *, strict: bool = True):
    """NamedSharding for every leaf of a model tree (params, adapters, optimizer state; arrays or
    ShapeDtypeStructs): `logical_axes` mapped by the rules with Flax's `nn.logical_to_mesh_sharding`
    and fitted to each leaf's shape (`sharding.shardings_for`)."""
    return sharding.shardings_for(tree, logical_axes(tree, strict=strict), mesh, rules)
