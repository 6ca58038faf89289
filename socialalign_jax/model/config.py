"""Static model configuration.

A frozen dataclass so it can be a static argument of `jax.jit` (hashable) and so the
same object describes a Hugging Face checkpoint, a GGUF file or a random test model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from socialalign_jax.core.labels import DEFAULT_LABELS

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def as_dtype(name_or_dtype: Any):
    """Accept 'bfloat16' or jnp.bfloat16 alike (configs hold strings)."""
    if isinstance(name_or_dtype, str):
        if name_or_dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {name_or_dtype!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[name_or_dtype]
    return jnp.dtype(name_or_dtype).type


ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # 'qwen2' | 'llama'
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False  # rematerialise each layer in the backward pass (saves activation memory)
    # what a rematerialised layer keeps from its forward (modules.REMAT_POLICIES)
    remat_policy: str = "nothing_saveable"
    # False: the layers run as a Python loop: compile time grows with depth, but XLA:CPU no
    # longer copies each layer's weights and saved activations in and out of stacks.
    scan_layers: bool = True
    # How attention is computed (`layers.attention`): 'einsum' (our path: float32 scores, an
    # additive mask), 'xla' / 'cudnn' (jax.nn.dot_product_attention with that implementation),
    # or 'auto': cuDNN's fused attention when the program targets GPUs in bfloat16/float16 and
    # cuDNN accepts the shapes (checked while tracing), else 'einsum'.
    attention: str = "auto"

    def __post_init__(self):
        if self.family not in ("qwen2", "llama"):
            raise ValueError(f"unknown model family {self.family!r}; expected 'qwen2' or 'llama'")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        as_dtype(self.param_dtype)
        as_dtype(self.dtype)
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention {self.attention!r}; expected one of {ATTENTION_IMPLS}")
        policies = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")
        if self.remat_policy not in policies:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; expected one of {policies}")

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def module_dims(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(d_in, d_out) of every adaptable linear map, keyed by (block, name)."""
        d, f = self.hidden_size, self.intermediate_size
        return {
            ("attn", "q"): (d, self.q_dim),
            ("attn", "k"): (d, self.kv_dim),
            ("attn", "v"): (d, self.kv_dim),
            ("attn", "o"): (self.q_dim, d),
            ("mlp", "gate"): (d, f),
            ("mlp", "up"): (d, f),
            ("mlp", "down"): (f, d),
        }

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict (Qwen2ForCausalLM or LlamaForCausalLM)."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type", "")
        if model_type == "qwen2" or "Qwen2ForCausalLM" in archs:
            family = "qwen2"
        elif model_type == "llama" or "LlamaForCausalLM" in archs:
            family = "llama"
        else:
            raise ValueError(
                f"unsupported architecture (model_type={model_type!r}, architectures={archs}); "
                "supported: Qwen2ForCausalLM (qwen2), LlamaForCausalLM (llama)")
        rope = hf.get("rope_parameters") or {}  # transformers >= 5 nests RoPE settings here
        scaling = hf.get("rope_scaling") or ({"rope_type": rope["rope_type"]} if rope.get("rope_type") else None)
        if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
            raise ValueError(f"rope_scaling {scaling} is not supported (only default RoPE)")
        heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        kw = dict(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=bool(hf.get("attention_bias", family == "qwen2")) if family == "llama" else True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        )
        kw.update(overrides)
        return cls(**kw)


# ----------------------------------------------------------------------------- run config validation

class ConfigError(ValueError):
    """A run-config value that cannot work; the message names every bad key (one line)."""

    user_error = True  # errors.cli_main prints it as one line, exit status 2


_CHOICES = {
    "model.dtype": tuple(_DTYPES),
    "loss.estimator": ("mean", "gumbel"),
    "data.mode": ("full", "without_persona", "without_history"),
    "data.on_overflow": ("raise", "skip"),
    "data.split_by": ("event", "user"),
    "data.lamp_task": ("", "LaMP-4", "LaMP-5", "LaMP-7"),
    "train.labeller": ("lexicon", "none"),
    "distributed.initialize": ("auto", "yes", "no"),
}
# (key, lower bound, inclusive?, upper bound, inclusive?) for numbers; None = unbounded.
_RANGES = (
    ("lora.rank", 1, True, None, None), ("lora.num_analyze", 1, True, None, None),
    ("lora.num_compose", 1, True, None, None), ("lora.num_classes", 0, True, None, None),
    ("lora.gate_width", 1, True, None, None), ("lora.alpha", 0, False, None, None),
    ("lora.dropout", 0, True, 1, False),
    ("data.max_length", 8, True, None, None), ("data.test_fraction", 0, True, 1, False),
    ("data.max_events", 0, True, None, None), ("data.num_history", 0, True, None, None),
    ("data.events_per_batch", 1, True, None, None),
    ("data.cases_per_event", 1, True, None, None), ("data.eval_batch_size", 1, True, None, None),
    ("loss.lambda_sent", 0, True, None, None), ("loss.lambda_macro", 0, True, None, None),
    ("loss.gumbel_tau", 0, False, None, None), ("loss.max_response_tokens", 0, True, None, None),
    ("optim.lr", 0, False, None, None), ("optim.warmup_frac", 0, True, 1, True),
    ("optim.min_lr_ratio", 0, True, 1, True), ("optim.weight_decay", 0, True, None, None),
    ("optim.b1", 0, True, 1, False), ("optim.b2", 0, True, 1, False), ("optim.eps", 0, False, None, None),
    ("optim.clip_norm", 0, True, None, None), ("optim.grad_accum", 1, True, None, None),
    ("train.num_epochs", 1, True, None, None), ("train.log_every", 1, True, None, None),
    ("train.checkpoint_every", 1, True, None, None), ("train.keep_checkpoints", 1, True, None, None),
    ("train.eval_max_examples", 0, True, None, None),
    ("sample.temperature", 0, True, None, None), ("sample.top_p", 0, False, 1, True),
    ("sample.top_k", 0, True, None, None), ("sample.repetition_penalty", 0, False, None, None),
    ("sample.max_new_tokens", 1, True, None, None), ("sample.batch_size", 1, True, None, None),
    ("hardware.peak_flops_per_device", 0, True, None, None),
)
_WEIGHT_KINDS = ("random:", "hf:", "gguf:")


def _get(cfg, key: str, default=None):
    """cfg's value at a dotted key (typed run config attributes, or mapping items), else default."""
    node = cfg
    for part in key.split("."):
        if dataclasses.is_dataclass(node):
            if not hasattr(node, part):
                return default
            node = getattr(node, part)
            continue
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return default
    return node


def _range_problem(key: str, value, lo, lo_incl, hi, hi_incl) -> str | None:
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{key}={value!r} is not a number"
    if not math.isfinite(value):
        return f"{key}={value} is not finite"
    bad_lo = lo is not None and (value < lo if lo_incl else value <= lo)
    bad_hi = hi is not None and (value > hi if hi_incl else value >= hi)
    if bad_lo or bad_hi:
        left = "" if lo is None else f"{'>=' if lo_incl else '>'} {lo}"
        right = "" if hi is None else f"{'<=' if hi_incl else '<'} {hi}"
        return f"{key}={value} must be {' and '.join(x for x in (left, right) if x)}"
    return None


def run_config_problems(cfg, *, device_count: int | None = None, training: bool = True) -> list[str]:
    """Every bad value of a run config (configs/*.py), as 'key=value must ...' strings; [] if none.

    One pass, at startup, before any weights are read or anything compiles: the launchers call
    `validate_run_config`, `launch/plan.py` reports the same mesh/batch problems. `device_count`
    adds the checks that need the devices (mesh product, and with `training` the global
    batch divisible by data x fsdp; generation pads its own batches).
    """
    problems: list[str] = []
    for key, choices in _CHOICES.items():
        val = _get(cfg, key, _MISSING)
        if val is not _MISSING and val not in choices:
            problems.append(f"{key}={val!r} is not one of {', '.join(repr(c) for c in choices if not isinstance(c, bool))}")
    for key, lo, lo_incl, hi, hi_incl in _RANGES:
        val = _get(cfg, key, _MISSING)
        if val is not _MISSING:
            p = _range_problem(key, val, lo, lo_incl, hi, hi_incl)
            if p:
                problems.append(p)
    steps = _get(cfg, "train.num_steps", -1)
    if isinstance(steps, bool) or not isinstance(steps, int) or (steps < 1 and steps != -1):
        problems.append(f"train.num_steps={steps!r} must be -1 (num_epochs worth of batches) or a positive count")
    weights = str(_get(cfg, "model.weights", ""))
    if weights and not weights.startswith(_WEIGHT_KINDS):
        problems.append(f"model.weights={weights!r} must start with one of {', '.join(_WEIGHT_KINDS)}")
    elif weights.startswith("random:"):
        from socialalign_jax.model.presets import PRESETS

        if weights[len("random:"):] not in PRESETS:
            problems.append(f"model.weights={weights!r}: unknown model preset; known: {', '.join(sorted(PRESETS))}")
    labels = [x.strip() for x in str(_get(cfg, "data.labels", ",".join(DEFAULT_LABELS))).split(",")]
    if len(labels) < 2 or len(set(labels)) != len(labels) or not all(labels):
        problems.append(f"data.labels={','.join(labels)!r} must name at least 2 distinct classes")
    elif _get(cfg, "lora.num_classes", 0) not in (0, len(labels)):
        problems.append(f"data.labels has {len(labels)} classes but lora.num_classes={_get(cfg, 'lora.num_classes')}")
    lora = _get(cfg, "lora", None)
    if lora is not None:
        from socialalign_jax.model.pac_lora import LoraConfig

        try:
            LoraConfig(routing=_get(lora, "routing", "token"), fuse_base=_get(lora, "fuse_base", "auto"),
                       targets=tuple(t.strip() for t in str(_get(lora, "targets", "")).split(",") if t.strip()))
        except ValueError as e:
            problems.append(f"lora: {e}")
    problems += mesh_problems(cfg, device_count, check_batch=training)
    return problems


_MISSING = object()


def mesh_problems(cfg, device_count: int | None = None, *, check_batch: bool = True) -> list[str]:
    """Mesh axis sizes (at most one -1), their product vs the devices, and the batch vs data x fsdp."""
    from socialalign_jax.parallel.mesh import mesh_shape

    sizes = {a: _get(cfg, f"mesh.{a}", 1) for a in ("data", "fsdp", "tensor")}
    free = [a for a, v in sizes.items() if v == -1]
    bad = [f"mesh.{a}={v!r}" for a, v in sizes.items() if v != -1 and (isinstance(v, bool) or not isinstance(v, int) or v < 1)]
    if bad:
        return [f"{', '.join(bad)}: mesh axis sizes must be positive integers or -1"]
    if len(free) > 1:
        return [f"mesh: only one axis may be -1 (it takes the remaining devices), got {', '.join(f'mesh.{a}=-1' for a in free)}"]
    if device_count is None:
        return []
    try:
        data, fsdp, _ = mesh_shape(device_count, **sizes)
    except ValueError as e:
        return [str(e)]
    batch = _get(cfg, "data.events_per_batch", 1) * _get(cfg, "data.cases_per_event", 1)
    if check_batch and isinstance(batch, int) and batch > 0 and batch % (data * fsdp):
        return [f"global batch data.events_per_batch x data.cases_per_event = {batch} is not divisible by "
                f"mesh data x fsdp = {data} x {fsdp} = {data * fsdp}"]
    return []


def validate_run_config(cfg, *, device_count: int | None = None, training: bool = True) -> None:
    """Raise one ConfigError naming every bad value (see `run_config_problems`)."""
    problems = run_config_problems(cfg, device_count=device_count, training=training)
    if problems:
        raise ConfigError("config: " + "; ".join(problems))
