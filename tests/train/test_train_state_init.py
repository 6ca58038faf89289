"""The train state is created already sharded (step.sharded_train_state) and holds what a host init holds.

The trainer jits the init with the state's shardings as out_shardings instead of initialising on
one device and moving the tree: the adapters (and optimizer state) must still be, bit for bit,
`decoder.init_adapters(PRNGKey(seed), ...)`, so a run's starting point does not depend on the
mesh or on this change, and each leaf must already sit in the layout the train step expects.
"""

import jax
import numpy as np
import pytest

from socialalign_jax.model import axes as model_axes, decoder
from socialalign_jax.model.presets import get_preset
from socialalign_jax.parallel.mesh import make_mesh
from socialalign_jax.train import optim, step as step_lib

from tests.train_helpers import typed_config

SEED = 3


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_init_equals_host_init(shape):
    cfg = typed_config(**{"lora.targets": "q,k,v,o,gate,up,down"})
    mcfg, lc = get_preset("tiny-qwen2"), cfg.lora
    n = int(np.prod(shape))
    mesh = make_mesh(*shape, devices=jax.devices()[:n])
    optimizer, _ = optim.make_optimizer(cfg.optim, 10)

    abstract, create = step_lib.sharded_train_state(SEED, mcfg, lc, optimizer, mesh)
    state = create()
    host = step_lib.init_train_state(decoder.init_adapters(jax.random.PRNGKey(SEED), mcfg, lc), optimizer)

    want_sh = model_axes.shardings(host, mesh, strict=False)
    got, want = jax.tree_util.tree_leaves_with_path(state), jax.tree_util.tree_leaves_with_path(host)
    assert [p for p, _ in got] == [p for p, _ in want]
    split = 0
    for (path, x), (_, y), a, s in zip(got, want, jax.tree.leaves(abstract), jax.tree.leaves(want_sh)):
        where = jax.tree_util.keystr(path)
        assert x.shape == y.shape == a.shape and x.dtype == y.dtype == a.dtype, where
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=where)  # bit-identical
        assert x.sharding.is_equivalent_to(s, x.ndim), (where, x.sharding, s)  # created in its layout
        assert a.sharding == s, where  # the restore target and the step's shardings are that layout
        split += not x.sharding.is_fully_replicated
    # The adapters were drawn with values (A, gates, head are random; B is zero) ...
    assert any(np.abs(np.asarray(v)).max() > 0 for v in jax.tree.leaves(state["adapters"]))
    # ... and on a mesh with fsdp or tensor > 1 some leaves are really split across devices.
    assert (split > 0) == (shape[1] * shape[2] > 1), split
