"""What a training run works on: the base model, its adapter and loss settings, the mesh and the data.

Built once per run by `build_job`; the loop (train/loop.py), its hooks and the held-out
evaluation (train/evaluate.py) read it and never change it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from socialalign_jax.data import setup
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.parallel import sharding
from socialalign_jax.runs.restore import load_base
from socialalign_jax.runs.run_config import LossConfig, RunConfig


@dataclasses.dataclass
class Job:
    """Everything a training run holds; built by `build_job`, consumed by `train`."""
    cfg: RunConfig
    model_cfg: ModelConfig
    lora_cfg: LoraConfig
    loss_cfg: LossConfig
    params: Any
    tokenizer: Any
    mesh: Any
    data: Any  # data/setup.Datasets
    workdir: str
    rules: tuple | None = None  # logical axis rules (config mesh.rules); None = the defaults


def build_job(cfg: RunConfig, workdir: str) -> Job:
    """The base model (runs.restore.load_base, as inference reads it back) plus the data."""

    base = load_base(cfg)
    data = setup.prepare(base.cfg, base.tokenizer, workdir)
    cfg = data.cfg  # with the data.* values the dataset was built with
    setup.check_against_model(data, cfg, base.model_cfg, base.tokenizer)  # before anything compiles
    return Job(cfg, base.model_cfg, base.lora_cfg, cfg.loss, base.params, base.tokenizer, base.mesh,
               data, workdir, base.rules)


def global_batch(local: dict, mesh, rules) -> dict:
    """This process's rows of a batch ({name: [b_local, ...] numpy}) -> the global batch, split over the batch axes."""
    sh = sharding.batch_sharding(mesh, rules)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in local.items()}
