"""Metric sinks: JSONL (one object per logged step) and TensorBoard event files.

TensorBoard files are written with tensorboardX, which needs no TensorFlow. Only process 0
writes; the other processes get a sink that drops everything.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np


def _scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten arrays into scalar entries: gate_a_entropy [3] -> gate_a_entropy/user, ... ."""
    from socialalign_jax.pac_lora import SEGMENTS

    out: dict[str, float] = {}
    for key, val in metrics.items():
        arr = np.asarray(val)
        name = prefix + key
        if arr.ndim == 0:
            out[name] = float(arr)
        elif arr.ndim == 1 and arr.shape[0] == len(SEGMENTS):
            for seg, v in zip(SEGMENTS, arr):
                out[f"{name}/{seg}"] = float(v)
        elif arr.ndim == 2 and arr.shape[0] == len(SEGMENTS):
            for seg, row in zip(SEGMENTS, arr):
                for e, v in enumerate(row):
                    out[f"{name}/{seg}/e{e}"] = float(v)
        else:
            for i, v in enumerate(arr.reshape(-1)):
                out[f"{name}/{i}"] = float(v)
    return out


class MetricLogger:
    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # optional: JSONL always works
                self._tb = None

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
        flat = _scalars(metrics, prefix)
        if not self.enabled:
            return flat
        self._jsonl.write(json.dumps({"step": int(step), **flat}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in flat.items():
                self._tb.add_scalar(k, v, int(step))
        return flat

    def close(self):
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
