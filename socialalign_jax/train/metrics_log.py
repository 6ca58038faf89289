"""Metric sinks: JSONL (one object per logged step) and TensorBoard event files.

TensorBoard files are written with tensorboardX, which needs no TensorFlow. Only process 0
writes; the other processes get a sink that drops everything.

The JSONL survives crashes (atomic_io.AppendLog): a run resumed from the checkpoint of step S
keeps the rows of steps <= S only, so the steps it trains again are not logged twice, and a
truncated last line (kill -9, full disk) is dropped instead of appended onto.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

import numpy as np

from socialalign_jax.core.atomic_io import AppendLog, write_failure
from socialalign_jax.model.pac_lora import SEGMENTS


def _scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten arrays into scalar entries: gate_a_entropy [3] -> gate_a_entropy/user, ... ."""

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
    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        """resume_step: the step the run restored (0 = a fresh start, which drops an older run's rows);
        None keeps every complete row."""
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)

        keep = None if resume_step is None else (resume_step if resume_step > 0 else -1)
        self._jsonl = AppendLog(os.path.join(workdir, "metrics.jsonl"), keep_through_step=keep)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                # A resumed run (or a fresh start over an old run's files) hides the events past
                # its restored step from TensorBoard, as the JSONL repair drops those rows: a
                # killed run may have logged steps it never checkpointed.
                # The file name carries the second it was opened and the host; a restart within the
                # same second would reopen (and truncate) the previous file, so the nanoseconds go
                # in too (fixed width: TensorBoard reads a run's files in name order).
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge,
                                         filename_suffix=f".{time.time_ns() % 10**9:09d}")
            except ImportError:  # optional: JSONL always works
                self._tb = None

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
        flat = _scalars(metrics, prefix)
        if not self.enabled:
            return flat
        self._jsonl.append({"step": int(step), **flat})
        if self._tb is not None:
            for k, v in flat.items():
                self._tb.add_scalar(k, v, int(step))
        return flat

    def close(self, *, failing: bool = False):
        """Flush and close both sinks. TensorBoard's writer flushes its event file here, so a full
        disk may surface now: one line (write_failure), or nothing when `failing` (the run already
        ends in an error, which stays the one the user sees)."""
        if self._jsonl:
            self._jsonl.close()
        tb, self._tb = self._tb, None
        if tb is not None:
            try:
                tb.close()
            except Exception as e:  # noqa: BLE001 - write_failure re-raises what is not an OS error
                if not failing:
                    raise write_failure(os.path.join(tb.logdir, "events.out.tfevents.*"), e, None) from None
