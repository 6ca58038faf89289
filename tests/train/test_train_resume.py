"""Checkpoints: a SIGTERM'd run resumes to the same per-step losses; NaN stops cleanly; shape mismatches are named.

The signal is a real SIGTERM to this process, sent by a watcher thread once metrics.jsonl
shows step K; the loop's handler must checkpoint at the step boundary and return, and a
second `train` on the same workdir must continue with the same data order and rng.
"""

import os
import re
import signal
import threading
import time

import pytest

from socialalign_jax.core.errors import UserError
from socialalign_jax.runs import checkpoint
from socialalign_jax.train import loop

from tests.train_helpers import built_sample, read_metrics, reference_run, tiny_config

N, K = 4, 1


@pytest.fixture(scope="module")
def reference():
    return reference_run(N)  # shared with the multi-process test


def _sigterm_when(workdir, step, sent):
    def watch():
        deadline = time.time() + 600
        while time.time() < deadline:
            if max(read_metrics(workdir), default=0) >= step:
                os.kill(os.getpid(), signal.SIGTERM)
                sent.append(step)
                return
            time.sleep(0.02)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_sigterm_then_resume_matches_uninterrupted(reference, tmp_path):
    ref_wd, ref = reference
    assert sorted(ref) == list(range(1, N + 1))
    wd = str(tmp_path)
    sent = []
    watcher = _sigterm_when(wd, K, sent)
    first = loop.train(tiny_config(built_sample(), **{"train.num_steps": N}), wd, progress=False)
    watcher.join(timeout=5)
    assert sent == [K]
    assert "stopped_at" in first and K <= first["stopped_at"] < N, first
    stopped = first["stopped_at"]
    assert sorted(read_metrics(wd)) == list(range(1, stopped + 1))
    mgr = checkpoint.make_manager(wd, save_every=1, keep=3, async_save=False)
    assert mgr.latest_step() == stopped

    second = loop.train(tiny_config(built_sample(), **{"train.num_steps": N}), wd, progress=False)
    assert second["step"] == N
    got = read_metrics(wd)
    assert sorted(got) == list(range(1, N + 1))
    for s in range(1, N + 1):
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-6), (s, got, ref)
    # the losses do change between steps: equal rows are not an accident of a constant loss
    assert len({round(v, 6) for v in ref.values()}) == N


def test_nan_loss_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(built_sample(), **{"train.num_steps": 6, "optim.lr": 1e30, "optim.warmup_frac": 0.0})
    with pytest.raises(UserError) as e:
        loop.train(cfg, str(tmp_path), progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    m = re.match(r"step (\d+): loss is (nan|inf|-inf) .*the last good checkpoint is step (\d+)", msg)
    assert m, msg
    bad, last = int(m.group(1)), int(m.group(3))
    assert last == bad >= 1  # steps 1..bad finished with finite losses and were saved; step bad+1 was not
    mgr = checkpoint.make_manager(str(tmp_path), save_every=1, keep=10, async_save=False)
    assert mgr.latest_step() == bad
    assert max(read_metrics(str(tmp_path))) == bad


def test_restore_into_a_different_adapter_shape_names_the_difference(reference, tmp_path):
    ref_wd, _ = reference
    cfg = tiny_config(built_sample(), **{"train.num_steps": N + 1, "lora.rank": 4})
    with pytest.raises(UserError, match=r"lora\.rank: checkpoint 8 vs config 4"):
        loop.train(cfg, ref_wd, progress=False)


def test_a_random_weights_run_from_before_the_flax_model_is_refused(reference, tmp_path):
    """Checkpoints written before decoder.RANDOM_INIT existed trained on differently drawn random
    weights: restoring them (train, generate, export) is one line, not a silent resume."""
    import json
    import shutil

    from socialalign_jax.model import decoder

    ref_wd, _ = reference
    wd = str(tmp_path / "old")
    shutil.copytree(ref_wd, wd)
    saved = json.load(open(os.path.join(wd, "checkpoints", str(N), "config", "metadata")))
    assert saved["model"]["random_init"] == decoder.RANDOM_INIT  # what a run records today
    for step in os.listdir(os.path.join(wd, "checkpoints")):
        meta = os.path.join(wd, "checkpoints", step, "config", "metadata")
        if os.path.exists(meta):
            old = json.load(open(meta))
            old["model"].pop("random_init")
            json.dump(old, open(meta, "w"))
    cfg = tiny_config(built_sample(), **{"train.num_steps": N + 1})
    with pytest.raises(UserError, match=r"random base weights \(random:tiny-qwen2\) drawn by an older version"):
        loop.train(cfg, wd, progress=False)
