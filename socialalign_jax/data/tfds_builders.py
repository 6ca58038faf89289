"""tensorflow-datasets builders (array_record, no TensorFlow) for Weibo events and LaMP.

tfds' GeneratorBasedBuilder writes array_record shards from plain Python/numpy when
`file_format='array_record'`, and `as_data_source()` reads them back as a random-access
source for grain; neither path imports TensorFlow (`as_dataset` and `tfds build` do, so
they are not used). Everything a training run needs beside the examples is stored in the
dataset's metadata.json: the event table, per-split index (event id and length of every
example, so the pipeline can plan batches without reading records), the macro targets,
the build config (source, tokenizer, prompt) and the build statistics.

Layout: DATA_DIR/<builder name>/<config name>/<version>/ (tfds' usual one), plus
DATA_DIR/.../targets.json written beside it for people; `open_dataset(DATA_DIR)` finds it.
Stock tfds reads it by name once this module is imported: `tfds.data_source("socialweibo",
data_dir=DATA_DIR)` / `tfds.builder(...)` (config 'default', the one registered config; on an
empty DATA_DIR it builds the bundled sample), or "socialweibo/<config>" for a dataset built
under another config name (tfds then reads it from its files).

Sources: SOURCES maps a name to `reader(path) -> list[Event]` (the bundled converters of
socialalign_jax/data/converters are listed there; further corpora add theirs with
`register_source`). A reader
may return a list carrying a `source_info` dict (conversion counts, whether its labels are
silver); it is stored in the metadata. Class names are configurable (`SocialConfig.labels`,
metadata 'classes'), so stance corpora (favor/against/neutral) fit the same pipeline. LaMP has its own builder because its unit is
a question with a profile rather than an event with cases.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds

from socialalign_jax.core.atomic_io import write_failure, write_json
from socialalign_jax.data import lamp, targets as T
from socialalign_jax.data.alpaca import read_alpaca
from socialalign_jax.data.converters import STANCE_LABELS, read_ced, read_nlpcc2016, read_zs_csd
from socialalign_jax.data.converters.ced import CROWD_CAP, MIN_CROWD
from socialalign_jax.data.prompt import build_example, BuildStats, PromptConfig
from socialalign_jax.data.records import DEFAULT_LABELS, DataError, Event, read_event_dir
from socialalign_jax.data.sample import SAMPLE_DIR
from socialalign_jax.runs.run_config import DataSection
from socialalign_jax.weights.tokenizer import TokenizerFileError, load_tokenizer

VERSION = "1.0.0"
NUM_CLASSES = len(DEFAULT_LABELS)  # the default label set's size


# ----------------------------------------------------------------------------- sources

def _read_socialweibo(path: str) -> list[Event]:
    p = Path(path)
    if not p.exists():
        raise DataError(p, "no such directory")
    return read_event_dir(p)


def _read_alpaca(path: str) -> list[Event]:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.json"))
        if not files:
            raise DataError(p, "no *.json Alpaca files")
        events = [e for f in files for e in read_alpaca(f)]
        names = [e.event_id for e in events]
        if len(set(names)) != len(names):
            raise DataError(p, "two Alpaca files give the same event id")
        return events
    return read_alpaca(p)


# The sources a build can name: our event format, Alpaca records, and the bundled converters of
# public corpora (listed here, not registered as a side effect of importing them).
SOURCES: dict[str, Callable[..., list[Event]]] = {
    "socialweibo": _read_socialweibo,
    "alpaca": _read_alpaca,
    "ced": read_ced,
    "zs_csd": read_zs_csd,
    "nlpcc2016": read_nlpcc2016,
}
# The label set each converter's reader gives its cases (stances, or CED's silver sentiment from
# the lexicon labeller): fixed names, which the class names must include (in any order; a class
# no case has may be added).
SOURCE_LABELS: dict[str, tuple[str, ...]] = {"ced": DEFAULT_LABELS, "zs_csd": STANCE_LABELS,
                                             "nlpcc2016": STANCE_LABELS}


def labels_problem(source: str, labels: Sequence[str]) -> str | None:
    """Why `labels` cannot name a source's classes (a converter's are fixed), or None: checked before
    any input is read, so the setting is named, not the first record that does not fit it."""
    fixed = SOURCE_LABELS.get(source)
    missing = [name for name in fixed or () if name not in labels]
    if missing:
        return (f"{','.join(labels)!r}: source {source!r} labels its cases {','.join(fixed)}, so the classes "
                f"must include {','.join(missing)} (in the order you want) or leave the setting out")
    return None


def register_source(name: str, reader: Callable[..., list[Event]], labels: Sequence[str] | None = None) -> None:
    """Add a converter (e.g. ced, zs_csd, nlpcc2016) usable as `--source name`.

    A reader that accepts `max_events=` supports `SocialConfig.max_events` (development
    builds on the first N events); `labels` is the class set its cases use.
    """
    if name in SOURCES or name == "lamp":
        raise ValueError(f"source {name!r} is already registered")
    SOURCES[name] = reader
    if labels is not None:
        SOURCE_LABELS[name] = tuple(labels)


def default_labels(source: str) -> tuple[str, ...]:
    return SOURCE_LABELS.get(source, DEFAULT_LABELS)


def read_source(cfg: "SocialConfig") -> list[Event]:
    """Run the configured reader, passing it the converter options it takes (max_events, labeller,
    crowd_cap, min_crowd); an option set away from its default for a reader without it is an error."""
    import inspect

    if cfg.source not in SOURCES:
        raise ValueError(f"unknown source {cfg.source!r}; expected one of {sorted(SOURCES)}")
    reader = SOURCES[cfg.source]
    takes = inspect.signature(reader).parameters
    defaults = {f.name: f.default for f in dataclasses.fields(SocialConfig)}
    kw = {}
    for name in ("max_events", "labeller", "crowd_cap", "min_crowd"):
        value = getattr(cfg, name)
        if name in takes:
            if value != defaults[name]:
                kw[name] = value
        elif value != defaults[name]:
            raise DataError(cfg.input, f"source {cfg.source!r} does not support {name}")
    return reader(cfg.input, **kw)


# ----------------------------------------------------------------------------- config

_RUN_DATA = DataSection()


@dataclasses.dataclass(eq=False)
class SocialConfig(tfds.core.BuilderConfig):
    """What to build and how; recorded in the dataset metadata.

    The settings a run's config also has (data.source, data.max_length, ...) default to the
    run's (runs/run_config.DataSection, their one declaration), so a dataset built without a
    run config is the one `launch/train.py --config configs/weibo.py` would build.
    """

    source: str = _RUN_DATA.source
    input: str = _RUN_DATA.input
    tokenizer: str | None = None  # tokenizer dir/file; None = the bundled Qwen2 vocabulary
    max_length: int = _RUN_DATA.max_length
    mode: str = _RUN_DATA.mode
    on_overflow: str = _RUN_DATA.on_overflow
    num_history: int = _RUN_DATA.num_history
    test_fraction: float = _RUN_DATA.test_fraction
    split_by: str = _RUN_DATA.split_by  # 'event' (held-out events) | 'user' (held-out users)
    seed: int = _RUN_DATA.seed
    lamp_outputs: str | None = None  # LaMP: outputs file (else taken from the input dir)
    lamp_task: str | None = None  # LaMP: 'LaMP-4' | 'LaMP-5' | 'LaMP-7'
    labels: tuple[str, ...] = _RUN_DATA.labels  # class names, in class-id order
    max_events: int = _RUN_DATA.max_events  # converters: read only the first N events (0 = all)
    # Converters that label their own responses (ced): the labeller's name (data/labellers.LABELLERS;
    # "" = the converter's default) and the crowd each event's target is computed over.
    labeller: str = ""
    crowd_cap: int = CROWD_CAP
    min_crowd: int = MIN_CROWD
    # Names of the events to hold out (k-fold cross-validation, socialalign_jax/experiments):
    # when given, they are the test split and test_fraction is not used.
    test_events: tuple[str, ...] = ()

    def __post_init__(self):
        self.labels = tuple(str(x).strip() for x in self.labels)
        self.test_events = tuple(str(x) for x in self.test_events)
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels) or not all(self.labels):
            raise ValueError(f"labels must be at least 2 distinct non-empty names, got {list(self.labels)}")

    def record(self) -> dict:
        skip = {"name", "version", "release_notes", "supported_versions", "description", "tags"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


def _features(num_classes: int = NUM_CLASSES) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "input_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "loss_mask": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
        "user_end": np.int32, "news_end": np.int32, "prompt_len": np.int32,
        "label": np.int32, "event_id": np.int32, "case_index": np.int32,
        "n_truncated_history_chars": np.int32,
        "target_dist": tfds.features.Tensor(shape=(num_classes,), dtype=np.float32),
        "event": tfds.features.Text(), "user": tfds.features.Text(), "response": tfds.features.Text(),
    })


# ----------------------------------------------------------------------------- splitting

@dataclasses.dataclass
class Unit:
    """One case to encode: where it sits and how to tokenise it."""

    event_id: int
    case_index: int
    user: str
    response: str
    label: int
    encode: Callable[[Any], dict | None]  # stats -> example fields or None (skipped)


def _held_out(names: Sequence[str], fraction: float, seed: int) -> set[str]:
    """A seeded random `fraction` of the (sorted, unique) names; at least 1, never all."""
    names = sorted(set(names))
    if fraction <= 0 or len(names) < 2:
        return set()
    n = min(max(1, int(round(fraction * len(names)))), len(names) - 1)
    perm = np.random.default_rng(seed).permutation(len(names))
    return {names[i] for i in perm[:n]}


def assign_splits(units: Sequence[Unit], event_names: Sequence[str], cfg: SocialConfig) -> list[str]:
    if not 0 <= cfg.test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {cfg.test_fraction}")
    if cfg.test_events:
        unknown = sorted(set(cfg.test_events) - set(event_names))
        if unknown:
            raise ValueError(f"test_events: {len(unknown)} name(s) are not events of the input, e.g. {unknown[0]!r}")
        test = set(cfg.test_events)
        return ["test" if event_names[u.event_id] in test else "train" for u in units]
    if cfg.split_by == "event":
        test = _held_out([event_names[u.event_id] for u in units], cfg.test_fraction, cfg.seed)
        return ["test" if event_names[u.event_id] in test else "train" for u in units]
    if cfg.split_by == "user":
        test = _held_out([u.user for u in units], cfg.test_fraction, cfg.seed)
        return ["test" if u.user in test else "train" for u in units]
    raise ValueError(f"split_by must be 'event' or 'user', got {cfg.split_by!r}")


# ----------------------------------------------------------------------------- preparation

def prepare(units: Sequence[Unit], event_names: Sequence[str], cfg: SocialConfig,
            source_info: dict | None = None, crowds: dict[int, np.ndarray] | None = None) -> tuple[dict, dict]:
    """Encode every unit, split, and attach targets -> ({split: [example]}, metadata).

    `source_info`: what the reader reported (conversion counts, `silver_labels`), kept in
    the metadata as 'source_info'; 'silver_labels' is also a top-level metadata flag.
    `crowds`: {event id: label counts [K]} of the events that have a crowd (`event_crowds`),
    which are then their targets (data/targets.py).
    """

    splits = assign_splits(units, event_names, cfg)
    names = sorted(set(splits), key=["train", "test"].index)
    # Targets come from every labelled response (also those later rejected for length):
    # the crowd's reaction does not depend on our context window.
    lab = {s: (np.array([u.event_id for u, t in zip(units, splits) if t == s], np.int64),
               np.array([u.label for u, t in zip(units, splits) if t == s], np.int64)) for s in names}
    targets = T.macro_targets(lab, len(cfg.labels), crowds=crowds)
    stats = BuildStats()
    out: dict[str, list[dict]] = {s: [] for s in names}
    from tqdm import tqdm

    # Progress on an interactive terminal only (disable=None): encoding is the slow part of a build.
    for u, s in tqdm(list(zip(units, splits)), desc="encoding cases", unit="case", disable=None, leave=False,
                     file=sys.stderr):
        ex = u.encode(stats)
        if ex is None:
            continue
        out[s].append({
            "input_ids": np.asarray(ex["input_ids"], np.int32),
            "loss_mask": np.asarray(ex["loss_mask"], np.uint8),
            "user_end": int(ex["user_end"]), "news_end": int(ex["news_end"]),
            "prompt_len": int(ex["prompt_len"]), "label": u.label, "event_id": u.event_id,
            "case_index": u.case_index, "n_truncated_history_chars": int(ex["n_truncated_history_chars"]),
            "target_dist": np.asarray(targets[s][u.event_id]["dist"], np.float32),
            "event": event_names[u.event_id], "user": u.user, "response": u.response,
        })
    meta = {
        "config": cfg.record(),
        "classes": list(cfg.labels),
        "silver_labels": bool((source_info or {}).get("silver_labels", False)),
        "source_info": dict(source_info or {}),
        "events": list(event_names),
        "targets": T.to_json(targets, event_names),
        "index": {s: {"event_id": [int(e["event_id"]) for e in exs],
                      "length": [int(len(e["input_ids"])) for e in exs]} for s, exs in out.items()},
        "labels": {s: [int(e["label"]) for e in exs] for s, exs in out.items()},
        # Checked by the trainer before step 1 (train/data_setup.check_against_model): the longest
        # response (scored tokens) per split vs loss.max_response_tokens, the largest id vs the vocabulary.
        "response_tokens_max": {s: max((int(e["loss_mask"].sum()) for e in exs), default=0)
                                for s, exs in out.items()},
        "max_token_id": max((int(e["input_ids"].max()) for exs in out.values() for e in exs if len(e["input_ids"])),
                            default=-1),
        "stats": {"units": len(units), "built": stats.built, "skipped_too_long": stats.skipped_too_long,
                  "history_truncated": stats.history_truncated, "history_chars_cut": stats.history_chars_cut,
                  "persona_truncated": stats.persona_truncated, "persona_chars_cut": stats.persona_chars_cut,
                  "skipped": stats.skipped},
    }
    return out, meta


def _prompt_config(cfg: SocialConfig):

    return PromptConfig(mode=cfg.mode, max_length=cfg.max_length, on_overflow=cfg.on_overflow,
                        num_history=cfg.num_history)


def event_crowds(events: Sequence[Event], cfg: SocialConfig) -> dict[int, np.ndarray]:
    """{event id (position in `events`): crowd label counts [K] in cfg.labels order} of the events with a crowd."""
    out = {}
    for e, ev in enumerate(events):
        if ev.crowd:
            try:
                out[e] = T.crowd_counts(ev.crowd, cfg.labels)
            except ValueError as err:
                raise DataError(ev.source, str(err), None, "crowd") from None
    return out


def event_units(events: Sequence[Event], tokenizer, cfg: SocialConfig) -> tuple[list[Unit], list[str]]:

    pcfg = _prompt_config(cfg)
    units, names = [], []
    for ev in events:
        eid = len(names)
        names.append(ev.event_id)
        for ci, case in enumerate(ev.cases):
            try:
                label = T.label_id(case.sentiment, cfg.labels)
            except ValueError as e:
                hint = ""
                if cfg.source in SOURCE_LABELS and tuple(cfg.labels) != SOURCE_LABELS[cfg.source]:
                    hint = f" (source {cfg.source!r} uses labels {','.join(SOURCE_LABELS[cfg.source])})"
                raise DataError(ev.source, str(e) + hint, ci, "sentiment") from None
            units.append(Unit(eid, ci, case.user_name, case.weibo, label,
                              lambda st, c=case, e=ev: build_example(c, e, tokenizer, pcfg, st)))
    return units, names


def lamp_units(cfg: SocialConfig, tokenizer) -> tuple[list[Unit], list[str]]:
    """Each question is its own event (named by its id), unlabelled."""

    questions, outputs = lamp_files(cfg.input, cfg.lamp_outputs)
    task, qs = lamp.read_lamp(questions, outputs, cfg.lamp_task)
    pcfg = _prompt_config(cfg)
    units = [Unit(i, 0, q.id, q.output or "", -1,
                  lambda st, q=q: lamp.build_lamp_example(q, task, tokenizer, pcfg, st))
             for i, q in enumerate(qs)]
    return units, [q.id for q in qs]


def lamp_files(path: str, outputs: str | None) -> tuple[Path, Path | None]:
    """A questions file, or a directory holding one *questions*.json (and *outputs*.json)."""
    p = Path(path)
    if p.is_file():
        return p, Path(outputs) if outputs else None
    if not p.is_dir():
        raise DataError(p, "no such file or directory")

    def one(pattern: str, required: bool) -> Path | None:
        hits = sorted(p.glob(pattern))
        if len(hits) > 1:
            raise DataError(p, f"several {pattern} files: {', '.join(h.name for h in hits)}; pass the file")
        if not hits and required:
            raise DataError(p, f"no {pattern} file")
        return hits[0] if hits else None

    return one("*questions*.json", True), Path(outputs) if outputs else one("*outputs*.json", False)


def _tokenizer(cfg: SocialConfig):

    try:
        return load_tokenizer(cfg.tokenizer)
    except TokenizerFileError as e:
        raise DataError(cfg.tokenizer, str(e)) from None


# ----------------------------------------------------------------------------- builders

class _Base(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version(VERSION)
    # Nothing is downloaded. tfds would otherwise look for a checksums file beside this
    # module, a lookup that needs the importlib_resources backport for package modules.
    url_infos: dict = {}

    def _create_builder_config(self, builder_config, version):
        """A SocialConfig object is used as given, also under a registered name: 'default' is both
        the config `tfds.builder(name)` reads and the name the trainer builds its dataset under."""
        if isinstance(builder_config, SocialConfig):
            return builder_config
        return super()._create_builder_config(builder_config, version)

    def _info(self) -> tfds.core.DatasetInfo:
        features = _features(len(self.builder_config.labels))
        if (Path(self.data_dir) / "features.json").is_file():
            # A dataset already built under this config name (e.g. 'default' with another label
            # set): its own features, so tfds.builder(name) reads it as it was written.
            features = tfds.features.FeatureConnector.from_config(self.data_dir)
        return tfds.core.DatasetInfo(builder=self, features=features,
                                     disable_shuffling=True,
                                     metadata=tfds.core.MetadataDict(),
                                     description=(self.__class__.__doc__ or "").strip())

    @abc.abstractmethod
    def _units(self, tokenizer) -> tuple[list[Unit], list[str]]:
        """(units to encode, event names) of this source."""

    source_info: dict | None = None
    crowds: dict[int, np.ndarray] | None = None

    def prepared(self) -> tuple[dict, dict]:
        """Read, encode and split everything (all input errors surface here)."""
        cfg: SocialConfig = self.builder_config
        tok = _tokenizer(cfg)
        units, names = self._units(tok)
        examples, meta = prepare(units, names, cfg, self.source_info, self.crowds)
        meta["config"]["tokenizer_name"] = getattr(tok, "name_or_path", None) or "bundled qwen2"
        meta["config"]["pad_id"] = int(tok.pad_token_id)
        return examples, meta

    def _split_generators(self, dl_manager):
        examples, meta = getattr(self, "_prepared", None) or self.prepared()
        self.info.metadata.update(meta)
        return {s: self._generate_examples(exs) for s, exs in examples.items()}

    def download_and_prepare(self, *, download_dir=None, download_config=None, file_format=None):
        """tfds' download_and_prepare with nothing to download: the download manager's folders
        live in a temporary directory (no empty downloads/extracted left in data_dir), and the
        'Downloading and preparing dataset Unknown size' banner is not printed. Also what
        `tfds.data_source(name, data_dir=...)` calls when the dataset is not built yet."""
        with tempfile.TemporaryDirectory(prefix="socialalign-tfds-") as tmp:
            super().download_and_prepare(download_dir=download_dir or tmp, download_config=download_config,
                                         file_format=file_format or "array_record")

    def _log_download_bytes(self) -> None:  # tfds' banner about download sizes: nothing is downloaded
        pass

    def _log_download_done(self) -> None:
        logging.info("built %s in %s", self.name, self.data_dir)

    def _generate_examples(self, examples: Iterable[dict] = ()):
        for i, ex in enumerate(examples):
            yield i, ex


class Socialweibo(_Base):
    """Weibo public-response events (raw event files or the authors' Alpaca list)."""

    name = "socialweibo"
    # tfds.builder / tfds.data_source by name need a registered config: 'default' (the name the
    # trainer and launch/build_dataset.py build under) reads what is there, or builds the bundled
    # synthetic sample when nothing is. Other configs are SocialConfig(name=..., ...) passed to build().
    BUILDER_CONFIGS = [SocialConfig(name="default", input=str(SAMPLE_DIR / "events"),
                                    description="the bundled synthetic sample, or what was built under 'default'")]

    def _units(self, tokenizer):
        cfg = self.builder_config
        events = read_source(cfg)
        self.source_info = getattr(events, "source_info", None)
        self.crowds = event_crowds(events, cfg)
        return event_units(events, tokenizer, cfg)


class Lamp(_Base):
    """LaMP-4/5/7 personalised generation, one question per event, profile = user span."""

    name = "lamp"
    BUILDER_CONFIGS = [SocialConfig(name="default", source="lamp",
                                    description="what was built under 'default' (LaMP is not bundled)")]

    def _units(self, tokenizer):
        return lamp_units(self.builder_config, tokenizer)


# ----------------------------------------------------------------------------- entry points

def build(out_dir: str | os.PathLike, cfg: SocialConfig, *, overwrite: bool = False) -> Path:
    """Build into out_dir (tfds layout); returns the dataset directory.

    The input is read and encoded before tfds creates any directory, so bad input leaves
    nothing behind. An existing dataset at the target is an error unless `overwrite`.
    """
    tfds.disable_progress_bar()
    cls = Lamp if cfg.source == "lamp" else Socialweibo
    builder = cls(data_dir=str(out_dir), config=cfg)
    target = Path(builder.data_dir)
    if target.exists() and not overwrite:
        raise DataError(target, "a dataset is already there; pass --overwrite or choose another --out")
    prepared = builder.prepared()
    if target.exists():
        shutil.rmtree(target)
        builder = cls(data_dir=str(out_dir), config=cfg)  # forget the old dataset_info
    builder._prepared = prepared
    # The directories this build creates: removed again when it fails, so a failed build (a full
    # disk) leaves nothing a rerun would take for a dataset, not even empty folders.
    created = [d for d in (target, *target.parents) if not d.exists()]
    try:
        builder.download_and_prepare(file_format="array_record", download_config=tfds.download.DownloadConfig())
        write_json(builder.info.metadata["targets"], target / "targets.json")
    except Exception as e:  # noqa: BLE001 - write_failure re-raises what is not an OS error
        for d in created[-1:]:  # the outermost one holds the rest
            shutil.rmtree(d, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        raise write_failure(str(target), e, lambda: _examples_bytes(prepared[0])) from None
    return target


def _examples_bytes(examples: dict) -> int:
    """About what the array_record files of these examples take: their arrays' bytes."""
    return int(sum(np.asarray(v).nbytes for exs in examples.values() for ex in exs for v in ex.values()))


@dataclasses.dataclass
class Dataset:
    """A built dataset: random-access sources per split plus its metadata."""

    path: Path
    metadata: dict
    sources: dict

    def source(self, split: str):
        if split not in self.sources:
            raise KeyError(f"{self.path}: no split {split!r} (have {sorted(self.sources)})")
        return self.sources[split]

    def index(self, split: str) -> dict[str, np.ndarray]:
        ix = self.metadata["index"][split]
        return {k: np.asarray(v, np.int64) for k, v in ix.items()}

    def targets(self, split: str) -> dict[int, dict]:
        return T.from_json(self.metadata["targets"])[split]

    @property
    def max_length(self) -> int:
        return int(self.metadata["config"]["max_length"])

    @property
    def pad_id(self) -> int:
        return int(self.metadata["config"]["pad_id"])


def find_dataset_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if (p / "dataset_info.json").exists():
        return p
    hits = sorted(q.parent for q in p.glob("**/dataset_info.json") if "incomplete" not in str(q))
    if not hits:
        raise DataError(p, "no built dataset (dataset_info.json) found")
    if len(hits) > 1:
        raise DataError(p, f"several datasets: {', '.join(str(h) for h in hits)}; pass one of them")
    return hits[0]


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Open a built dataset by its directory (or a parent holding exactly one)."""
    d = find_dataset_dir(path)
    builder = tfds.builder_from_directory(str(d))
    meta = dict(builder.info.metadata or {})
    return Dataset(d, meta, dict(builder.as_data_source()))

