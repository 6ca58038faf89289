"""From the config's data section to built, opened splits (building on first use).

The dataset is built once into <workdir>/data (or data.data_dir) and reused by later runs,
generation and evaluation, so every stage sees the same token ids and splits.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from socialalign_jax.errors import UserError


@dataclasses.dataclass
class Datasets:
    dataset: Any  # tfds_builders.Dataset
    train: Any  # random-access source of example dicts
    test: Any  # or None
    seq_len: int
    pad_id: int
    labels: tuple[str, ...]


def _tokenizer_dir(tokenizer, workdir: str) -> str | None:
    """The builder reads a tokenizer from disk: save the model's own (e.g. rebuilt from GGUF) there."""
    path = os.path.join(workdir, "tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        tokenizer.save_pretrained(path)
    return path


def default_input(source: str) -> str:
    if source != "socialweibo":
        raise UserError(f"data.source={source!r} needs an input: pass --config.data.input=PATH")
    from socialalign_jax.data.sample import load_sample_dir
    return str(load_sample_dir())


def prepare(cfg, tokenizer, workdir: str, *, build_if_missing: bool = True) -> Datasets:
    from socialalign_jax.data import tfds_builders as B

    data_dir = cfg.data.data_dir or os.path.join(workdir, "data")
    found = None
    if Path(data_dir).exists():
        try:
            found = B.find_dataset_dir(data_dir)
        except Exception:  # noqa: BLE001 - nothing built there yet
            found = None
    if found is None:
        if not build_if_missing:
            raise UserError(f"{data_dir}: no built dataset; run launch/train.py or launch/build_dataset.py first")
        labels = tuple(x.strip() for x in str(cfg.data.labels).split(","))
        if labels != tuple(B.T.SENTIMENTS) and len(labels) != cfg.lora.num_classes:
            raise UserError(f"data.labels has {len(labels)} classes but lora.num_classes={cfg.lora.num_classes}")
        bcfg = B.SocialConfig(
            name="default", source=cfg.data.source, input=cfg.data.input or default_input(cfg.data.source),
            tokenizer=_tokenizer_dir(tokenizer, workdir), max_length=int(cfg.data.max_length), mode=cfg.data.mode,
            on_overflow=cfg.data.on_overflow, test_fraction=float(cfg.data.test_fraction),
            split_by=cfg.data.split_by, seed=int(cfg.data.seed), labels=labels,
            max_events=int(cfg.data.get("max_events", 0) or 0))
        B.build(data_dir, bcfg)
    ds = B.open_dataset(data_dir)
    test = ds.sources.get("test")
    return Datasets(ds, ds.source("train"), test, ds.max_length, ds.pad_id,
                    tuple(ds.metadata.get("classes") or B.T.SENTIMENTS))
