"""Model fixtures shared by the model tests."""

import jax
import jax.numpy as jnp
import numpy as np

from socialalign_jax.model import decoder


def lively_adapters(cfg, lc, seed: int = 0):
    """init_adapters with random B (so the adapters change the output: B starts at 0) and gates
    sharpened 4x (so which expert a token is routed to changes it too)."""
    ad = decoder.init_adapters(jax.random.PRNGKey(seed), cfg, lc)
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        if "B" in names:
            return jnp.asarray(rng.normal(0, 0.3, leaf.shape), jnp.float32)
        if "w1" in names or "w2" in names:
            return 4.0 * leaf
        return leaf

    return jax.tree_util.tree_map_with_path(perturb, ad)
