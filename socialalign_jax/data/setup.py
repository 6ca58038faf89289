"""From the config's data section to built, opened splits (building on first use).

The dataset is built once into <workdir>/data (or data.data_dir) and reused by later runs,
generation and evaluation, so every stage sees the same token ids and splits.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from socialalign_jax.core.atomic_io import atomic_dir
from socialalign_jax.core.errors import UserError
from socialalign_jax.core.labels import DEFAULT_LABELS
from socialalign_jax.data import tfds_builders as B
from socialalign_jax.data.sample import load_sample_dir
from socialalign_jax.runs.run_config import RunConfig


@dataclasses.dataclass
class Datasets:
    dataset: Any  # tfds_builders.Dataset
    train: Any  # random-access source of example dicts
    test: Any  # or None
    seq_len: int
    pad_id: int
    labels: tuple[str, ...]  # class names in id order (the metadata's "classes")
    cfg: RunConfig | None = None  # the run config with the data.* settings the dataset was built with (check_build_settings)


def _tokenizer_dir(tokenizer, workdir: str) -> str | None:
    """The builder reads a tokenizer from disk: save the model's own (e.g. rebuilt from GGUF) there.

    Saved atomically (a temporary directory renamed into place), so a crash or a full disk
    never leaves a partial tokenizer.json that later runs would trust; one left by an older
    version (unparseable) is replaced.
    """
    import json
    import shutil

    path = os.path.join(workdir, "tokenizer")
    tok_json = os.path.join(path, "tokenizer.json")
    if os.path.exists(tok_json):
        try:
            with open(tok_json, encoding="utf-8") as f:
                json.load(f)
            return path
        except (OSError, ValueError):
            shutil.rmtree(path, ignore_errors=True)  # derived from the weights: rebuilt below
    elif os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
    with atomic_dir(path, needed=lambda: _saved_size(tokenizer)) as tmp:
        tokenizer.save_pretrained(tmp)
    return path


def _saved_size(tokenizer) -> int:
    """About what save_pretrained writes: tokenizer.json (indented, as transformers saves it) dominates."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return len(backend.to_str(pretty=True).encode("utf-8")) if backend is not None else 0


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def default_input(source: str) -> str:
    if source != "socialweibo":
        raise UserError(f"data.source={source!r} needs an input: pass --config.data.input=PATH")
    return str(load_sample_dir())


def prepare(cfg: RunConfig, tokenizer, workdir: str, *, build_if_missing: bool = True) -> Datasets:
    """The run's dataset (built into <workdir>/data if missing), its splits and what it was built with."""

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
        labels = cfg.data.labels
        if labels != tuple(DEFAULT_LABELS) and len(labels) != cfg.lora.num_classes:
            raise UserError(f"data.labels has {len(labels)} classes but lora.num_classes={cfg.lora.num_classes}")
        why = B.labels_problem(cfg.data.source, labels)
        if why:
            raise UserError(f"data.labels {why}")
        bcfg = B.SocialConfig(
            name="default", source=cfg.data.source, input=cfg.data.input or default_input(cfg.data.source),
            tokenizer=_tokenizer_dir(tokenizer, workdir), max_length=cfg.data.max_length, mode=cfg.data.mode,
            on_overflow=cfg.data.on_overflow, test_fraction=cfg.data.test_fraction,
            split_by=cfg.data.split_by, seed=cfg.data.seed, labels=labels,
            max_events=cfg.data.max_events, num_history=cfg.data.num_history,
            lamp_outputs=cfg.data.lamp_outputs or None, lamp_task=cfg.data.lamp_task or None)
        B.build(data_dir, bcfg)
    ds = B.open_dataset(data_dir)
    if found is not None:
        # Readers of a finished run (generate, predict) use its dataset as built; a trainer that
        # would build into its own <workdir>/data must not silently train on other settings.
        ignored, cfg = check_build_settings(cfg, ds, explicit_dir=bool(cfg.data.data_dir) or not build_if_missing)
        if ignored and _is_main():
            print(f"note: using the dataset in {ds.path} as built; ignored: {'; '.join(ignored)}")
    test = ds.sources.get("test")
    return Datasets(ds, ds.source("train"), test, ds.max_length, ds.pad_id,
                    tuple(ds.metadata.get("classes") or DEFAULT_LABELS), cfg)


# The data.* keys that decide what a built dataset holds (data.seed also orders batches; it is
# compared only through the split it produced, so it may change over one built dataset).
BUILD_KEYS = ("source", "input", "max_length", "mode", "on_overflow", "test_fraction", "split_by",
               "labels", "max_events", "num_history")


def check_build_settings(cfg: RunConfig, ds, *, explicit_dir: bool) -> tuple[list[str], RunConfig]:
    """data.* settings that differ from what the existing dataset was built with.

    Without this the dataset on disk was used as it is while config.json recorded the
    override as if it had applied. In the run's own `<workdir>/data` a difference is an
    error (the run's data settings changed). A dataset named by data.data_dir is used as
    built: returns the differences (printed as one note) and the run config with the built
    values in place of the differing data.* ones, so config.json records what was used.
    on_overflow counts as different only if the build skipped examples; the input is compared
    as a resolved path.
    """
    built = ds.metadata.get("config") or {}
    classes = list(ds.metadata.get("classes") or built.get("labels") or [])
    diffs, adopt = [], {}
    for key in BUILD_KEYS:
        want, have = getattr(cfg.data, key), built.get(key)
        if key == "input":
            want = want or (default_input(cfg.data.source) if cfg.data.source == "socialweibo" else "")
            same = bool(want) and bool(have) and os.path.realpath(str(want)) == os.path.realpath(str(have))
        elif key == "labels":
            want, have = ",".join(want), ",".join(classes)  # named as the command line spells them
            same = want == have
        elif key == "on_overflow":
            skipped = int((ds.metadata.get("stats") or {}).get("skipped_too_long", 0))
            same = want == have or skipped == 0
        elif key == "test_fraction":
            same = have is not None and abs(float(want) - float(have)) < 1e-12
        elif key == "max_events":
            same = int(want or 0) == int(have or 0)
        else:
            same = want == have or have is None
        if not same:
            diffs.append(f"data.{key}={want!r} (built with {have!r})")
            if have is not None:  # an older build that did not record the setting: keep the config's
                adopt[key] = have
    if diffs and not explicit_dir:
        raise UserError(f"{ds.path}: the dataset there was built with other settings: {'; '.join(diffs)}; "
                        "set them to the built values, or pass --config.data.data_dir=NEW_DIR to build another "
                        "(or delete that directory to rebuild it)")
    return diffs, (cfg.replace(data=adopt) if adopt else cfg)


def _split_scan(source, field: str, reduce) -> int:
    """Fallback for datasets built before the metadata held it: read every example once."""
    out = 0
    for i in range(len(source)):
        out = max(out, int(reduce(source[i][field])))
    return out


def check_against_model(data: Datasets, cfg: RunConfig, model_cfg, tokenizer) -> None:
    """Before anything compiles: the built dataset fits the model and the loss.

    - every response fits loss.max_response_tokens (else step N would refuse it after compiling),
    - the dataset's classes are the config's data.labels and fit lora.num_classes,
    - every token id is inside the model's vocabulary (a dataset built with another tokenizer).
    Read from the dataset metadata (response_tokens_max, max_token_id); older datasets are scanned.
    """
    import numpy as np

    meta = data.dataset.metadata
    where = str(data.dataset.path)
    splits = {"train": data.train, **({"test": data.test} if data.test is not None else {})}
    limit = int(cfg.loss.max_response_tokens)
    if limit > 0:
        stored = meta.get("response_tokens_max") or {}
        for name, src in splits.items():
            longest = stored.get(name)
            if longest is None:
                longest = _split_scan(src, "loss_mask", lambda m: np.asarray(m).sum())
            if int(longest) > limit:
                raise UserError(
                    f"{where}: the {name} split has a response of {int(longest)} tokens but "
                    f"loss.max_response_tokens={limit}; pass --config.loss.max_response_tokens={int(longest)} "
                    "or more (responses are never truncated)")
    classes = list(meta.get("classes") or data.labels)
    want = list(cfg.data.labels)
    if classes != want:
        raise UserError(f"{where}: the dataset's classes are {','.join(classes)} but data.labels={','.join(want)}")
    n_cls = int(cfg.lora.num_classes)
    if n_cls and n_cls != len(classes):
        raise UserError(f"{where}: the dataset has {len(classes)} classes but lora.num_classes={n_cls}")
    top = meta.get("max_token_id")
    if top is None:
        top = max(_split_scan(src, "input_ids", lambda x: np.max(x) if len(x) else -1) for src in splits.values())
    if int(top) >= int(model_cfg.vocab_size):
        raise UserError(
            f"{where}: token id {int(top)} is outside the model's vocabulary ({model_cfg.vocab_size} ids); the dataset "
            f"was built with another tokenizer ({(meta.get('config') or {}).get('tokenizer_name')!r}): rebuild it with "
            "the model's tokenizer (a new --config.data.data_dir)")
