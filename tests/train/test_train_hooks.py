"""Hooks of the training loop: a user's hook passed to `train(..., hooks=[...])` runs after the trainer's own.

It is called once before the first step, after every step (logged or not) with that step's
metrics while `loop.state` is the state the step produced, and at the end with the very dict
`train` returns, already holding what the trainer's hooks put there. A resumed run calls it
from the restored step on, and its result carries the step-0 evaluation the first run wrote.
"""

import json
import os

import pytest

from socialalign_jax.train import loop
from socialalign_jax.train.hooks import Hook

from tests.train_helpers import built_sample, read_metrics, tiny_config


class Recorder(Hook):
    def __init__(self):
        self.events = []

    def on_start(self, lp):
        self.events.append(("start", lp.start_step, lp.n_steps))

    def on_step_end(self, lp, step, metrics):
        self.events.append(("step", step, float(metrics["loss"]), int(lp.state["step"])))

    def on_finish(self, lp, result):
        self.events.append(("finish", result, sorted(result)))

    def steps(self):
        return {e[1]: e[2] for e in self.events if e[0] == "step"}


def _run(wd, num_steps, log_every):
    rec = Recorder()
    cfg = tiny_config(built_sample(), **{"train.num_steps": num_steps, "train.log_every": log_every,
                                         "train.eval_at_end": True})
    return loop.train(cfg, wd, progress=False, hooks=[rec]), rec


def _check(rec, result, start, n):
    assert rec.events[0] == ("start", start, n)
    steps = [e for e in rec.events if e[0] == "step"]
    assert [e[1] for e in steps] == list(range(start + 1, n + 1))  # every step, also those not logged
    assert all(e[3] == e[1] for e in steps)  # loop.state is the state that step produced
    kind, seen, keys_then = rec.events[-1]
    assert kind == "finish" and seen is result and len(rec.events) == n - start + 2
    # the trainer's hooks ran first: the last logged row, the final evaluation and the skill are there
    assert keys_then == ["eval", "eval_step0", "forecast_skill", "step", "train"]
    assert result["step"] == n


def test_a_user_hook_sees_every_step_and_the_result_also_after_a_resume(tmp_path):
    wd = str(tmp_path)
    first, rec = _run(wd, 2, 1)
    _check(rec, first, 0, 2)
    logged = read_metrics(wd)
    assert sorted(logged) == [1, 2] and rec.steps() == pytest.approx(logged, rel=1e-6, abs=1e-6)
    assert first["train"]["train/loss"] == pytest.approx(logged[2], rel=1e-6)
    with open(os.path.join(wd, "eval_step0.json"), encoding="utf-8") as f:
        step0 = json.load(f)
    assert first["eval_step0"] == pytest.approx(step0, nan_ok=True)

    second, rec = _run(wd, 4, 2)  # resumes at step 2; logs step 4 only
    _check(rec, second, 2, 4)
    logged = read_metrics(wd)
    assert sorted(logged) == [1, 2, 4] and sorted(rec.steps()) == [3, 4]
    assert rec.steps()[4] == pytest.approx(logged[4], rel=1e-6, abs=1e-6)
    assert second["train"]["train/loss"] == pytest.approx(logged[4], rel=1e-6)
    # no step-0 evaluation in a resumed run: the first run's is read back from eval_step0.json
    assert second["eval_step0"] == pytest.approx(step0, nan_ok=True)
