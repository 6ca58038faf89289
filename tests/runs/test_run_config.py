"""The typed run config (runs/run_config.py): every setting declared once, the config files'
presets stating only what they change, and one conversion each way.

References: the config files themselves (configs/weibo.py every preset, configs/lamp.py), read
through ml_collections' own `to_dict`; hand-written old config.json contents (comma-string lists);
the package's source (ast) for where each config class is declared.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from configs import lamp, weibo
from socialalign_jax.core.cli_setup import config_dict
from socialalign_jax.core.errors import UserError
from socialalign_jax.runs import restore
from socialalign_jax.runs.run_config import as_run_config, respell_lists, RunConfig, settings
from socialalign_jax.runs.validation import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_preset_is_the_typed_defaults():
    """configs/weibo.py's default preset changes nothing, in both views: typed and the ConfigDict."""
    assert as_run_config(weibo.get_config()) == RunConfig()
    assert weibo.get_config().to_dict() == config_dict(RunConfig().to_dict()).to_dict()


@pytest.mark.parametrize("module,preset", [(weibo, "default"), (weibo, "7b"), (weibo, "1.5b"), (weibo, "smollm2"),
                                           (lamp, "default"), (lamp, "smollm2")])
def test_every_preset_round_trips_exactly(module, preset):
    """Every key a config file gives is a typed field (an unknown one would raise), and back: the
    ConfigDict view of the typed config is the file's, and config.json reads back to the same."""
    c = module.get_config(preset)
    r = as_run_config(c)
    assert config_dict(r.to_dict()).to_dict() == c.to_dict()
    assert as_run_config(json.loads(json.dumps(r.to_dict()))) == r  # config.json and back
    assert isinstance(r.lora.targets, tuple) and isinstance(r.data.labels, tuple)


def _restated(base: RunConfig, settings: dict) -> list[str]:
    """The `section.key`s of a preset's settings whose value is the one `base` already has."""
    out = []
    for section, values in settings.items():
        for key, value in values.items():
            changed = base.replace(**{section: {key: value}})  # typed like --config (a 'q,k' string is a tuple)
            if getattr(getattr(changed, section), key) == getattr(getattr(base, section), key):
                out.append(f"{section}.{key}")
    return out


def test_no_preset_restates_a_default():
    """A preset states only what it changes (maxtext's model files over base.yml): a value equal to
    the default would be a second declaration of it, silently stale when the default moves."""
    restating = {"optim": {"lr": 1.0, "warmup_frac": 0.1}, "lora": {"targets": "q,k,v,o,gate,up,down"}}
    assert _restated(RunConfig(), restating) == ["optim.warmup_frac", "lora.targets"]  # the check sees one
    for name, changes in weibo.PRESETS.items():
        assert _restated(RunConfig(), changes) == [], f"configs/weibo.py:{name}"
    for name in weibo.PRESETS:
        assert _restated(RunConfig(), lamp.lamp_settings(name)) == [], f"configs/lamp.py:{name}"


def test_each_setting_is_declared_once():
    """The run config's sections are the components' own configs (not copies of their fields),
    each class is declared once in the package, and where two configs share a setting (the
    builder's and the prompt's data settings, the model section's execution options) one refers
    to the other's default instead of restating it."""
    from socialalign_jax.data.prompt import PromptConfig
    from socialalign_jax.data.tfds_builders import SocialConfig
    from socialalign_jax.model.config import ModelConfig
    from socialalign_jax.model.pac_lora import LoraConfig
    from socialalign_jax.model.sampling import SamplingConfig
    from socialalign_jax.runs.run_config import DataSection, ModelSection, PAPER_MAX_LENGTH, SampleSection
    from socialalign_jax.train import optim, step

    cfg = RunConfig()
    assert type(cfg.lora) is LoraConfig and type(cfg.loss) is step.LossConfig
    assert type(cfg.optim) is optim.OptimConfig and isinstance(cfg.sample, SamplingConfig)
    own = set(SampleSection.__annotations__)  # what the section adds to the sampler's config: nothing restated
    assert own == {"batch_size"}, own
    classes = {type(getattr(cfg, f.name)).__name__ for f in dataclasses.fields(cfg) if f.name != "preset"}
    defined = [node.name for path in (ROOT / "socialalign_jax").rglob("*.py")
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
               if isinstance(node, ast.ClassDef) and node.name in classes | {"SamplingConfig"}]
    assert sorted(defined) == sorted(classes | {"SamplingConfig"}), defined

    # Where two configs share a setting, one declares the default and the other refers to it:
    # (the referring class, its file, the declaring class).
    pairs = ((SocialConfig, "data/tfds_builders.py", DataSection), (PromptConfig, "data/prompt.py", DataSection),
             (ModelSection, "runs/run_config.py", ModelConfig))
    for component, path, owner in pairs:
        shared = {f.name for f in dataclasses.fields(component)} & {f.name for f in dataclasses.fields(owner)}
        assert len(shared) >= 3, (component, shared)
        tree = ast.parse((ROOT / "socialalign_jax" / path).read_text(encoding="utf-8"))
        (body,) = [n.body for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == component.__name__]
        # None is the builder's "not given" (the bundled vocabulary, LaMP's outputs found in the input), not a value
        literal = [n.target.id for n in body if isinstance(n, ast.AnnAssign) and n.target.id in shared
                   and isinstance(n.value, ast.Constant) and n.value.value is not None]
        assert literal == [], f"{path}: {component.__name__} restates {owner.__name__}'s defaults of {literal}"
        for f in dataclasses.fields(component):
            if f.name in shared and f.default is not None and (component, f.name) != (PromptConfig, "max_length"):
                assert f.default == getattr(owner, f.name), (component.__name__, f.name)
    assert PromptConfig().max_length == PAPER_MAX_LENGTH != DataSection().max_length  # the one documented exception


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
    with pytest.raises(UserError, match=r"^config: lora\.targets=3: expected comma-separated names"):
        as_run_config({"lora": {"targets": 3}})
    with pytest.raises(UserError, match=r"^config: sample\.stop_tokens: unknown key"):  # the tokenizer's, not a setting
        as_run_config({"sample": {"stop_tokens": [1]}})
    assert as_run_config({"optim": {"lr": 1}}).optim.lr == 1.0  # an int where a float is declared


def test_a_value_a_component_refuses_is_validations_line():
    """LoraConfig and SamplingConfig check their own values when the typed config is built: the
    line is the one runs.validation gives for the key (as before the sections were the components)."""
    with pytest.raises(ConfigError) as e:
        as_run_config({"lora": {"routing": "sideways"}, "train": {"log_every": 0}})
    assert str(e.value).startswith("config: ") and "\n" not in str(e.value)
    assert "routing mode 'sideways'" in str(e.value) and "train.log_every=0" in str(e.value)
    with pytest.raises(ConfigError, match=r"^config: sample\.top_p=0\.0 must be > 0 and <= 1$"):
        as_run_config({"sample": {"top_p": 0.0}})
    with pytest.raises(ConfigError, match=r"unknown adapter targets \['zz'\]"):
        as_run_config({"lora": {"targets": "q,zz"}})
    with pytest.raises(ConfigError, match=r"^config: lora: fuse_base must be .*'sometimes'"):
        as_run_config({"lora": {"fuse_base": "sometimes"}})
    with pytest.raises(UserError, match=r"^config: sample: temperature must be > 0 when sampling"):
        as_run_config({"sample": {"temperature": 0.0}})  # no range of validation's: the sampler's own line


def test_list_settings_read_either_spelling():
    """Tuples in the typed config; comma strings on the command line and in older config.json files;
    JSON lists in config.json from now on."""
    a = as_run_config({"lora": {"targets": "q, v,"}, "data": {"labels": "favor,against,neutral"},
                       "model": {"weights": "random:tiny-qwen2"}})
    b = as_run_config({"lora": {"targets": ["q", "v"]}, "data": {"labels": ["favor", "against", "neutral"]},
                       "model": {"weights": "random:tiny-qwen2"}})
    assert a == b and a.lora.targets == ("q", "v") and a.data.labels == ("favor", "against", "neutral")
    assert as_run_config({"lora": {"targets": ""}}).lora.targets == ()  # '' trains only the head
    assert json.loads(json.dumps(a.to_dict()))["lora"]["targets"] == ["q", "v"]
    assert weibo.get_config().lora.targets == "q,k,v,o,gate,up,down"  # what --config.lora.targets=... overrides


def test_an_older_runs_comma_strings_are_no_drift_on_resume():
    """config.json of a run started before lists were written as lists: read back, and compared on
    resume (train.loop.resume_conflicts, the checkpoint's adapter-shape check) by value."""
    from socialalign_jax.train.loop import resume_conflicts

    cfg = as_run_config(weibo.get_config())
    old = restore.config_to_dict(cfg)
    old["lora"]["targets"], old["data"]["labels"] = "q,k,v,o,gate,up,down", "negative,neutral,positive"
    assert as_run_config(old) == as_run_config(restore.config_to_dict(cfg))
    assert resume_conflicts(old, restore.config_to_dict(cfg)) == []
    assert respell_lists(old)["lora"]["targets"] == restore.config_to_dict(cfg)["lora"]["targets"]
    old["lora"]["targets"] = "q,v"  # a real change is still one
    assert resume_conflicts(old, restore.config_to_dict(cfg)) == [
        "lora.targets: checkpoint ['q', 'v'] vs config ['q', 'k', 'v', 'o', 'gate', 'up', 'down']"]


def test_an_older_runs_config_json_takes_todays_defaults_for_what_it_lacks(tmp_path):
    old = weibo.get_config().to_dict()  # comma-string lists, as config.json held them before
    del old["model"]["attention"], old["mesh"]["rules"], old["data"]["num_history"]
    old["model"]["random_init"] = "flax-scan/1"
    (tmp_path / "config.json").write_text(json.dumps(old), encoding="utf-8")
    cfg = restore.load_run_config(str(tmp_path))
    assert isinstance(cfg, RunConfig)
    assert cfg.model.attention == "auto" and cfg.data.num_history == 5 and cfg.model.random_init == "flax-scan/1"
    assert cfg.lora.targets == ("q", "k", "v", "o", "gate", "up", "down")
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
    d = restore.config_to_dict(as_run_config(weibo.get_config()))
    assert d["model"]["random_init"] and d == {**RunConfig().to_dict(), "model": d["model"]}
    assert restore.mesh_rules(as_run_config(weibo.get_config())) == restore.mesh_rules(RunConfig())


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
        for f in settings(type(section)):
            pat = re.compile(rf"\.{f.name}\b|[\"']{f.name}[\"']")
            if not any(pat.search(t) for t in sources):
                unread.append(f"{sec.name}.{f.name}")
    assert not unread, f"config keys nothing reads: {unread}"
