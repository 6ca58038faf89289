"""Read a run back: its saved config, the base model that config names, and the adapters of a
checkpoint, without importing the training loop or building an optimizer.

Why this module exists: generation, prediction, serving and export all start from a run
directory. They need the base (weights, mesh, tokenizer, the static configs) and one item of
a checkpoint (the adapters), nothing the trainer holds besides. Training builds its job on
the same `load_base`, so a run is read back with exactly the configuration it was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax

from socialalign_jax.core.errors import UserError
from socialalign_jax.model import axes as model_axes, decoder
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.parallel.axis_rules import from_config_strings
from socialalign_jax.parallel.mesh import make_mesh
from socialalign_jax.runs import checkpoint
from socialalign_jax.runs.run_config import as_run_config, RunConfig
from socialalign_jax.runs.validation import validate_run_config
from socialalign_jax.weights.resolve import resolve_weights
from socialalign_jax.weights.tokenizer import load_tokenizer

# A run's track record on its held-out events, written by the trainer's final evaluation
# (evaluation/skill.py), read by predict and carried beside an export of the same step.
SKILL_FILE = "forecast_skill.json"


class RunError(UserError):
    """A run directory that cannot be read back; the message names the file and what to do."""


# ----------------------------------------------------------------------------- config readers

def config_to_dict(cfg: RunConfig) -> dict:
    """The run config as saved in config.json and the checkpoints; a run on random base weights
    also records how they were drawn (decoder.RANDOM_INIT), which restore checks."""

    d = cfg.to_dict()
    if str(d.get("model", {}).get("weights", "")).startswith("random:"):
        d["model"]["random_init"] = decoder.RANDOM_INIT
    return d


def mesh_rules(cfg: RunConfig) -> tuple:
    """The logical axis rules of `cfg` (its `mesh.rules` section over the defaults), hashable."""

    try:
        return from_config_strings(cfg.mesh.rules)
    except ValueError as e:
        raise UserError(str(e)) from None


def load_run_config(workdir: str) -> RunConfig:
    """The config a run was started with (workdir/config.json); keys an older run did not record
    take today's defaults, an unknown key or a bad value is one line naming the file."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise RunError(f"{path}: not found; --workdir must be a training run's directory")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RunError(f"{path}: malformed JSON ({e})") from None
    return as_run_config(saved, source=str(path))


# ----------------------------------------------------------------------------- the base model

@dataclasses.dataclass
class Base:
    """The frozen model a config names, placed on its mesh, with the static configs around it."""
    cfg: RunConfig
    model_cfg: ModelConfig
    lora_cfg: LoraConfig
    params: Any
    tokenizer: Any
    mesh: Any
    rules: tuple  # logical axis rules (config mesh.rules; parallel/axis_rules.py)


def load_base(cfg: RunConfig) -> Base:
    """Weights, mesh and tokenizer for `cfg`, validated once before anything is loaded."""

    if not str(cfg.model.weights) or str(cfg.model.weights) in ("hf:", "gguf:"):
        raise UserError(f"config preset {cfg.preset!r} needs the base weights: pass "
                        "--config.model.weights=hf:/path/to/checkpoint (a local Hugging Face directory)")
    # One validation pass before any weights or data are loaded (the trainer also checks the batch).
    validate_run_config(cfg, device_count=jax.device_count(), training=False)
    rules = mesh_rules(cfg)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    weights = resolve_weights(str(cfg.model.weights), dtype=cfg.model.dtype, seed=int(cfg.model.seed))
    model_cfg = cfg.model.apply_to(weights.cfg)
    params = jax.device_put(weights.params, model_axes.shardings(weights.params, mesh, rules))
    tokenizer = weights.tokenizer
    if cfg.data.tokenizer:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer is None:
        raise UserError(f"weights {cfg.model.weights!r} come without a tokenizer: pass --config.data.tokenizer=DIR")
    return Base(cfg, model_cfg, cfg.lora, params, tokenizer, mesh, rules)


# ----------------------------------------------------------------------------- adapters

def abstract_adapters(model_cfg: ModelConfig, lora_cfg: LoraConfig, mesh, rules=None):
    """Shapes, dtypes and shardings of the adapter tree, from the model's declarations (no arrays)."""
    shapes = jax.eval_shape(lambda: decoder.init_adapters(jax.random.PRNGKey(0), model_cfg, lora_cfg))
    shard = model_axes.shardings(shapes, mesh, rules, strict=False)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shard)


def restore_adapters(base: Base, workdir: str, step: int | None = None):
    """The adapter tree of `workdir`'s latest (or given) checkpoint, and that checkpoint's step.

    Reads the checkpoint's `adapters` item alone (runs/checkpoint.py); without `step`, the newest
    checkpoint that restores (a damaged newer one is named in one line and left in place).
    """
    manager = checkpoint.make_manager(workdir, save_every=1, keep=1, async_save=False)
    where = os.path.join(workdir, "checkpoints")
    if manager.latest_step() is None:
        raise RunError(f"{where}: no checkpoint; train first (python launch/train.py --config ... --workdir DIR)")
    if step is not None and step not in manager.all_steps():
        raise RunError(f"{where}: no checkpoint at step {step} (have {sorted(manager.all_steps())})")
    abstract = abstract_adapters(base.model_cfg, base.lora_cfg, base.mesh, base.rules)
    restored = checkpoint.restore(manager, abstract, config_to_dict(base.cfg), step=step, move_bad=False,
                                  adapters_only=True)
    return restored[0], restored.step


@dataclasses.dataclass
class Run:
    """A finished (or running) training run: its config, base params and the adapters at `step`."""
    cfg: RunConfig
    model_cfg: ModelConfig
    lora_cfg: LoraConfig
    params: Any
    adapters: Any
    tokenizer: Any
    step: int


def restore_run(workdir: str, step: int | None = None, *, dtype: str | None = None) -> Run:
    """Base weights from the run's own config and the adapters of its latest (or given) checkpoint.

    dtype: compute in this dtype instead of the run's model.dtype (the frozen weights rounded to it
    once, at load; the adapters stay float32): e.g. 'bfloat16' to predict 1.3-1.6x faster on a CPU
    with AVX512-BF16 from a run trained in float32 (BENCHMARKS.md), its outputs within bf16 rounding.
    """
    cfg = load_run_config(workdir)
    if dtype is not None and dtype != cfg.model.dtype:
        cfg = cfg.replace(model={"dtype": dtype})  # validated with the rest of the config (load_base)
    base = load_base(cfg)
    adapters, at = restore_adapters(base, workdir, step)
    return Run(cfg, base.model_cfg, base.lora_cfg, base.params, jax.device_get(adapters), base.tokenizer, at)
