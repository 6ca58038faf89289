"""The frozen base stays frozen, and only adapter-sized gradients and optimizer state exist."""

import jax
import jax.numpy as jnp
import numpy as np

from socialalign_jax.model import decoder, pac_lora
from socialalign_jax.model.presets import get_preset
from socialalign_jax.train import optim, step as step_lib


def _batch(cfg, b=4, s=24, k=3):
    rs = np.random.RandomState(0)
    ids = rs.randint(0, cfg.vocab_size, (b, s)).astype(np.int32)
    loss_mask = np.zeros((b, s), np.int32)
    loss_mask[:, 16:22] = 1
    return {
        "input_ids": ids, "attention_mask": np.ones((b, s), np.int32), "loss_mask": loss_mask,
        "user_end": np.full((b,), 5, np.int32), "news_end": np.full((b,), 10, np.int32),
        "prompt_len": np.full((b,), 16, np.int32), "label": np.array([0, 1, 2, -1], np.int32),
        "event_id": np.array([0, 0, 1, 1], np.int32), "example_mask": np.ones((b,), np.float32),
        "target_dist": np.tile(np.array([[0.2, 0.3, 0.5]], np.float32), (b, 1)),
    }


def _nbytes(tree):
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_step_leaves_base_bitwise_and_holds_only_adapter_state():
    cfg = get_preset("tiny-llama")
    lc = pac_lora.LoraConfig(targets=("q", "v", "down"), dropout=0.1)
    params = decoder.init_params(cfg, jax.random.PRNGKey(0))
    before = jax.tree.map(np.array, params)
    adapters = decoder.init_adapters(jax.random.PRNGKey(1), cfg, lc)
    opt, sched = optim.make_optimizer(optim.OptimConfig(lr=1e-2), total_steps=10)
    state = step_lib.init_train_state(adapters, opt)
    fn = jax.jit(step_lib.make_train_step(cfg, lc, step_lib.LossConfig(max_response_tokens=8), opt, sched))
    batch = _batch(cfg)

    # What the compiled step returns: the new state and scalar-ish metrics, nothing base-sized.
    out_shapes = jax.eval_shape(fn, params, state, batch, jax.random.PRNGKey(2))
    new_state_shapes, metrics_shapes = out_shapes
    adapter_bytes = _nbytes(adapters)
    assert _nbytes(new_state_shapes["adapters"]) == adapter_bytes
    # AdamW keeps two moments per adapter leaf (plus scalar counts): ~2x adapters, never base-sized.
    opt_bytes = _nbytes(new_state_shapes["opt_state"])
    assert 2 * adapter_bytes <= opt_bytes <= 2 * adapter_bytes + 1024
    assert _nbytes(metrics_shapes) < 4096
    adapter_shapes = {tuple(x.shape) for x in jax.tree.leaves(adapters)}
    for leaf in jax.tree.leaves(new_state_shapes["opt_state"]):
        assert leaf.ndim == 0 or tuple(leaf.shape) in adapter_shapes, leaf.shape

    # The gradient is taken w.r.t. the adapter tree only: its structure is the adapter tree's.
    grads = jax.grad(lambda a: step_lib.compute_loss(
        a, params, batch, jax.random.PRNGKey(3), model_cfg=cfg, lora_cfg=lc,
        loss_cfg=step_lib.LossConfig(max_response_tokens=8), deterministic=True)[0])(adapters)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)

    new_state = state
    for i in range(2):
        new_state, m = fn(params, new_state, batch, jax.random.PRNGKey(4 + i))
        assert np.isfinite(float(m["loss"]))
    for path, (a, b) in zip(jax.tree_util.tree_leaves_with_path(before),
                            zip(jax.tree.leaves(before), jax.tree.leaves(jax.tree.map(np.array, params)))):
        assert np.array_equal(a, b), f"base param {jax.tree_util.keystr(path[0])} changed"
    # ... while the adapters did move (B starts at zero and receives gradient).
    b0 = np.asarray(adapters["layers"]["attn"]["q"]["B"])
    b1 = np.asarray(new_state["adapters"]["layers"]["attn"]["q"]["B"])
    assert not np.array_equal(b0, b1)
