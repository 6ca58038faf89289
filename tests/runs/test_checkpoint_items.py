"""Checkpoint items: inference reads the adapters item alone, training reads all four, and a
checkpoint written before the split (one `state` item) still restores for both.

References: the arrays the test itself saved (bitwise), Orbax's own item directories, and a
fresh interpreter's `sys.modules` for what inference imports.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from socialalign_jax.core.atomic_io import write_json
from socialalign_jax.model import decoder
from socialalign_jax.parallel.mesh import make_mesh
from socialalign_jax.runs import checkpoint, restore
from socialalign_jax.runs.run_config import as_run_config
from socialalign_jax.train import optim, step as step_lib

from tests.train_helpers import REPO, script_env, tiny_config


def _state(cfg, seed):
    """A train state with random (non-zero) adapters and a stepped optimizer, as a numpy tree."""
    lc = cfg.lora
    base = restore.load_base(cfg)
    opt, _ = optim.make_optimizer(cfg.optim, 4)
    rs = np.random.default_rng(seed)
    ad = jax.tree.map(lambda x: rs.normal(0, 0.05, x.shape).astype(np.float32),
                      jax.eval_shape(lambda: decoder.init_adapters(jax.random.PRNGKey(0), base.model_cfg, lc)))
    state = step_lib.init_train_state(ad, opt)
    grads = jax.tree.map(lambda x: np.full(x.shape, 0.01, np.float32), ad)
    _, state["opt_state"] = opt.update(grads, state["opt_state"], ad)  # non-trivial moments
    state["step"] = np.int32(seed)
    return jax.device_get(state), opt


def _abstract(tree):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sh), tree)


def _assert_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("items_run")
    cfg = as_run_config(tiny_config())
    write_json(restore.config_to_dict(cfg), str(wd / "config.json"))
    manager = checkpoint.make_manager(str(wd), save_every=1, keep=3, async_save=False)
    state, _ = _state(cfg, 3)
    checkpoint.save(manager, 3, state, {"epoch": 0, "batch": 3}, restore.config_to_dict(cfg), force=True)
    checkpoint.close(manager)
    return wd, cfg, state


def test_a_step_holds_four_items_and_training_restores_them_all(run):
    wd, cfg, state = run
    step_dir = wd / "checkpoints" / "3"
    items = {p.name for p in step_dir.iterdir() if p.is_dir()}
    assert {"adapters", "train_state", "data", "config"} <= items and "state" not in items
    manager = checkpoint.make_manager(str(wd), save_every=1, keep=3, async_save=False)
    got, data, saved_cfg = checkpoint.restore(manager, _abstract(state), restore.config_to_dict(cfg))
    _assert_equal(got, state)
    assert data == {"epoch": 0, "batch": 3} and saved_cfg["lora"] == restore.config_to_dict(cfg)["lora"]


def test_inference_restores_the_adapters_item_alone(run):
    wd, cfg, state = run
    # Damage what only a resume reads: inference must not care.
    for item in ("train_state", "data"):
        for root, _, files in os.walk(wd / "checkpoints" / "3" / item):
            for f in files:
                if not f.startswith("_"):
                    with open(os.path.join(root, f), "wb") as fh:
                        fh.write(b"garbage")
    base = restore.load_base(cfg)
    adapters, at = restore.restore_adapters(base, str(wd))
    assert at == 3
    _assert_equal(adapters, state["adapters"])


def test_a_checkpoint_from_before_the_split_still_restores(tmp_path):
    """The old layout is written here with Orbax directly: one `state` item {step, adapters, opt_state},
    and the config as it was then spelled (list settings as comma strings): no drift is seen in that."""
    cfg = as_run_config(tiny_config())
    state, _ = _state(cfg, 5)
    old = restore.config_to_dict(cfg)
    old["lora"]["targets"], old["data"]["labels"] = ",".join(cfg.lora.targets), ",".join(cfg.data.labels)
    write_json(old, str(tmp_path / "config.json"))
    mgr = ocp.CheckpointManager(str(tmp_path / "checkpoints"), options=ocp.CheckpointManagerOptions(create=True))
    mgr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"epoch": 0, "batch": 5}),
                                        config=ocp.args.JsonSave(old)), force=True)
    mgr.wait_until_finished()
    mgr.close()
    base = restore.load_base(cfg)
    adapters, at = restore.restore_adapters(base, str(tmp_path))
    assert at == 5
    _assert_equal(adapters, state["adapters"])
    manager = checkpoint.make_manager(str(tmp_path), save_every=1, keep=3, async_save=False)
    got, data, _ = checkpoint.restore(manager, _abstract(state), restore.config_to_dict(cfg))
    _assert_equal(got, state)
    assert data == {"epoch": 0, "batch": 5}


def test_inference_imports_nothing_from_training():
    """Generation, export, prediction and reading a run back load no trainer, step or optimizer."""
    code = ("import sys; import socialalign_jax.runs.restore, socialalign_jax.inference.generation, socialalign_jax.inference.export, "
            "socialalign_jax.predict.predictor, socialalign_jax.inference.scoring; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('socialalign_jax'))))")
    res = subprocess.run([sys.executable, "-c", "import json; " + code], cwd=REPO, env=script_env(1),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    loaded = set(json.loads(res.stdout.strip().splitlines()[-1]))
    # No module of train/ at all: the next-token NLL they share is model/nll.py. (data/setup.py, which
    # opens the dataset a run built, is data, not training: generation reads its test split with it.)
    training = {m for m in loaded if m.startswith("socialalign_jax.train")} | {
        "socialalign_jax.train.loop", "socialalign_jax.train.step", "socialalign_jax.train.optim",
        "socialalign_jax.train.run", "socialalign_jax.train.post_train"}
    assert "socialalign_jax.runs.restore" in loaded
    assert not (loaded & training), sorted(loaded & training)
