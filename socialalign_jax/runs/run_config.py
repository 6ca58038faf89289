"""The typed run config: what a config file (configs/*.py) says, as frozen dataclasses.

The ml_collections file stays the user interface (`--config configs/weibo.py:preset
--config.a.b=v`, with its comments and presets). At the boundary (each launcher, and each public
entry point a library user may call with a ConfigDict: `train.loop.train`, `runs.restore.load_base`,
...) it is converted once by `RunConfig.from_config`, which checks every key and value and says
what is wrong in one line; below that boundary the code reads typed attributes (`cfg.train.num_steps`)
and nothing reads a ConfigDict. A run's config.json is `RunConfig.to_dict()`, and reading it back
(`from_config(json)`) fills keys an older run did not record from the defaults here.

The defaults below are those of `configs/weibo.py`'s default preset (tests/test_run_config.py
checks that they agree, key for key, so neither can drift).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from socialalign_jax.core.errors import UserError
from socialalign_jax.core.labels import DEFAULT_LABELS
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.model.sampling import SamplingConfig
from socialalign_jax.parallel import axis_rules


@dataclasses.dataclass(frozen=True)
class ModelSection:
    weights: str = "random:small-qwen2"  # gguf:smollm2 | hf:/dir | gguf:/file | random:<preset>
    dtype: str = "float32"  # compute and frozen-param dtype; adapters are always float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = True
    attention: str = "auto"
    seed: int = 0  # random weights only
    random_init: str = ""  # recorded by the trainer for random weights (decoder.RANDOM_INIT)


_LC = LoraConfig()  # the adapter defaults are LoraConfig's own, not restated


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """config.lora: LoraConfig's fields as the config file spells them (targets comma-separated)."""
    num_analyze: int = _LC.num_analyze
    num_compose: int = _LC.num_compose
    rank: int = _LC.rank
    alpha: float = _LC.alpha
    rslora: bool = _LC.rslora
    dropout: float = _LC.dropout
    gate_width: int = _LC.gate_width
    targets: str = ",".join(_LC.targets)  # '' trains only the sentiment head
    routing: str = _LC.routing
    num_classes: int = _LC.num_classes
    fuse_base: str = _LC.fuse_base


@dataclasses.dataclass(frozen=True)
class DataSection:
    source: str = "socialweibo"
    input: str = ""
    data_dir: str = ""
    tokenizer: str = ""
    labels: str = ",".join(DEFAULT_LABELS)
    max_length: int = 320
    mode: str = "full"
    on_overflow: str = "skip"
    test_fraction: float = 0.25
    split_by: str = "event"
    seed: int = 0
    max_events: int = 0
    num_history: int = 5
    lamp_outputs: str = ""
    lamp_task: str = ""
    events_per_batch: int = 4
    cases_per_event: int = 4
    eval_batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class LossSection:
    lambda_sent: float = 1.0
    lambda_macro: float = 1.0
    estimator: str = "mean"
    gumbel_tau: float = 1.0
    max_response_tokens: int = 48


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 2e-3
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class TrainSection:
    num_epochs: int = 4
    num_steps: int = -1
    seed: int = 0
    log_every: int = 5
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    eval_at_end: bool = True
    eval_max_examples: int = 0
    tensorboard: bool = True
    generate_at_end: bool = True
    labeller: str = "lexicon"


def _default_rules() -> dict[str, str]:
    return axis_rules.as_config_strings()


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: Mapping[str, str] = dataclasses.field(default_factory=_default_rules)  # logical axis -> 'a,b'


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    initialize: str = "auto"


_SC = SamplingConfig()  # the sampler's defaults, not restated (max_new_tokens is the config's own)


@dataclasses.dataclass(frozen=True)
class SampleSection:
    temperature: float = _SC.temperature
    top_p: float = _SC.top_p
    top_k: int = _SC.top_k
    repetition_penalty: float = _SC.repetition_penalty
    max_new_tokens: int = 64  # the quickstart's posts; SamplingConfig's 256 is the paper presets'
    greedy: bool = _SC.greedy
    seed: int = _SC.seed
    batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class HardwareSection:
    peak_flops_per_device: float = 0.0


_SECTIONS: dict[str, type] = {
    "model": ModelSection, "lora": LoraSection, "data": DataSection, "loss": LossSection,
    "optim": OptimSection, "train": TrainSection, "mesh": MeshSection, "distributed": DistributedSection,
    "sample": SampleSection, "hardware": HardwareSection,
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: one frozen section per concern (see configs/weibo.py for what each key does)."""
    preset: str = "default"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    loss: LossSection = dataclasses.field(default_factory=LossSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)
    sample: SampleSection = dataclasses.field(default_factory=SampleSection)
    hardware: HardwareSection = dataclasses.field(default_factory=HardwareSection)

    @classmethod
    def from_config(cls, cfg: Any, *, source: str = "config") -> "RunConfig":
        """A ConfigDict, a nested mapping (config.json) or a RunConfig -> RunConfig.

        Keys the mapping lacks take the defaults above; an unknown section or key, or a value
        of the wrong type, is one UserError line naming `source` and the key.
        """
        if isinstance(cfg, RunConfig):
            return cfg
        top = _as_mapping(cfg)
        unknown = sorted(set(top) - set(_SECTIONS) - {"preset"})
        if unknown:
            raise UserError(f"{source}: unknown section {unknown[0]!r}; known: preset, {', '.join(_SECTIONS)}")
        kw: dict[str, Any] = {}
        if "preset" in top:
            kw["preset"] = _coerce(f"{source}: preset", top["preset"], str)
        for name, section_cls in _SECTIONS.items():
            if name in top:
                kw[name] = _section(section_cls, _as_mapping(top[name]), f"{source}: {name}")
        return cls(**kw)

    def to_dict(self) -> dict:
        """The nested plain dict config.json and the checkpoints hold (same keys as the config file)."""
        out = dataclasses.asdict(self)
        out["mesh"]["rules"] = dict(self.mesh.rules)
        if not out["model"]["random_init"]:  # recorded only for random weights, as before
            del out["model"]["random_init"]
        return out

    def replace(self, **sections) -> "RunConfig":
        """A copy with whole sections or `section={key: value}` updates (validated like from_config)."""
        d = self.to_dict()
        for name, value in sections.items():
            if name == "preset":
                d["preset"] = value
            elif dataclasses.is_dataclass(value):
                d[name] = dataclasses.asdict(value)
            else:
                d[name] = {**d[name], **dict(value)}
        return RunConfig.from_config(d)


def as_run_config(cfg: Any, *, source: str = "config") -> RunConfig:
    """The one conversion (idempotent): what every entry point that takes a run config calls."""
    return RunConfig.from_config(cfg, source=source)


def _as_mapping(obj: Any) -> Mapping:
    if isinstance(obj, Mapping):
        return obj
    if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        return obj.to_dict()
    if hasattr(obj, "items"):
        return dict(obj.items())
    raise UserError(f"a run config must be a config file's ConfigDict or a mapping, got {type(obj).__name__}")


def _section(section_cls: type, given: Mapping, where: str):
    hints = typing.get_type_hints(section_cls)
    fields = {f.name for f in dataclasses.fields(section_cls)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise UserError(f"{where}.{unknown[0]}: unknown key; known: {', '.join(sorted(fields))}")
    kw = {}
    for key, value in given.items():
        kw[key] = _coerce(f"{where}.{key}", value, hints[key])
    return section_cls(**kw)


def _coerce(where: str, value: Any, typ: Any) -> Any:
    """value as `typ` (str, int, float, bool or Mapping[str, str]); a mismatch is one line."""
    origin = typing.get_origin(typ)
    if (origin is not None and issubclass(origin, Mapping)) or typ is Mapping:
        if value is None:
            return {}
        try:
            items = dict(_as_mapping(value))
        except UserError:
            raise UserError(f"{where}: expected a mapping of names to strings, got {value!r}") from None
        return {str(k): "" if v is None else str(v) for k, v in items.items()}
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{where}: unsupported field type {typ!r}")
    raise UserError(f"{where}={value!r}: expected {typ.__name__}")
