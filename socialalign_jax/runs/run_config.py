"""The run config: every setting of a run, declared once, with its default and what it means.

This module is the one defaults file (maxtext's base.yml): a config file (configs/weibo.py) is
`RunConfig()` plus, per preset, only the settings that preset changes. Each section is the config
of the component that reads it, not a copy of its fields: `lora` is `model.pac_lora.LoraConfig`,
`sample` is `model.sampling.SamplingConfig` (plus the rows per generate call), `loss` and `optim`
are `LossConfig` and `OptimConfig` below, which train/step.py and train/optim.py take as they are
(they are declared here, not in train/, because runs/ sits below train/ in the import layers). So
a new setting is one field here plus the code that reads it.

The config file's ml_collections ConfigDict stays the user interface (`--config FILE:preset
--config.a.b=v`, built by `core.cli_setup.config_dict` from `to_dict()`); it becomes a RunConfig
once, by `as_run_config`, in each launcher (and in `train.loop.train`, the library's entry point),
which checks every key and value and says what is wrong in one line; below that the code reads
typed attributes. List settings (`lora.targets`, `data.labels`) are tuples here, comma-separated
on the command line, JSON lists in config.json; `names` reads either spelling, so an older run's
config.json (comma strings) still loads and a resume does not see a spelling change as drift
(`respell_lists`). Keys an older config.json lacks take today's defaults.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from socialalign_jax.core.errors import UserError
from socialalign_jax.core.labels import DEFAULT_LABELS
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.model.sampling import SamplingConfig
from socialalign_jax.parallel import axis_rules


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """config.model: which weights, and how ModelConfig runs them (its execution options, whose
    defaults are ModelConfig's own; the architecture comes with the weights)."""
    weights: str = "random:small-qwen2"  # gguf:smollm2 | hf:/dir | gguf:/file | random:<preset>
    dtype: str = ModelConfig.dtype  # compute and frozen-param dtype; adapters are always float32
    remat: bool = ModelConfig.remat
    remat_policy: str = ModelConfig.remat_policy  # what a remat layer keeps
    scan_layers: bool = ModelConfig.scan_layers  # False: a Python loop over layers (longer compile; docs/training.md)
    attention: str = ModelConfig.attention  # auto (cuDNN on GPUs in bf16) | einsum | xla | cudnn
    # what a bf16/f16 matmul's dot returns: auto (float32 for bf16 on CPUs, 2x faster there; else dtype) | float32 | dtype
    matmul_out: str = ModelConfig.matmul_out
    seed: int = 0  # random weights only
    random_init: str = ""  # recorded by the trainer for random weights (decoder.RANDOM_INIT)

    def apply_to(self, model_cfg: ModelConfig) -> ModelConfig:
        """The weights' ModelConfig with this section's execution options (the architecture is the weights')."""
        return model_cfg.replace(param_dtype=self.dtype, dtype=self.dtype, remat=self.remat,
                                 remat_policy=self.remat_policy, scan_layers=self.scan_layers,
                                 attention=self.attention, matmul_out=self.matmul_out)


# The paper's context length (SPEC section 1): its presets (configs/weibo.py:7b) build prompts of
# at most this many tokens, and so does a prompt built without a run config (data.prompt.PromptConfig).
PAPER_MAX_LENGTH = 1024


@dataclasses.dataclass(frozen=True)
class DataSection:
    source: str = "socialweibo"  # socialweibo | alpaca | lamp | ced | zs_csd | nlpcc2016
    input: str = ""  # raw input dir/file; '' = the bundled synthetic sample
    data_dir: str = ""  # built dataset dir; '' = <workdir>/data
    tokenizer: str = ""  # '' = the model's own tokenizer
    labels: tuple[str, ...] = DEFAULT_LABELS  # class names in id order; favor,against,neutral for zs_csd/nlpcc2016
    max_length: int = 320
    mode: str = "full"  # full | without_persona | without_history
    on_overflow: str = "skip"  # skip (counted and reported in the build summary) | raise (stop at the first)
    test_fraction: float = 0.25
    split_by: str = "event"  # event | user
    seed: int = 0
    max_events: int = 0  # converters that support it (ced): read only the first N events; 0 = all
    num_history: int = 5  # history posts per prompt: BM25 top-k against the news (the paper's 5)
    lamp_outputs: str = ""  # LaMP: the outputs file; '' = *outputs*.json in data.input
    lamp_task: str = ""  # LaMP: LaMP-4 | LaMP-5 | LaMP-7; '' = read from the outputs file
    events_per_batch: int = 4  # G
    cases_per_event: int = 4  # M: global batch = G x M
    eval_batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """config.loss: the dual-level objective's settings, as train/step.py takes them (SPEC section 3)."""
    lambda_sent: float = 1.0
    lambda_macro: float = 1.0
    estimator: str = "mean"  # mean | gumbel
    gumbel_tau: float = 1.0
    max_response_tokens: int = 48  # R: response positions scored per row (0 = every position); never truncated


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """config.optim, as train/optim.make_optimizer takes it: clipping -> AdamW -> warmup + cosine.

    The defaults are the CPU quickstart's (a random small model, minutes); the paper's recipe
    (lr 2e-5, otherwise these) is configs/weibo.py's 7b/1.5b/0.5b preset.
    """
    lr: float = 2e-3
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.0  # the cosine ends at min_lr_ratio * lr
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm clipping; 0 = none
    grad_accum: int = 1  # micro-batches per update (optax.MultiSteps)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    num_epochs: int = 4
    num_steps: int = -1  # -1: num_epochs worth of batches
    seed: int = 0
    log_every: int = 5
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    eval_at_end: bool = True
    eval_max_examples: int = 0  # 0 = the whole held-out split; N = N evenly spaced examples
    tensorboard: bool = True
    generate_at_end: bool = True  # then generate for the held-out events and evaluate (quickstart)
    labeller: str = "lexicon"  # lexicon | none: labels generated posts for the macro comparison


def _default_rules() -> dict[str, str]:
    return axis_rules.as_config_strings()


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Logical axis -> mesh axes ('data,fsdp'; '' = replicated), declared in parallel/axis_rules.py.
    # Override per run: --config.mesh.rules.embed= (pure data parallelism: replicate the weights)
    # or --config.mesh.rules.mlp=tensor,fsdp. Activations have rules of their own (activation_*).
    rules: Mapping[str, str] = dataclasses.field(default_factory=_default_rules)


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    coordinator_address: str = ""  # '' = from the environment (TPU pods) or single process
    num_processes: int = 0
    process_id: int = -1
    initialize: str = "auto"  # auto | yes | no


@dataclasses.dataclass(frozen=True)
class SampleSection(SamplingConfig):
    """config.sample (launch/generate.py, generation at the end of training, the predictor): the
    sampler's own config, whose stop tokens and pad id are the tokenizer's, set where a run generates
    (inference.generation.sampling_config), plus the prompts per generate call (each prompt's K
    samples decode as K rows that share its KV cache: `inference.generation.sample_rows`)."""
    batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class HardwareSection:
    peak_flops_per_device: float = 0.0  # 0 = look up the device kind (TPU/GPU); CPU: no MFU


_SECTIONS: dict[str, type] = {
    "model": ModelSection, "lora": LoraConfig, "data": DataSection, "loss": LossConfig,
    "optim": OptimConfig, "train": TrainSection, "mesh": MeshSection, "distributed": DistributedSection,
    "sample": SampleSection, "hardware": HardwareSection,
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: one frozen section per concern."""
    preset: str = "default"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)
    sample: SampleSection = dataclasses.field(default_factory=SampleSection)
    hardware: HardwareSection = dataclasses.field(default_factory=HardwareSection)

    @classmethod
    def from_config(cls, cfg: Any, *, source: str = "config") -> "RunConfig":
        """A ConfigDict, a nested mapping (config.json) or a RunConfig -> RunConfig.

        Keys the mapping lacks take the defaults above; an unknown section or key, or a value
        of the wrong type, is one UserError line naming `source` and the key. A value the
        section's own component refuses (LoraConfig's routing, SamplingConfig's top_p, ...) is
        the line `runs.validation` gives for it, as if the run had been validated.
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
        given = {name: _typed_values(section_cls, _as_mapping(top[name]), f"{source}: {name}")
                 for name, section_cls in _SECTIONS.items() if name in top}
        for name, values in given.items():
            try:
                kw[name] = _SECTIONS[name](**values)
            except ValueError as e:  # the component's own check of its values
                raise _refused(given, f"{source}: {name}", e) from None
        return cls(**kw)

    def to_dict(self) -> dict:
        """The nested plain dict config.json and the checkpoints hold (lists as lists)."""
        out: dict[str, Any] = {"preset": self.preset}
        for name in _SECTIONS:
            out[name] = section_dict(getattr(self, name))
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
                d[name] = section_dict(value)
            else:
                d[name] = {**d[name], **dict(value)}
        return RunConfig.from_config(d)


def as_run_config(cfg: Any, *, source: str = "config") -> RunConfig:
    """The one conversion (idempotent): what each launcher calls on its --config."""
    return RunConfig.from_config(cfg, source=source)


def settings(section_cls: type) -> tuple[dataclasses.Field, ...]:
    """The fields of a section that are config keys. A component field marked
    `metadata={"run_config": False}` is set by the code at run time (SamplingConfig's stop
    tokens and pad id come from the tokenizer), so no config file or config.json holds it."""
    return tuple(f for f in dataclasses.fields(section_cls) if f.metadata.get("run_config", True))


def section_dict(section) -> dict:
    """One section's config keys and values, plain (tuples as lists, mappings as dicts)."""
    return {f.name: _plain(getattr(section, f.name)) for f in settings(type(section))}


def names(value: Any) -> tuple[str, ...]:
    """A list setting's value as a tuple of names, from either spelling: 'a,b' (the command
    line's, and config.json before lists were written as lists) or a sequence. Blanks around a
    name and empty names are dropped: '' is the empty list."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(n for n in (str(x).strip() for x in items) if n)


def respell_lists(saved: Mapping) -> dict:
    """A saved run config (config.json, a checkpoint's config item) with its list settings as
    lists whichever spelling wrote them, so that comparing it with `to_dict()` compares values:
    a run resumed under today's code must not see drift in 'q,k' -> ['q', 'k']."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in saved.items()}
    for name, section_cls in _SECTIONS.items():
        section = out.get(name)
        if not isinstance(section, dict):
            continue
        hints = typing.get_type_hints(section_cls)
        for f in settings(section_cls):
            if _is_names(hints[f.name]) and isinstance(section.get(f.name), str):
                section[f.name] = list(names(section[f.name]))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _refused(given: Mapping, where: str, err: ValueError) -> UserError:
    """One line for a value a section's component refused: validation's line for the whole given
    config (every bad value, 'config: key=value must ...'), else the component's own message."""
    from socialalign_jax.runs.validation import ConfigError, run_config_problems  # lazy: validation imports this module

    problems = run_config_problems(given, training=False)
    if problems:
        return ConfigError("config: " + "; ".join(problems))
    return UserError(f"{where}: {err}")


def _as_mapping(obj: Any) -> Mapping:
    if isinstance(obj, Mapping):
        return obj
    if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        return obj.to_dict()
    if hasattr(obj, "items"):
        return dict(obj.items())
    raise UserError(f"a run config must be a config file's ConfigDict or a mapping, got {type(obj).__name__}")


def _typed_values(section_cls: type, given: Mapping, where: str) -> dict[str, Any]:
    """The given keys of one section, each as its declared type; an unknown key or a wrong type is one line."""
    hints = typing.get_type_hints(section_cls)
    fields = {f.name for f in settings(section_cls)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise UserError(f"{where}.{unknown[0]}: unknown key; known: {', '.join(sorted(fields))}")
    return {key: _coerce(f"{where}.{key}", value, hints[key]) for key, value in given.items()}


def _is_names(typ: Any) -> bool:
    return typing.get_origin(typ) is tuple and typing.get_args(typ) == (str, ...)


def _coerce(where: str, value: Any, typ: Any) -> Any:
    """value as `typ` (str, int, float, bool, tuple[str, ...] or Mapping[str, str]); a mismatch is one line."""
    origin = typing.get_origin(typ)
    if (origin is not None and issubclass(origin, Mapping)) or typ is Mapping:
        if value is None:
            return {}
        try:
            items = dict(_as_mapping(value))
        except UserError:
            raise UserError(f"{where}: expected a mapping of names to strings, got {value!r}") from None
        return {str(k): "" if v is None else str(v) for k, v in items.items()}
    if _is_names(typ):
        if isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value)):
            return names(value)
        raise UserError(f"{where}={value!r}: expected comma-separated names or a list of strings")
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
