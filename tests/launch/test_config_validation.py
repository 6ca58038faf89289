"""One validation pass for every run config: each bad value is named in one line, before anything loads.

In-process checks of `runs.validation.run_config_problems` (every case of issue 19's list), plus the
launchers' command-line convention in subprocesses: --help exits 0, a usage error (unknown
flag, unknown config key, bad preset, mistyped value) exits 2 with one stderr line, and a bad
value reaches the same one line through `launch/train.py` before jax compiles anything.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from socialalign_jax.core.errors import is_user_error
from socialalign_jax.runs.validation import ConfigError, run_config_problems, validate_run_config

from tests.train_helpers import REPO, load_config_module, script_env, set_overrides


def weibo(preset="default", **overrides):
    c = load_config_module("weibo").get_config(preset)
    set_overrides(c, overrides)
    return c


def test_presets_as_shipped_are_valid():
    for preset in ("default", "7b", "1.5b", "0.5b", "smollm2"):
        assert run_config_problems(weibo(preset), device_count=1) == [], preset
    assert run_config_problems(load_config_module("lamp").get_config(), device_count=1) == []


@pytest.mark.parametrize("overrides, key", [
    ({"train.log_every": 0}, "train.log_every=0"),
    ({"data.events_per_batch": 0}, "data.events_per_batch=0"),
    ({"model.dtype": "float8"}, "model.dtype='float8'"),
    ({"loss.estimator": "bogus"}, "loss.estimator='bogus'"),
    ({"train.num_steps": -5}, "train.num_steps=-5"),
    ({"train.num_steps": 0}, "train.num_steps=0"),
    ({"train.checkpoint_every": 0}, "train.checkpoint_every=0"),
    ({"optim.lr": -1.0}, "optim.lr=-1.0"),
    ({"optim.lr": 0.0}, "optim.lr=0.0"),
    ({"optim.lr": float("nan")}, "optim.lr=nan"),
    ({"optim.warmup_frac": 1.5}, "optim.warmup_frac=1.5"),
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints=0"),
    ({"data.test_fraction": 1.0}, "data.test_fraction=1.0"),
    ({"data.on_overflow": "truncate"}, "data.on_overflow='truncate'"),
    ({"lora.routing": "sideways"}, "routing mode 'sideways'"),
    ({"lora.targets": "q,zz"}, "unknown adapter targets ['zz']"),
    ({"model.weights": "random:nope"}, "unknown model preset"),
    ({"model.weights": "/path/without/kind"}, "model.weights='/path/without/kind'"),
    ({"data.labels": "a,b"}, "data.labels has 2 classes but lora.num_classes=3"),
    ({"sample.top_p": 0.0}, "sample.top_p=0.0"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "only one axis may be -1"),
    ({"mesh.tensor": 0}, "mesh.tensor=0"),
])
def test_each_bad_value_is_named(overrides, key):
    problems = run_config_problems(weibo(**overrides), device_count=8)
    assert len(problems) == 1 and key in problems[0], problems


def test_mesh_and_batch_against_the_devices():
    assert "= 3 but there are 8 devices" in run_config_problems(weibo(**{"mesh.data": 3}), device_count=8)[0]
    bad_batch = weibo(**{"data.events_per_batch": 3, "data.cases_per_event": 1})
    (p,) = run_config_problems(bad_batch, device_count=8)
    assert "= 3 is not divisible by mesh data x fsdp = 8 x 1 = 8" in p
    assert run_config_problems(bad_batch, device_count=8, training=False) == []  # generation pads its batches
    assert run_config_problems(bad_batch, device_count=1) == []


def test_all_problems_in_one_line():
    with pytest.raises(ConfigError) as e:
        validate_run_config(weibo(**{"train.log_every": 0, "optim.lr": -1.0, "loss.estimator": "x"}), device_count=1)
    msg = str(e.value)
    assert "\n" not in msg and msg.count(";") == 2
    assert all(k in msg for k in ("train.log_every=0", "optim.lr=-1.0", "loss.estimator='x'"))
    assert is_user_error(e.value)  # cli_main prints it as `error: ...`, exit status 2


def _launch(script, *args, timeout=300):
    r = subprocess.run([sys.executable, str(REPO / "launch" / script), *args], cwd=REPO, env=script_env(1),
                       capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, [ln for ln in r.stderr.splitlines() if ln.strip()]


@pytest.mark.parametrize("script", ["train.py", "generate.py", "export.py", "evaluate.py", "build_dataset.py"])
def test_help_exits_0_and_a_bad_flag_exits_2(script):
    rc, out, err = _launch(script, "--help")
    assert rc == 0 and "--" in out + "\n".join(err)
    rc, _, err = _launch(script, "--no_such_flag=1")
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    # names the flag (an unknown flag comes before a missing required one), never blames --config
    assert "--config:" not in err[0] and "no_such_flag" in err[0], err
    assert not any("Traceback" in ln for ln in err)


@pytest.mark.parametrize("args, expect", [
    (["--config.nope=1"], "--config.nope: unknown config key 'nope'"),
    (["--config.train.nope=1"], "--config.train.nope: unknown config key 'nope'"),
    (["--config=configs/weibo.py:nope"], "unknown preset 'nope'"),
    (["--config=configs/missing.py"], "configs/missing.py: no such file"),
    (["--config.train.num_steps=abc"], "--config.train.num_steps=abc"),
    (["extra_positional"], "unexpected arguments: extra_positional"),
])
def test_train_usage_errors_are_one_line_exit_2(args, expect, tmp_path):
    rc, _, err = _launch("train.py", "--workdir", str(tmp_path / "w"), *args)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not (tmp_path / "w").exists()  # nothing was created


def test_a_mistyped_config_key_names_the_close_one_and_where_the_keys_are_listed(tmp_path):
    rc, _, err = _launch("train.py", "--workdir", str(tmp_path / "w"), "--config.train.num_stepz=3")
    assert rc == 2 and err == ["error: --config.train.num_stepz: unknown config key 'num_stepz'; did you mean "
                               "--config.train.num_steps? (python train.py --config_help lists every key)"], err
    # --config_help lists every leaf of the config, with the preset and overrides applied: compared
    # against the config module's own ConfigDict.
    rc, out, err = _launch("train.py", "--config", "configs/weibo.py:smollm2", "--config.train.num_steps=7",
                           "--config_help")
    assert rc == 0 and err == [], err
    cfg = load_config_module("weibo").get_config("smollm2")
    cfg.train.num_steps = 7

    def leaves(node, prefix=""):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}{k}.") if hasattr(v, "items") else [(f"{prefix}{k}", v)]

    listed = {ln.split(" = ")[0].strip(): ln.split(" = ", 1)[1] for ln in out.splitlines()[1:]}
    want = dict(leaves(cfg))
    assert set(listed) == set(want)
    assert all(listed[k].startswith(repr(v)) for k, v in want.items()), out
    rc, out, _ = _launch("train.py", "--help")
    assert rc == 0 and "--[no]config_help:" in out


def test_bad_values_stop_train_before_anything_loads(tmp_path):
    rc, _, err = _launch("train.py", "--workdir", str(tmp_path / "w"), "--config.train.log_every=0",
                         "--config.train.num_steps=-5", "--config.optim.lr=-1", "--config.mesh.fsdp=-1",
                         "--config.model.dtype=float8", "--config.loss.estimator=bogus")
    assert rc == 2 and len(err) == 1, err
    for key in ("train.log_every=0", "train.num_steps=-5", "optim.lr=-1", "mesh.fsdp=-1", "model.dtype='float8'",
                "loss.estimator='bogus'"):
        assert key in err[0], (key, err)
    assert not (tmp_path / "w").exists()


def test_launchers_on_a_cpu_host_with_libtpu_installed_start_quietly():
    """The [tpu] extra installs libtpu for AOT compiles; on a host without a TPU, JAX would probe
    for one and libtpu print a metadata-server error on every launcher start."""
    import importlib.util
    import os
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (the [tpu] extra)")
    if any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio")):
        pytest.skip("this host has TPU device nodes")
    env = script_env(1)
    env.pop("JAX_PLATFORMS")
    code = ("from socialalign_jax.core.cli_setup import quiet_startup; quiet_startup(); "
            "import jax; print(jax.devices()[0].platform)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "cpu", r.stderr
    assert "TPU" not in r.stderr and "libtpu" not in r.stderr, r.stderr


def test_every_data_key_of_the_config_reaches_the_builder(monkeypatch, tmp_path):
    """data.num_history (BM25 top-k), data.lamp_outputs and data.lamp_task are documented config
    keys: each must arrive in the dataset builder's config, not only in config.json."""
    from socialalign_jax.data import setup, tfds_builders as B
    from socialalign_jax.weights.resolve import resolve_weights
    from tests.train_helpers import typed_config

    seen = []

    def build(data_dir, bcfg):
        seen.append(bcfg)
        raise RuntimeError("built")

    monkeypatch.setattr(B, "build", build)
    tok = resolve_weights("random:tiny-qwen2").tokenizer
    cfg = typed_config(None, **{"data.num_history": 2, "data.data_dir": str(tmp_path / "d")})
    with pytest.raises(RuntimeError, match="built"):
        setup.prepare(cfg, tok, str(tmp_path))
    assert seen[-1].num_history == 2 and seen[-1].lamp_task is None and seen[-1].lamp_outputs is None
    cfg = typed_config(None, config="lamp", **{"data.input": str(tmp_path / "q.json"), "data.lamp_task": "LaMP-7",
                                              "data.lamp_outputs": str(tmp_path / "o.json"),
                                              "data.data_dir": str(tmp_path / "l")})
    with pytest.raises(RuntimeError, match="built"):
        setup.prepare(cfg, tok, str(tmp_path))
    assert (seen[-1].lamp_task, seen[-1].lamp_outputs) == ("LaMP-7", str(tmp_path / "o.json"))
    assert run_config_problems(weibo(**{"data.lamp_task": "LaMP-9"}), device_count=1)  # not a LaMP task


def test_launchers_find_their_config_from_any_directory(tmp_path):
    """`--config configs/weibo.py[:preset]` (and the default) resolve against the checkout when
    run from another directory; a config that exists nowhere is still one line naming it."""
    def run(*args):
        r = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--workdir", str(tmp_path / "w"), *args],
                           cwd=tmp_path, env=script_env(1), capture_output=True, text=True, timeout=300)
        return r.returncode, [ln for ln in r.stderr.splitlines() if ln.strip()]

    rc, err = run("--config", "configs/weibo.py:smollm2", "--config.train.num_steps=0")
    assert rc == 2 and err == ["error: config: train.num_steps=0 must be -1 (num_epochs worth of batches) "
                               "or a positive count"], err  # the config loaded: its value was validated
    rc, err = run("--config.train.num_steps=0")  # the default config, from elsewhere
    assert rc == 2 and "train.num_steps=0" in err[0], err
    rc, err = run("--config", "configs/nope.py")
    assert rc == 2 and len(err) == 1 and "configs/nope.py: no such file" in err[0], err
    assert not (tmp_path / "w").exists()


def test_a_short_run_says_where_its_checkpoint_went(tmp_path):
    """With evaluation and generation off there is no table to print; the run still ends saying what it did."""
    from tests.train_helpers import MAX_LENGTH, built_sample

    wd = tmp_path / "w"
    rc, out, err = _launch("train.py", "--workdir", str(wd), "--noprogress", "--config.model.weights=random:tiny-qwen2",
                           f"--config.data.data_dir={built_sample()}", f"--config.data.max_length={MAX_LENGTH}",
                           "--config.data.events_per_batch=2", "--config.loss.max_response_tokens=24",
                           "--config.train.num_steps=1", "--config.train.eval_at_end=false",
                           "--config.train.generate_at_end=false", "--config.train.tensorboard=false", timeout=600)
    assert rc == 0, err
    assert out.strip().splitlines()[-1] == (f"trained to step 1: checkpoints in {wd}/checkpoints, "
                                            f"logs in {wd}/metrics.jsonl"), out
    assert (wd / "checkpoints" / "1").is_dir()
