"""What happens around the training steps, as small objects the loop calls: logging, checkpoints, evaluation.

The loop (train/loop.py `TrainLoop`) only takes steps; everything a step's result is used for
is a hook, so each concern reads in one place and a user can add one without touching the
loop (`train(cfg, workdir, hooks=[...])`), as tunix's TrainingHooks and levanter's trainer
hooks do. The loop calls every hook, in list order (the defaults first, in the order of
`default_hooks`, then the user's), at three points:

- `on_start(loop)`: the state is restored or fresh, nothing has stepped yet;
- `on_step_end(loop, step, metrics)`: step `step` (1-based: the count of steps taken) is done;
  `metrics` are its device arrays, not yet read by the host;
- `on_finish(loop, result)`: the steps are over; `result` is the dict `train` returns, which a
  hook may add to: {"step": n, ...} after the last step, {"stopped_at": n} after a signal.

A hook that needs a loss the host has seen to be finite (before logging or saving it) calls
`loop.confirm_finite()`, which raises the run's one-line non-finite-loss error otherwise.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, TYPE_CHECKING

import jax
import numpy as np

from socialalign_jax.core.atomic_io import write_json
from socialalign_jax.evaluation import skill
from socialalign_jax.runs import checkpoint
from socialalign_jax.runs.restore import SKILL_FILE
from socialalign_jax.train import flops
from socialalign_jax.train.evaluate import eval_source, evaluate_split, forecast_track_record

if TYPE_CHECKING:  # the loop imports this module for its default hooks
    from socialalign_jax.train.loop import TrainLoop


class Hook:
    """A no-op at every point: subclass it and override the points you need."""

    def on_start(self, loop: TrainLoop) -> None:
        """Before the first step of this run (a resumed run starts at `loop.start_step`)."""

    def on_step_end(self, loop: TrainLoop, step: int, metrics: dict[str, Any]) -> None:
        """After step `step`; `loop.state` is the state it produced, `loop.batch` this process's rows of its batch."""

    def on_finish(self, loop: TrainLoop, result: dict[str, Any]) -> None:
        """After the last step (or a signal); add to `result` what the run should return."""


class MetricsHook(Hook):
    """Every `train.log_every` steps and at the last: the step's metrics plus throughput to
    metrics.jsonl / TensorBoard (`loop.logger`) and the progress bar; `result["train"]` is the
    last row logged.

    Throughput is over the steps since the previous logged row (or since the steps began), so
    the first row's time includes compiling the step, as every row's includes the host's work.
    MFU = model FLOPs per step / step time / (peak FLOPs per device x devices); no peak (CPU,
    an unknown device kind without `hardware.peak_flops_per_device`) means no `mfu` entry.
    """

    def on_start(self, loop: TrainLoop) -> None:
        cfg, job, bcfg = loop.cfg, loop.job, loop.batch_config
        self.every = int(cfg.train.log_every)
        self.peak = float(cfg.hardware.peak_flops_per_device) or (
            flops.peak_flops_for(jax.devices()[0].device_kind) or 0.0)
        self.step_flops = flops.train_step_flops(job.model_cfg, job.lora_cfg, bcfg.global_batch_size, bcfg.seq_len,
                                                 job.loss_cfg.max_response_tokens or None, job.lora_cfg.num_classes)
        self.last: dict[str, float] = {}  # the last row logged, flat ("train/loss": ...)
        self.last_step = loop.start_step  # the step of that row
        self.tokens = 0.0  # attended tokens (all processes) since that row
        self.t_last: float | None = None  # perf_counter() when that row was written; None: use loop.run_started

    def on_step_end(self, loop: TrainLoop, step: int, metrics: dict[str, Any]) -> None:
        self.tokens += float(np.asarray(loop.batch["attention_mask"]).sum()) * jax.process_count()
        if step % self.every and step != loop.n_steps:
            return
        loop.confirm_finite()  # synced here anyway: a non-finite step is never logged
        dt = time.perf_counter() - (loop.run_started if self.t_last is None else self.t_last)
        m = jax.device_get(metrics)
        m["tokens_per_s"] = self.tokens / max(dt, 1e-9)
        m["step_time_s"] = dt / max(step - self.last_step, 1)
        m["tflops_per_s"] = self.step_flops / max(m["step_time_s"], 1e-9) / 1e12
        if self.peak > 0:
            m["mfu"] = self.step_flops / m["step_time_s"] / (self.peak * jax.device_count())
        self.last = loop.logger.write(step, m, prefix="train/")
        self.last_step = step
        self.t_last, self.tokens = time.perf_counter(), 0.0
        if loop.bar is not None:
            loop.bar.set_postfix(loss=f"{m['loss']:.3f}", lm=f"{m['lm']:.3f}", macro=f"{m['macro']:.3f}")

    def on_finish(self, loop: TrainLoop, result: dict[str, Any]) -> None:
        if "step" in result:
            result["train"] = dict(self.last)


class CheckpointHook(Hook):
    """Saves the state every `train.checkpoint_every` steps, after the last step and at a signal,
    then closes the manager (in-flight async saves end before the run returns).

    A state is saved only after its loss was seen finite (`loop.confirm_finite`): the checkpoint
    a non-finite run points to is the last good one.
    """

    def on_step_end(self, loop: TrainLoop, step: int, metrics: dict[str, Any]) -> None:
        if loop.manager.should_save(step):
            loop.confirm_finite()
            checkpoint.save(loop.manager, step, loop.state, loop.it.get_state(), loop.cfg_dict)

    def on_finish(self, loop: TrainLoop, result: dict[str, Any]) -> None:
        manager, step = loop.manager, int(loop.state["step"])
        if manager.latest_step() != step:  # the periodic save may already hold this step
            checkpoint.save(manager, step, loop.state, loop.it.get_state(), loop.cfg_dict, force=True)
        checkpoint.close(manager)
        if "stopped_at" in result and loop.is_main:
            print(f"\nreceived signal {loop.stop_signal}: saved checkpoint at step {step} in {manager.directory}; "
                  "exiting")


class EvalHook(Hook):
    """Held-out evaluation with `train.eval_at_end` and a test split: the untrained adapters at
    step 0 (eval_step0.json; a resumed run reads that file back) and the trained ones at the end
    (eval_final.json, `result["eval"]`), with the forecast skill. Every finished run writes the
    skill file and prints its line (predict.py, the API and the report read it); a stopped run
    does neither: it has not finished.
    """

    def on_start(self, loop: TrainLoop) -> None:
        self.baseline = None  # this run's step-0 evaluation, when it made one
        if self._evaluates(loop) and loop.start_step == 0:
            self.baseline = evaluate_split(loop.job, loop.state["adapters"], eval_source(loop.cfg, loop.job.data.test),
                                           desc="test split (step 0)")
            if loop.is_main:
                loop.logger.write(0, self.baseline, prefix="eval/")
                write_json(self.baseline, os.path.join(loop.workdir, "eval_step0.json"))

    def on_finish(self, loop: TrainLoop, result: dict[str, Any]) -> None:
        if "stopped_at" in result:
            return
        cfg, job, workdir = loop.cfg, loop.job, loop.workdir
        track = None  # the forecast's track record on the held-out events (evaluation/skill.py)
        if self._evaluates(loop):
            final = evaluate_split(job, loop.state["adapters"], eval_source(cfg, job.data.test), desc="test split",
                                   per_event=True)
            track = forecast_track_record(job, final.pop("_per_event", {}), seed=int(cfg.train.seed))
            result["eval"] = final
            result["forecast_skill"] = track
            baseline, path = self.baseline, os.path.join(workdir, "eval_step0.json")
            if baseline is None and os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    baseline = json.load(f)
            result["eval_step0"] = baseline
            if loop.is_main:
                loop.logger.write(result["step"], final, prefix="eval/")
                write_json(result, os.path.join(workdir, "eval_final.json"))
        if loop.is_main:  # read by predict.py, the API, report.md and the page: every forecast carries this line
            if track is None:
                track = {"num_events": 0, "status": "none", "w": 1.0,
                         "reason": "no test split" if not self._has_test(loop) else "train.eval_at_end is off"}
            track["step"] = result["step"]  # the adapters it describes (an export of another step carries none)
            write_json(track, os.path.join(workdir, SKILL_FILE))
            print(f"forecast skill: {skill.skill_sentence(track)}")

    @staticmethod
    def _has_test(loop: TrainLoop) -> bool:
        return loop.job.data.test is not None and len(loop.job.data.test) > 0

    def _evaluates(self, loop: TrainLoop) -> bool:
        return bool(loop.cfg.train.eval_at_end) and self._has_test(loop)


def default_hooks() -> list[Hook]:
    """The trainer's own hooks, in the order they run at each point: a step is logged before it is
    saved, and the final evaluation sees the final checkpoint and the last logged row."""
    return [MetricsHook(), CheckpointHook(), EvalHook()]
