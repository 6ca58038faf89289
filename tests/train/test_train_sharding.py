"""The train step does not depend on the mesh: 2x2x2 and 8x1x1 match one device.

The step is traced under `sharding.under_mesh` (Flax's axis rules and the mesh in context), so
the activation sharding constraints of model/modules.py are in the compiled program
(test_activation_constraints_in_the_program checks that).

Three steps of the real jitted step (dropout on, same rng, event-grouped batches from the
built sample) on each mesh; the losses and the updated adapters (and Adam moments) must
equal the single-device run to 1e-5. A sharding-dependent random stream (dropout bits
drawn per shard) or a macro loss computed per shard would break this.
"""

import jax
import numpy as np
import pytest

from socialalign_jax.data import tfds_builders as B
from socialalign_jax.data.pipeline import BatchConfig, TrainIterator
from socialalign_jax.model import decoder
from socialalign_jax.model.presets import get_preset
from socialalign_jax.model import axes as model_axes
from socialalign_jax.parallel import sharding
from socialalign_jax.parallel.mesh import make_mesh
from socialalign_jax.runs import restore
from socialalign_jax.runs.run_config import as_run_config
from socialalign_jax.train import optim, step as step_lib

from tests.train_helpers import MAX_LENGTH, built_sample, tiny_config

N_STEPS = 3


@pytest.fixture(scope="module")
def setup():
    cfg = as_run_config(tiny_config(built_sample(), **{"lora.targets": "q,v,down", "loss.max_response_tokens": 24}))
    ds = B.open_dataset(cfg.data.data_dir)
    bcfg = BatchConfig(events_per_batch=2, cases_per_event=4, seq_len=MAX_LENGTH, pad_id=ds.pad_id,
                       num_classes=3, seed=0, read_threads=1, prefetch=1)
    it = TrainIterator(ds.source("train"), bcfg, process_index=0, process_count=1)
    # A 512-token vocabulary keeps the step cheap; ids are folded into it (content is irrelevant here).
    mcfg = get_preset("tiny-qwen2").replace(vocab_size=512)
    batches = [dict(b, input_ids=b["input_ids"] % 512) for b in (next(it) for _ in range(N_STEPS))]
    params = decoder.init_params(mcfg, jax.random.PRNGKey(0))
    lc = cfg.lora
    assert lc.dropout > 0  # dropout on: its random bits must not depend on the sharding
    adapters = decoder.init_adapters(jax.random.PRNGKey(1), mcfg, lc)
    # B = 0 at init would make the first step's A-gradients vanish: give B values.
    rs = np.random.default_rng(0)
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: rs.normal(0, 0.02, x.shape).astype(np.float32) if p[-1].key == "B" else np.asarray(x),
        adapters)
    optimizer, schedule = optim.make_optimizer(cfg.optim, N_STEPS)
    fn = step_lib.make_train_step(mcfg, lc, cfg.loss, optimizer, schedule)
    return dict(batches=batches, params=params, adapters=adapters, optimizer=optimizer, fn=fn)


def run_on(mesh, s, rules=None):
    state = step_lib.init_train_state(s["adapters"], s["optimizer"])
    state_sh = model_axes.shardings(state, mesh, rules, strict=False)
    param_sh = model_axes.shardings(s["params"], mesh, rules)
    batch_sh = sharding.batch_sharding(mesh, rules)
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # Traced under the mesh as train.loop does: model/decoder.py's activation constraints are live here.
    step = jax.jit(sharding.under_mesh(s["fn"], mesh, rules), in_shardings=(param_sh, state_sh, batch_sh, repl),
                   out_shardings=(state_sh, repl))
    params = jax.device_put(s["params"], param_sh)
    state = jax.device_put(state, state_sh)
    rng = jax.device_put(jax.random.PRNGKey(7), repl)
    losses = []
    for b in s["batches"]:
        batch = {k: jax.device_put(v, batch_sh) for k, v in b.items()}
        state, metrics = step(params, state, batch, rng)
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state), step


@pytest.fixture(scope="module")
def single(setup):
    return run_on(make_mesh(1, 1, 1, devices=jax.devices()[:1]), setup)


@pytest.mark.parametrize("shape", [(2, 2, 2), (8, 1, 1)])
def test_mesh_matches_single_device(setup, single, shape):
    assert len(jax.devices()) == 8
    mesh = make_mesh(*shape)
    losses, state, _ = run_on(mesh, setup)
    ref_losses, ref_state, _ = single
    assert np.all(np.isfinite(ref_losses))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    flat = jax.tree_util.tree_leaves_with_path(state)
    ref = dict((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(ref_state))
    for p, v in flat:
        np.testing.assert_allclose(np.asarray(v), np.asarray(ref[jax.tree_util.keystr(p)]), rtol=1e-5, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(p))
    # the adapters did move (the comparison is not between two initial states)
    moved = np.abs(np.asarray(state["adapters"]["layers"]["attn"]["q"]["A"]) - setup["adapters"]["layers"]["attn"]["q"]["A"])
    assert moved.max() > 1e-4


def test_activation_constraints_in_the_program(setup):
    """The lowered 2x2x2 step pins activations: batch over (data, fsdp), heads/mlp/vocab over tensor."""
    mesh = make_mesh(2, 2, 2)
    _, _, step = run_on(mesh, setup)
    state = step_lib.init_train_state(setup["adapters"], setup["optimizer"])
    b = setup["batches"][0]
    text = step.lower(setup["params"], state, b, jax.random.PRNGKey(7)).as_text()
    constraints = [ln for ln in text.splitlines() if "sharding_constraint" in ln]
    assert len(constraints) >= 10
    joined = "\n".join(constraints)
    assert '[{"data", "fsdp"}, {}, {}]' in joined  # residual stream [B, S, D]
    assert '[{"data", "fsdp"}, {}, {"tensor"}]' in joined  # mlp activations [B, S, F], logits [B, R, V]
    assert '[{"data", "fsdp"}, {}, {"tensor"}, {}]' in joined  # q [B, S, H, Dh]
    # outside the mesh context the same function carries none (single-device paths are untouched)
    plain = jax.jit(setup["fn"]).lower(setup["params"], state, b, jax.random.PRNGKey(7)).as_text()
    assert "sharding_constraint" not in plain


def test_axis_rules_from_the_config_move_weights_and_activations(setup, single):
    """config mesh.rules is data: replicate 'embed' (no FSDP), split the MLP width over tensor and
    fsdp, and the batch over data alone, for the weights and the input batch; the activations have
    rules of their own (activation_*), moved alike here. The parameters, the batch and the
    activations in the compiled program follow those rules, and the step still equals one device.
    The weight rules alone leave the activations where they were."""
    cfg = tiny_config()
    assert restore.mesh_rules(as_run_config(cfg)) == sharding.LOGICAL_RULES  # the defaults are the declared table
    cfg.mesh.rules.embed = ""
    cfg.mesh.rules.mlp = "tensor,fsdp"
    cfg.mesh.rules.batch = "data"
    weights_only = restore.mesh_rules(as_run_config(cfg))
    cfg.mesh.rules.activation_mlp = "tensor,fsdp"
    cfg.mesh.rules.activation_batch = "data"
    rules = restore.mesh_rules(as_run_config(cfg))
    mesh = make_mesh(2, 2, 2)
    params_sh = model_axes.shardings(setup["params"], mesh, rules)
    assert tuple(params_sh["embed"]["embedding"].spec) == ("tensor", None)  # [V, D]: vocab over tensor, embed replicated
    up = params_sh["layers"]["mlp"]["up"]["kernel"].spec  # [L, D, F]
    assert tuple(up) == (None, None, ("tensor", "fsdp"))
    assert tuple(sharding.batch_sharding(mesh, rules).spec) == ("data",)

    losses, state, step = run_on(mesh, setup, rules)
    np.testing.assert_allclose(losses, single[0], rtol=1e-5, atol=1e-5)
    st = step_lib.init_train_state(setup["adapters"], setup["optimizer"])
    text = step.lower(setup["params"], st, setup["batches"][0], jax.random.PRNGKey(7)).as_text()
    joined = "\n".join(ln for ln in text.splitlines() if "sharding_constraint" in ln)
    assert '[{"data"}, {}, {}]' in joined  # residual stream [B, S, D]: batch over data only
    assert '[{"data"}, {}, {"tensor", "fsdp"}]' in joined  # mlp activations [B, S, F]
    assert '[{"data", "fsdp"}' not in joined  # the default batch rule is gone

    # the weight and batch rules alone: the activations keep their default layout
    fn = jax.jit(sharding.under_mesh(setup["fn"], mesh, weights_only))
    joined = "\n".join(ln for ln in fn.lower(setup["params"], st, setup["batches"][0], jax.random.PRNGKey(7))
                       .as_text().splitlines() if "sharding_constraint" in ln)
    assert '[{"data", "fsdp"}, {}, {}]' in joined and '[{"data", "fsdp"}, {}, {"tensor"}]' in joined
    assert '[{"data"}' not in joined and '{"tensor", "fsdp"}' not in joined


@pytest.mark.parametrize("override, message", [
    ({"embedding": "fsdp"}, "mesh.rules.embedding: not a logical axis"),
    ({"mlp": "model"}, "mesh.rules.mlp='model': 'model' is not a mesh axis"),
    ({"batch": "data,data"}, "a mesh axis appears twice"),
])
def test_bad_axis_rules_are_one_line(override, message):
    from socialalign_jax.core.errors import UserError

    cfg = tiny_config()
    with cfg.unlocked():
        for k, v in override.items():
            cfg.mesh.rules[k] = v
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        restore.mesh_rules(as_run_config(cfg))
