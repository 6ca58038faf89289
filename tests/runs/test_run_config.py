"""The typed run config (runs/run_config.py): the config files' keys, exactly, as frozen dataclasses.

References: the config files themselves (configs/weibo.py every preset, configs/lamp.py), read
through ml_collections' own `to_dict`; hand-written old config.json contents.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from configs import lamp, weibo
from socialalign_jax.core.errors import UserError
from socialalign_jax.runs import restore
from socialalign_jax.runs.run_config import RunConfig, as_run_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_config_files_default_key_for_key():
    assert RunConfig().to_dict() == weibo.get_config().to_dict()


@pytest.mark.parametrize("module,preset", [(weibo, "default"), (weibo, "7b"), (weibo, "1.5b"), (weibo, "smollm2"),
                                           (lamp, "default")])
def test_every_preset_round_trips_exactly(module, preset):
    """Every key a config file declares is a typed field (an unknown one would raise), and back."""
    c = module.get_config(preset)
    r = as_run_config(c)
    assert r.to_dict() == c.to_dict()
    assert as_run_config(json.loads(json.dumps(r.to_dict()))) == r  # config.json and back


def test_bad_keys_and_values_are_one_line_naming_the_key():
    with pytest.raises(UserError, match=r"^config: train\.num_stepz: unknown key; known: .*num_steps") as e:
        as_run_config({"train": {"num_stepz": 3}})
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"^run.json: optim\.lr='fast': expected float$"):
        as_run_config({"optim": {"lr": "fast"}}, source="run.json")
    with pytest.raises(UserError, match=r"train\.eval_at_end=1: expected bool"):
        as_run_config({"train": {"eval_at_end": 1}})
    with pytest.raises(UserError, match=r"unknown section 'trainer'"):
        as_run_config({"trainer": {}})
    assert as_run_config({"optim": {"lr": 1}}).optim.lr == 1.0  # an int where a float is declared


def test_an_older_runs_config_json_takes_todays_defaults_for_what_it_lacks(tmp_path):
    old = weibo.get_config().to_dict()
    del old["model"]["attention"], old["mesh"]["rules"], old["data"]["num_history"]
    old["model"]["random_init"] = "flax-scan/1"
    (tmp_path / "config.json").write_text(json.dumps(old), encoding="utf-8")
    cfg = restore.load_run_config(str(tmp_path))
    assert isinstance(cfg, RunConfig)
    assert cfg.model.attention == "auto" and cfg.data.num_history == 5 and cfg.model.random_init == "flax-scan/1"
    assert dict(cfg.mesh.rules) == weibo.get_config().mesh.rules.to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"model": {"dtype": 16}}), encoding="utf-8")
    with pytest.raises(UserError, match=r"config\.json: model\.dtype=16: expected str"):
        restore.load_run_config(str(tmp_path))


def test_frozen_and_replace_validates():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.num_steps = 3  # type: ignore[misc]
    new = cfg.replace(train={"num_steps": 7}, preset="x")
    assert new.train.num_steps == 7 and new.preset == "x" and cfg.train.num_steps == -1
    with pytest.raises(UserError, match="train.num_steps"):
        cfg.replace(train={"num_steps": "seven"})


def test_config_to_dict_is_the_typed_dict_plus_the_random_init():
    d = restore.config_to_dict(weibo.get_config())
    assert d["model"]["random_init"] and d == {**RunConfig().to_dict(), "model": d["model"]}
    assert restore.mesh_rules(weibo.get_config()) == restore.mesh_rules(RunConfig())


def test_nothing_below_the_cli_boundary_imports_ml_collections():
    """Only the CLI helpers read ConfigDicts; everything else gets the typed config."""
    allowed = {"socialalign_jax/core/cli_setup.py"}
    offenders = []
    for path in sorted((ROOT / "socialalign_jax").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "ml_collections" for n in names) and rel not in allowed:
                offenders.append(rel)
    assert offenders == []


def test_every_key_is_read_somewhere():
    """A config key nothing reads is a knob that does nothing (issue 14 found three). Every field of
    every section is read, as `.field` or `"field"`, by some module of the package or a launcher
    other than the declaration itself."""
    import re

    sources = [p.read_text(encoding="utf-8") for p in (ROOT / "socialalign_jax").rglob("*.py")
               if p.name != "run_config.py"] + [p.read_text(encoding="utf-8") for p in (ROOT / "launch").glob("*.py")]
    unread = []
    cfg = RunConfig()
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        if not dataclasses.is_dataclass(section):
            continue
        for f in dataclasses.fields(section):
            pat = re.compile(rf"\.{f.name}\b|[\"']{f.name}[\"']")
            if not any(pat.search(t) for t in sources):
                unread.append(f"{sec.name}.{f.name}")
    assert not unread, f"config keys nothing reads: {unread}"
