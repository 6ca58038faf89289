"""Validation of a whole run config (configs/*.py, a ConfigDict or its dict) before anything runs.

One pass at startup, before any weights are read or anything compiles, naming every bad value
at once ('key=value must ...'). It reads across concerns (model, lora, data, mesh), so it lives
with the run, not with any one of them; `runs.run_config` gives the types and defaults, this
module the value checks that a type cannot express (ranges, choices, the mesh against the
devices, the batch against the mesh).
"""

from __future__ import annotations

import dataclasses
import math

from socialalign_jax.core.labels import DEFAULT_LABELS
from socialalign_jax.model.config import DTYPE_NAMES, MATMUL_OUTS
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.model.presets import PRESETS
from socialalign_jax.parallel.mesh import mesh_shape
from socialalign_jax.runs.run_config import names


class ConfigError(ValueError):
    """A run-config value that cannot work; the message names every bad key (one line)."""

    user_error = True  # errors.cli_main prints it as one line, exit status 2


_CHOICES = {
    "model.dtype": DTYPE_NAMES,
    "model.matmul_out": MATMUL_OUTS,
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
        if weights[len("random:"):] not in PRESETS:
            problems.append(f"model.weights={weights!r}: unknown model preset; known: {', '.join(sorted(PRESETS))}")
    labels = names(_get(cfg, "data.labels", DEFAULT_LABELS))
    if len(labels) < 2 or len(set(labels)) != len(labels):
        problems.append(f"data.labels={','.join(labels)!r} must name at least 2 distinct classes")
    elif _get(cfg, "lora.num_classes", 0) not in (0, len(labels)):
        problems.append(f"data.labels has {len(labels)} classes but lora.num_classes={_get(cfg, 'lora.num_classes')}")
    lora = {k: _get(cfg, f"lora.{k}", _MISSING) for k in ("routing", "fuse_base", "targets")}
    try:  # LoraConfig's own checks of the names it knows (the numbers are ranges above)
        LoraConfig(**{k: names(v) if k == "targets" else v for k, v in lora.items() if v is not _MISSING})
    except ValueError as e:
        problems.append(f"lora: {e}")
    problems += mesh_problems(cfg, device_count, check_batch=training)
    return problems


_MISSING = object()


def mesh_problems(cfg, device_count: int | None = None, *, check_batch: bool = True) -> list[str]:
    """Mesh axis sizes (at most one -1), their product vs the devices, and the batch vs data x fsdp."""

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
