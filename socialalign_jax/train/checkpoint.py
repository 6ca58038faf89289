"""Orbax checkpoints of the trainable state, the data-iterator position and the config.

Only the adapter tree, its optimizer state and the step are saved: the frozen base is
re-read from its own weights file, so a 7B run's checkpoints stay megabytes. Saves are
asynchronous (training continues while the previous one is written); a restart with the
same workdir picks the latest complete step.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from socialalign_jax.errors import UserError


def make_manager(workdir: str, *, save_every: int, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(1, save_every),
        enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_state: Mapping[str, Any] | None,
         config: Mapping[str, Any], *, force: bool = False) -> bool:
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(dict(data_state or {})),
        config=ocp.args.JsonSave(dict(config)),
    )
    return manager.save(step, args=args, force=force)


def describe_tree(tree) -> dict[str, list[int]]:
    """Flat {path: shape} of a pytree, used to explain a mismatch between checkpoint and config."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): list(np.shape(v)) for p, v in flat}


def _diff_lora(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            out.append(f"lora.{key}: checkpoint {saved.get(key)!r} vs config {current.get(key)!r}")
    return out


def restore(manager: ocp.CheckpointManager, abstract_state, current_config: Mapping[str, Any],
            step: int | None = None):
    """Restore (state, data_state, saved_config) at `step` (default: latest).

    The adapter shape (rank, experts, targets, head) must match the current config: a
    mismatch raises a UserError listing what differs, before Orbax sees any array.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    meta = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    saved_cfg = meta["config"]
    saved_lora = saved_cfg.get("lora", {})
    cur_lora = current_config.get("lora", {})
    shape_keys = ("num_analyze", "num_compose", "rank", "targets", "num_classes", "gate_width")
    diffs = _diff_lora({k: saved_lora.get(k) for k in shape_keys}, {k: cur_lora.get(k) for k in shape_keys})
    saved_model = {k: saved_cfg.get("model", {}).get(k) for k in ("preset", "weights")}
    cur_model = {k: current_config.get("model", {}).get(k) for k in ("preset", "weights")}
    if saved_model != cur_model:
        diffs.append(f"model: checkpoint {saved_model} vs config {cur_model}")
    if diffs:
        raise UserError(
            f"{manager.directory}/{step}: the checkpoint's adapters do not fit this config: " + "; ".join(diffs)
            + " (use a new --workdir, or the checkpoint's settings)")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"], saved_cfg
