"""The launchers with flags of their own (core/cli_setup.parse_flags): one CLI convention, in-process.

Tests load these scripts under several module names and call `main(argv)` many times in one
process, so each keeps its flags in its own absl FlagValues: defining them twice must not clash,
and no value of one call may survive into the next. The convention is the absl launchers': --help
lists every flag and exits 0; a usage error is one `error:` line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

ROOT = Path(__file__).resolve().parents[2]
# launcher -> the words before its flags (experiment.py's features command has a FlagValues of its own)
COMMANDS = {"evaluate.py": [], "score.py": [], "build_personas.py": [], "plan.py": [], "experiment.py": [],
            "experiment.py features": ["features"], "build_dataset.py": []}
_names = itertools.count()


def load(script: str):
    """A fresh copy of launch/<script>, under a module name no other test uses."""
    spec = importlib.util.spec_from_file_location(f"cli_flags_{script[:-3]}_{next(_names)}", ROOT / "launch" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def modules():
    return {script: load(script) for script in {c.split()[0] for c in COMMANDS}}


def call(mod, argv) -> int:
    """main(argv)'s exit status, whether it returns it or exits with it."""
    try:
        return mod.main(argv)
    except SystemExit as e:
        return e.code


def flag_values(mod, command: str):
    return mod.FEATURES if command.endswith(" features") else mod.FLAGS


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_flag_and_exits_0(command, modules, capsys):
    mod = modules[command.split()[0]]
    assert call(mod, [*COMMANDS[command], "--help"]) == 0
    out = capsys.readouterr().out
    fv = flag_values(mod, command)
    assert len(list(fv)) >= 5
    for name in fv:
        flag = fv[name]
        line = next((ln for ln in out.splitlines() if ln.lstrip().startswith((f"--{name}:", f"--[no]{name}:"))), None)
        assert line is not None, (name, out)
        assert flag.help.split()[0] in out, (name, flag.help)  # its help text is printed, not only its name
    assert out.startswith(mod.__doc__.strip().split("\n")[0]) or command.endswith(" features")
    assert call(mod, [*COMMANDS[command], "-h"]) == 0


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_flag_is_one_line_exit_2(command, modules, capsys):
    assert call(modules[command.split()[0]], [*COMMANDS[command], "--no_such_flag=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no_such_flag" in err[0], err
    assert err[0].endswith(f"(python {command} --help)"), err


@pytest.mark.parametrize("argv, expect", [
    (["--out", "o"], "error: --predictions is required (python evaluate.py --help)"),
    (["--predictions", "p", "--out", "o", "stray"], "error: unexpected arguments: stray (python evaluate.py --help)"),
    (["--predictions", "p", "--out", "o", "--gate_stat", "mean"], "value should be one of <max|entropy>"),
    (["--predictions", "p", "--out", "o", "--gate-stat", "max"], "Unknown command line flag 'gate-stat'"),
])
def test_evaluate_usage_errors(argv, expect, modules, capsys):
    assert call(modules["evaluate.py"], argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err


@pytest.mark.parametrize("argv, expect", [
    (["--weights", "hf:/ck", "--batch_size", "0"], "flag --batch_size=0: 0 is not a positive integer"),
    (["--weights", "gguf:smollm2"], "give hf:DIR"),
    (["--weights", "hf:/ck", "--routing", "token"], "--routing needs --adapters"),
    (["--weights", "hf:/ck", "--dtype", "int8"], "value should be one of <float32|bfloat16|float16>"),
    (["--checkpoint", "/ck"], "Unknown command line flag 'checkpoint'"),  # one name: --weights
])
def test_score_usage_errors(argv, expect, modules, capsys):
    assert call(modules["score.py"], [*argv, "--input", "in.jsonl", "--out", "out.jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err


def test_no_value_survives_into_the_next_call(modules, monkeypatch, tmp_path, capsys):
    """evaluate.py with --gate_stat entropy, then without it: the second call has the default."""
    from socialalign_jax.core.errors import UserError

    ev = modules["evaluate.py"]
    seen = []

    def stop(path):  # main's first step after parsing: record what it parsed, then stop as bad input does
        seen.append((ev.FLAGS.gate_stat, ev.FLAGS.labeller, ev.FLAGS.gates, path))
        raise UserError("stop")

    monkeypatch.setattr(ev, "load_predictions", stop)
    out = str(tmp_path / "o")
    assert ev.main(["--predictions", "a", "--out", out, "--gate_stat", "entropy", "--labeller", "none",
                    "--gates", "g.json"]) == 2
    assert ev.main(["--predictions", "b", "--out", out]) == 2
    assert seen == [("entropy", "none", "g.json", "a"), ("max", "lexicon", None, "b")]
    # a call that failed to parse leaves nothing behind either
    assert call(ev, ["--predictions", "c", "--out", out, "--gate_stat", "entropy", "--bogus"]) == 2
    assert ev.main(["--predictions", "d", "--out", out]) == 2
    assert seen[-1] == ("max", "lexicon", None, "d")


def test_repeated_flag_starts_empty_each_call(modules, monkeypatch, tmp_path, capsys):
    """experiment.py --set (repeatable): the overrides of one call are not added to the next's."""
    from socialalign_jax.core.errors import UserError
    from socialalign_jax.experiments import runner

    seen = []

    def stop(path, overrides):
        seen.append(list(overrides))
        raise UserError("stop")

    monkeypatch.setattr(runner, "load_plan", stop)
    ex = modules["experiment.py"]
    for argv in (["--set", "a=1", "--set", "b=2"], ["--set", "c=3"], []):
        with pytest.raises(UserError, match="stop"):  # cli_main, in __main__, prints it
            ex.main(["--plan", "p.toml", "--out", str(tmp_path), *argv])
    assert seen == [["a=1", "b=2"], ["c=3"], []]


def test_loaded_twice_under_two_names(capsys):
    """Two copies of a launcher hold separate flags, and neither touches absl's global FLAGS."""
    first, second = load("evaluate.py"), load("evaluate.py")
    assert first.FLAGS is not second.FLAGS
    first.parse_args(["--predictions", "p", "--out", "o", "--gate_stat", "entropy"])
    second.parse_args(["--predictions", "q", "--out", "o"])
    assert (first.FLAGS.gate_stat, first.FLAGS.predictions) == ("entropy", "p")
    assert (second.FLAGS.gate_stat, second.FLAGS.predictions) == ("max", "q")
    assert "gate_stat" not in flags.FLAGS and "predictions" not in flags.FLAGS


def test_build_dataset_takes_unset_settings_from_the_config(modules):
    """A build setting given on the command line wins; one not given is the config's, in every call."""
    bd = modules["build_dataset.py"]
    base = ["--source", "socialweibo", "--input", "x", "--out", "y"]
    default_len = bd.parse_args(base).max_length
    assert bd.parse_args([*base, "--max_length", "77", "--mode", "without_history"]).max_length == 77
    args = bd.parse_args(base)
    assert args.max_length == default_len and args.mode == "full"


def test_help_from_another_working_directory(tmp_path):
    """`python /path/to/launch/X.py --help` from anywhere: the script finds its own checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "experiment.py"), "features", "--help"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--max_cases_per_event" in r.stdout, r.stderr


@pytest.mark.parametrize("script", ["train.py", "generate.py"])
def test_help_lists_the_config_flag(script, tmp_path):
    """`--config` is defined in core/cli_setup, not in the script: --help (not only --helpfull) lists it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(ROOT / "launch" / script), "--help"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert any(ln.lstrip().startswith("--config:") for ln in r.stdout.splitlines()), r.stdout


def test_every_launcher_starts_quietly():
    """Each launcher calls `quiet_startup()` at module level, before anything imports jax or
    transformers, so that a host with libtpu but no TPU (the [tpu] extra) prints no libtpu start-up
    errors and a venv without PyTorch no transformers notice (plan.py sets the platform itself
    afterwards: it may compile for a TPU topology)."""
    import ast

    missing = []
    for path in sorted((ROOT / "launch").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls = [n.lineno for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
                 and getattr(n.value.func, "id", None) == "quiet_startup"]
        jax_imports = [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                       and any((a.name if isinstance(n, ast.Import) else (n.module or "")).split(".")[0] == "jax"
                               for a in n.names)]
        if not calls or (jax_imports and min(jax_imports) < calls[0]):
            missing.append(path.name)
    assert not missing, f"launchers without a module-level quiet_startup() before jax: {missing}"


def test_no_bool_flag_is_named_as_a_negation():
    """absl offers --noX for every bool flag X: a flag named no_progress invites --nono_progress, which
    silently means the opposite of what it reads. Bool flags are named for what they turn on."""
    import ast

    negated = []
    for path in sorted((ROOT / "launch").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "DEFINE_bool"
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value.startswith("no")):
                negated.append(f"{path.name}: --{node.args[0].value}")
    assert negated == []
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert "--[no]progress:" in r.stdout, r.stdout


# ----------------------------------------------------------------------------- the compilation cache

def test_compilation_cache_directory_precedence():
    from socialalign_jax.core.cli_setup import compilation_cache_dir

    home = os.path.expanduser("~")
    assert compilation_cache_dir({}) == os.path.join(home, ".cache", "socialalign_jax", "xla-lru")
    assert compilation_cache_dir({"XDG_CACHE_HOME": "/c"}) == "/c/socialalign_jax/xla-lru"
    assert compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/j", "XDG_CACHE_HOME": "/c"}) == "/j"
    assert compilation_cache_dir({"SOCIALALIGN_COMPILATION_CACHE": "/s", "JAX_COMPILATION_CACHE_DIR": "/j"}) == "/s"
    assert compilation_cache_dir({"SOCIALALIGN_COMPILATION_CACHE": "off", "JAX_COMPILATION_CACHE_DIR": "/j"}) is None


def test_a_launcher_start_keeps_compiled_programs_in_the_users_cache(tmp_path):
    """quiet_startup (every launcher) points JAX's persistent cache at ~/.cache/socialalign_jax/xla-lru: a
    second process finds the program there; the cache is capped, so JAX locks it (its .lockfile) and
    concurrent launchers never read each other's half-written entries; 'off' keeps nothing."""
    code = ("from socialalign_jax.core.cli_setup import quiet_startup; quiet_startup(); import jax, jax.numpy as jnp; "
            "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0); "
            "print(float(jax.jit(lambda x: (x * 2 + 1).sum())(jnp.ones(7))))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME", "SOCIALALIGN_COMPILATION_CACHE",
                        "JAX_COMPILATION_CACHE_MAX_SIZE")}
    env.update(HOME=str(tmp_path), JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code + "; print(jax.config.jax_compilation_cache_max_size)"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["21.0", str(4 << 30)], r.stderr
    cache = tmp_path / ".cache" / "socialalign_jax" / "xla-lru"
    assert any(p.name.endswith("-cache") for p in cache.iterdir()) and (cache / ".lockfile").exists()
    off = tmp_path / "off_home"
    off.mkdir()
    r = subprocess.run([sys.executable, "-c", code], env=dict(env, HOME=str(off), SOCIALALIGN_COMPILATION_CACHE="off"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and not (off / ".cache").exists(), r.stderr
