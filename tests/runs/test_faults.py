"""Fault injection: every fault ends in one clear line (or succeeds as documented) and a rerun completes.

Issue 19's cases: corrupt checkpoints (truncated array blocks, a damaged manifest or metadata,
a garbage config or data-iterator item) fall back to the newest step that restores and set
the bad one aside; a full disk (ENOSPC injected at the write layer) while checkpointing, while
appending metrics or while writing an output file is one line naming the path and the space;
a second trainer on a workdir is refused, a stale lock is taken over; a resume that changes
the run's config, a data.* setting that contradicts the built dataset, and responses longer
than loss.max_response_tokens are refused before anything compiles.

The training runs share one 4-step run (train_helpers.reference_run, also used by the resume
tests) copied per case; CLI runs are subprocesses of launch/train.py where the exit status and
stderr matter, each compiling at most once.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from socialalign_jax.core import atomic_io
from socialalign_jax.core.errors import UserError
from socialalign_jax.data import setup
from socialalign_jax.core.labels import DEFAULT_LABELS
from socialalign_jax.model import decoder
from socialalign_jax.model.presets import get_preset
from socialalign_jax.model import axes as model_axes
from socialalign_jax.parallel.mesh import make_mesh
from socialalign_jax.runs import checkpoint, restore
from socialalign_jax.train import optim, step as step_lib
from socialalign_jax.train.metrics_log import MetricLogger

from tests.train_helpers import (MAX_LENGTH, REPO, built_sample, read_metrics, reference_run, script_env,
                                 typed_config)

N = 4  # the reference run's steps; keep_checkpoints=3 leaves steps 2, 3, 4


@pytest.fixture(scope="module")
def ref():
    wd, _ = reference_run(N)
    return wd


def copy_run(ref_wd, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(ref_wd, dst)
    return str(dst)


# ----------------------------------------------------------------------------- corrupt checkpoints

def corrupt(workdir: str, step: int, kind: str) -> None:
    """Damage one step the way disks and interrupted copies do; array damage hits the `adapters`
    item, the one item every reader (resume, generate, export) restores."""
    d = os.path.join(workdir, "checkpoints", str(step))
    if kind == "truncated_blocks":
        files = [f for f in glob.glob(f"{d}/adapters/**/d/*", recursive=True) if os.path.isfile(f)]
        assert files
        for f in files:
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    elif kind == "truncated_optimizer":  # only a resume reads it (inference does not care)
        files = [f for f in glob.glob(f"{d}/train_state/**/d/*", recursive=True) if os.path.isfile(f)]
        assert files
        for f in files:
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    elif kind == "damaged_manifest":
        files = glob.glob(f"{d}/adapters/**/manifest.ocdbt", recursive=True)
        assert files
        for f in files:
            with open(f, "wb") as fh:
                fh.write(b"\0" * 16)
    elif kind == "damaged_metadata":
        with open(f"{d}/adapters/_METADATA", "w") as fh:
            fh.write("{")
    elif kind == "garbage_config":
        with open(f"{d}/config/metadata", "w") as fh:
            fh.write("not json")
    elif kind == "garbage_iterator":
        with open(f"{d}/data/metadata", "w") as fh:
            fh.write('{"epoch": "x", "batch": -7}')
    else:
        raise ValueError(kind)


KINDS = ["truncated_blocks", "truncated_optimizer", "damaged_manifest", "damaged_metadata", "garbage_config",
         "garbage_iterator"]


def _abstract_state(cfg):
    lc = cfg.lora
    opt, _ = optim.make_optimizer(cfg.optim, N)
    shapes = jax.eval_shape(lambda: step_lib.init_train_state(
        decoder.init_adapters(jax.random.PRNGKey(0), get_preset("tiny-qwen2"), lc), opt))
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    sh = model_axes.shardings(shapes, mesh, strict=False)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, sh)


def _check_iterator_state(_, data_state):
    """What the trainer checks (loop.TrainLoop._set_data_position): two non-negative counts."""
    if not all(isinstance(data_state.get(k), int) and data_state[k] >= 0 for k in ("epoch", "batch")):
        raise ValueError(f"bad iterator position {data_state}")


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_latest_falls_back_and_sets_it_aside(ref, tmp_path, kind):
    wd = copy_run(ref, tmp_path)
    corrupt(wd, N, kind)
    cfg = typed_config(built_sample())
    manager = checkpoint.make_manager(wd, save_every=1, keep=3, async_save=False)
    lines = []
    state, data, _ = checkpoint.restore(manager, _abstract_state(cfg), restore.config_to_dict(cfg),
                                        check=_check_iterator_state, report=lines.append)
    assert int(state["step"]) == N - 1
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert f"checkpoint step {N} " in lines[0] and f"using step {N - 1}" in lines[0]
    aside = os.listdir(os.path.join(wd, checkpoint.SET_ASIDE_DIR))
    assert len(aside) == 1 and aside[0].startswith(f"{N}-") and f"moved to {wd}" in lines[0]
    assert sorted(manager.all_steps()) == [N - 2, N - 1]  # renamed, not deleted, and no longer a step
    # the set-aside copy is the damaged checkpoint itself (kept for inspection)
    assert os.path.isdir(os.path.join(wd, checkpoint.SET_ASIDE_DIR, aside[0], "adapters"))
    checkpoint.close(manager)


def test_no_checkpoint_restores_says_what_to_do(ref, tmp_path):
    wd = copy_run(ref, tmp_path)
    for s in (N - 2, N - 1, N):
        corrupt(wd, s, "truncated_blocks")
    cfg = typed_config(built_sample())
    manager = checkpoint.make_manager(wd, save_every=1, keep=3, async_save=False)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.restore(manager, _abstract_state(cfg), restore.config_to_dict(cfg), report=print)
    msg = str(e.value)
    assert "\n" not in msg and "no checkpoint restores" in msg and "move that directory aside" in msg
    assert all(f"step {s}:" in msg for s in (N - 2, N - 1, N))
    assert sorted(manager.all_steps()) == [N - 2, N - 1, N]  # nothing moved when nothing restores
    assert not os.path.exists(os.path.join(wd, checkpoint.SET_ASIDE_DIR))


def test_export_restore_falls_back_without_touching_the_run(ref, tmp_path, capsys):

    wd = copy_run(ref, tmp_path)
    corrupt(wd, N, "truncated_blocks")
    run = restore.restore_run(wd)
    assert run.step == N - 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and f"checkpoint step {N} " in err[0] and "moved" not in err[0]
    assert os.path.isdir(os.path.join(wd, "checkpoints", str(N)))  # a reader never renames


# ----------------------------------------------------------------------------- the CLI, end to end

PRELUDE = """
import sys, runpy, jax
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_default_matmul_precision", "highest")
{inject}
sys.argv = ["launch/train.py"] + sys.argv[1:]
runpy.run_path("launch/train.py", run_name="__main__")
"""

# Save of step 6 fails with a full disk (in the manager, where Orbax writes), as a small tmpfs would,
# while the asynchronous save of step 5 may still be in flight.
ENOSPC_AT_STEP_6 = """
import errno, orbax.checkpoint as ocp
_save = ocp.CheckpointManager.save
def save(self, step, *a, **k):
    if step == 6:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
    return _save(self, step, *a, **k)
ocp.CheckpointManager.save = save
"""

# kill -9 while the asynchronous save of step 3 is in flight: its arrays are written to
# 3.orbax-checkpoint-tmp-*, the rename that commits them has not happened, and the training
# loop has gone on (it may have logged step 4). Killed at Orbax's commit rename, so the moment
# is the same on every machine.
SIGKILL_DURING_ASYNC_SAVE_OF_STEP_3 = """
import os, signal
from orbax.checkpoint._src.path import async_path
_rename = async_path.rename
async def rename(src, dst):
    if str(getattr(src, "name", "")).startswith("3.orbax-checkpoint-tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
    return await _rename(src, dst)
async_path.rename = rename
"""


def tiny_args(workdir, num_steps=N, *extra):
    """launch/train.py flags equal to train_helpers.tiny_config(built_sample()) (the reference run's config)."""
    return ["--workdir", workdir, "--noprogress", "--config.model.weights=random:tiny-qwen2",
            f"--config.data.data_dir={built_sample()}", f"--config.data.max_length={MAX_LENGTH}",
            "--config.data.test_fraction=0.1", "--config.data.events_per_batch=2", "--config.data.eval_batch_size=8",
            "--config.loss.max_response_tokens=24", f"--config.train.num_steps={num_steps}",
            "--config.train.log_every=1", "--config.train.checkpoint_every=1", "--config.train.async_checkpoint=false",
            "--config.train.eval_at_end=false", "--config.train.generate_at_end=false",
            "--config.train.tensorboard=false", *extra]


def train_cli(args, inject="", timeout=900):
    r = subprocess.run([sys.executable, "-c", PRELUDE.format(inject=inject), *args], cwd=REPO, env=script_env(1),
                       capture_output=True, text=True, timeout=timeout)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    return r.returncode, r.stdout, err


def metric_steps(workdir):
    """Steps of the train rows of metrics.jsonl, in file order; every line must parse."""
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(ln) for ln in f.read().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


def test_rerun_after_a_corrupt_latest_checkpoint_completes(ref, tmp_path):
    wd = copy_run(ref, tmp_path)
    corrupt(wd, N, "truncated_blocks")
    rc, out, err = train_cli(tiny_args(wd))
    assert rc == 0, err
    assert len(err) == 1 and err[0].startswith(f"warning: checkpoint step {N} ") and "moved to" in err[0], err
    assert f"resumed from {wd}/checkpoints at step {N - 1}" in out
    assert checkpoint.make_manager(wd, save_every=1, keep=3).latest_step() == N  # retrained and saved
    assert metric_steps(wd) == list(range(1, N + 1))  # the redone step is logged once


def test_full_disk_while_checkpointing_is_one_line_and_a_rerun_completes(ref, tmp_path):
    wd = copy_run(ref, tmp_path)
    args = tiny_args(wd, N + 3, "--config.train.async_checkpoint=true")
    rc, _, err = train_cli(args, inject=ENOSPC_AT_STEP_6)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and "checkpoints/6: no space left on device" in err[0], err
    assert "MB" in err[0] and "rerun" in err[0]  # and no Orbax executor tracebacks after it
    assert checkpoint.make_manager(wd, save_every=1, keep=3).latest_step() == N + 1  # the in-flight save finished
    assert metric_steps(wd) == list(range(1, N + 3))  # step 6 was logged, then its save failed
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:  # and a crash cut a row in half
        f.write('{"step": 7, "train/lo')
    rc, out, err = train_cli(args)
    assert rc == 0 and err == [], err
    assert f"at step {N + 1}" in out
    assert metric_steps(wd) == list(range(1, N + 4))  # rows after the restored step 5 are not duplicated
    assert checkpoint.make_manager(wd, save_every=1, keep=3).latest_step() == N + 3


def test_kill_9_during_an_async_save_then_rerun_equals_uninterrupted(ref, tmp_path):
    wd = str(tmp_path / "run")
    args = tiny_args(wd, N, "--config.train.async_checkpoint=true")
    rc, _, err = train_cli(args, inject=SIGKILL_DURING_ASYNC_SAVE_OF_STEP_3)
    assert rc == -signal.SIGKILL, err
    names = os.listdir(os.path.join(wd, "checkpoints"))
    assert any(n.startswith("3.orbax-checkpoint-tmp") for n in names) and "3" not in names, names
    rc, out, err = train_cli(args)  # the same command again
    assert rc == 0, err
    assert len(err) == 1 and err[0] == f"note: {wd}/train.lock: took over a stale lock from PID " \
        f"{err[0].split('PID ')[1].split()[0]} on {socket.gethostname()} (not running)", err  # the killed run's
    assert f"resumed from {wd}/checkpoints at step 2" in out
    assert not [n for n in os.listdir(os.path.join(wd, "checkpoints")) if "tmp" in n]
    assert metric_steps(wd) == list(range(1, N + 1))  # rows the killed run logged past step 2 are not kept twice
    got, want = read_metrics(wd), read_metrics(ref)
    for s in range(1, N + 1):  # one device here, eight in the reference: equal up to summation order
        assert got[s] == pytest.approx(want[s], rel=2e-5), (s, got, want)


def test_second_trainer_refused_and_a_stale_lock_taken_over(ref, tmp_path):
    wd = copy_run(ref, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lock = os.path.join(wd, checkpoint.LOCK_FILE)
        with open(lock, "w") as f:
            json.dump({"pid": holder.pid, "host": socket.gethostname(), "started": "earlier"}, f)
        rc, _, err = train_cli(tiny_args(wd))
        assert rc == 2 and len(err) == 1, err
        assert f"another trainer holds this workdir (PID {holder.pid} on host {socket.gethostname()}" in err[0]
        assert metric_steps(wd) == list(range(1, N + 1))  # the holder's files are untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    rc, out, err = train_cli(tiny_args(wd))  # the holder is dead: its lock is stale
    assert rc == 0, err
    assert len(err) == 1 and f"took over a stale lock from PID {holder.pid}" in err[0], err
    assert not os.path.exists(lock)  # released at the end


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times come from Linux /proc")
def test_a_lock_whose_pid_was_reused_is_stale(tmp_path, capsys):
    """The lock names PID + start time: a live process with the lock's PID but another start
    time (the number was reused after a kill) does not hold the workdir; one that matches does."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with open(f"/proc/{other.pid}/stat") as f:  # field 22 (starttime), after the ")" of comm
            start = int(f.read().rsplit(")", 1)[1].split()[19])
        lock = tmp_path / checkpoint.LOCK_FILE
        held = {"pid": other.pid, "pid_start": start, "host": socket.gethostname(), "started": "earlier"}
        lock.write_text(json.dumps(held))
        with pytest.raises(UserError, match=f"another trainer holds this workdir \\(PID {other.pid} on host"):
            checkpoint.WorkdirLock(str(tmp_path))
        lock.write_text(json.dumps(dict(held, pid_start=start - 1)))  # same number, another process
        taken = checkpoint.WorkdirLock(str(tmp_path))
        assert f"took over a stale lock from PID {other.pid}" in capsys.readouterr().err
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        taken.release()
        assert not lock.exists()
    finally:
        other.kill()
        other.wait()


def test_resume_that_changes_the_run_is_refused_unless_accepted(ref, tmp_path):
    wd = copy_run(ref, tmp_path)
    changed = tiny_args(wd, N, "--config.optim.lr=0.1", "--config.loss.lambda_macro=0.5")
    rc, _, err = train_cli(changed)
    assert rc == 2 and len(err) == 1, err
    assert "optim.lr: checkpoint 0.002 vs config 0.1" in err[0] and "loss.lambda_macro: checkpoint 1.0 vs config 0.5" in err[0]
    assert "--accept_config_change" in err[0]
    assert json.load(open(os.path.join(wd, "config.json")))["optim"]["lr"] == 0.002
    rc, out, err = train_cli(changed + ["--accept_config_change"])
    assert rc == 0 and err == [], err
    assert "note: resuming with changed settings" in out
    saved = json.load(open(os.path.join(wd, "config.json")))
    assert saved["optim"]["lr"] == 0.1 and saved["loss"]["lambda_macro"] == 0.5  # config.json says what ran


def test_long_responses_are_refused_before_anything_compiles(tmp_path):
    wd = str(tmp_path / "run")
    rc, _, err = train_cli(tiny_args(wd, N, "--config.loss.max_response_tokens=4"))
    assert rc == 2 and len(err) == 1, err
    assert "the train split has a response of 18 tokens but loss.max_response_tokens=4" in err[0]
    assert "--config.loss.max_response_tokens=18" in err[0]
    assert not os.path.exists(os.path.join(wd, "checkpoints"))  # before step 1 (and before any compile)


# ----------------------------------------------------------------------------- the built dataset vs the config

def test_data_settings_that_contradict_the_built_dataset(tmp_path):
    from socialalign_jax.data import tfds_builders as B

    ds = B.open_dataset(built_sample())
    cfg = typed_config(built_sample(), **{"data.test_fraction": 0.5, "data.mode": "without_history",
                                         "data.num_history": 2})
    with pytest.raises(UserError) as e:  # the run's own <workdir>/data: an error
        setup.check_build_settings(cfg, ds, explicit_dir=False)
    assert "\n" not in str(e.value)
    assert "data.test_fraction=0.5 (built with 0.1)" in str(e.value) and "data.mode='without_history'" in str(e.value)
    assert "data.num_history=2 (built with 5)" in str(e.value)
    diffs, cfg = setup.check_build_settings(cfg, ds, explicit_dir=True)  # a named dataset: used as built
    assert len(diffs) == 3 and cfg.data.test_fraction == 0.1 and cfg.data.mode == "full"
    assert cfg.data.num_history == 5
    assert restore.config_to_dict(cfg)["data"]["test_fraction"] == 0.1  # config.json records what was used


def test_metadata_checks_before_step_1():
    from socialalign_jax.data import tfds_builders as B

    ds = B.open_dataset(built_sample())
    data = setup.Datasets(ds, ds.source("train"), ds.sources.get("test"), ds.max_length, ds.pad_id,
                          tuple(ds.metadata["classes"]))
    mc = get_preset("tiny-qwen2")
    longest = max(int(np.asarray(ds.source("train")[i]["loss_mask"]).sum()) for i in range(len(ds.source("train"))))
    assert ds.metadata["response_tokens_max"]["train"] == longest  # what the builder recorded
    setup.check_against_model(data, typed_config(built_sample()), mc, None)  # fits
    cases = [({"loss.max_response_tokens": longest - 1}, f"response of {longest} tokens"),
             ({"data.labels": "favor,against,neutral"}, "classes are negative,neutral,positive"),
             ({"lora.num_classes": 2}, "has 3 classes but lora.num_classes=2")]
    for overrides, expect in cases:
        with pytest.raises(UserError, match=expect):
            setup.check_against_model(data, typed_config(built_sample(), **overrides), mc, None)
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        setup.check_against_model(data, typed_config(built_sample()), mc.replace(vocab_size=512), None)
    # a dataset built before the metadata held these: the same answer from a scan of the records
    old = dict(ds.metadata)
    old.pop("response_tokens_max"), old.pop("max_token_id")
    data.dataset = B.Dataset(ds.path, old, ds.sources)
    with pytest.raises(UserError, match=f"response of {longest} tokens"):
        setup.check_against_model(data, typed_config(built_sample(), **{"loss.max_response_tokens": longest - 1}),
                                  mc, None)


# ----------------------------------------------------------------------------- the write layer

def _fail_writes_with_enospc(monkeypatch, after_bytes=0):
    """Every file opened through os.fdopen raises ENOSPC once `after_bytes` were written to it."""
    real = os.fdopen

    class Full:
        def __init__(self, f):
            self._f, self._n = f, 0

        def write(self, s):
            self._n += len(s)
            if self._n > after_bytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self._f.write(s)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self._f.close()

        def __getattr__(self, k):
            return getattr(self._f, k)

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real(*a, **k)))


def test_atomic_write_full_disk_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "preds.jsonl"
    path.write_text("old\n")
    _fail_writes_with_enospc(monkeypatch, after_bytes=10)
    with pytest.raises(UserError) as e:
        atomic_io.write_jsonl(({"i": i, "text": "x" * 20} for i in range(5)), path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: no space left on device; it needs about")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["preds.jsonl"]  # no temp file left


def test_files_written_into_a_directory_appear_whole_or_not_at_all(tmp_path):
    """atomic_files_into (the merged export's tokenizer files): a failing writer leaves the
    directory's existing files as they were and no temporary; a good one lands every file."""
    out = tmp_path / "merged"
    out.mkdir()
    (out / "tokenizer.json").write_text("old")
    with pytest.raises(UserError) as e:
        with atomic_io.atomic_files_into(out) as tmp:
            open(os.path.join(tmp, "tokenizer.json"), "w").write("new, half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value).startswith(f"{out}: no space left on device")
    assert sorted(os.listdir(out)) == ["tokenizer.json"] and (out / "tokenizer.json").read_text() == "old"
    with atomic_io.atomic_files_into(out) as tmp:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            open(os.path.join(tmp, name), "w").write(name)
    assert sorted(os.listdir(out)) == ["tokenizer.json", "tokenizer_config.json"]
    assert (out / "tokenizer.json").read_text() == "tokenizer.json"


def test_atomic_write_gets_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_io.write_json({"a": 1}, tmp_path / "a.json")
        atomic_io.write_bytes(tmp_path / "b.bin", b"\0")
        with atomic_io.atomic_dir(tmp_path / "d") as d:
            open(os.path.join(d, "f"), "w").close()
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_metrics_log_full_disk_and_truncated_rows(tmp_path):
    wd = str(tmp_path)
    log = MetricLogger(wd, tensorboard=False, resume_step=0)
    for s in (1, 2, 3):
        log.write(s, {"loss": float(s)})
    log.close()
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "lo')  # killed mid-row
    log = MetricLogger(wd, tensorboard=False, resume_step=2)  # resumed from the step-2 checkpoint
    log.write(3, {"loss": 30.0})
    log.close()
    assert read_metrics(wd, "loss") == {1: 1.0, 2: 2.0, 3: 30.0}
    assert [json.loads(ln)["step"] for ln in open(os.path.join(wd, "metrics.jsonl"))] == [1, 2, 3]

    log = MetricLogger(wd, tensorboard=False, resume_step=3)

    class Full:
        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

    log._jsonl._f = Full()  # the append layer's file
    with pytest.raises(UserError, match=r"metrics\.jsonl: no space left on device; it needs about \d+ B"):
        log.write(4, {"loss": 4.0})


def test_tensorboard_shows_a_resumed_run_once(tmp_path):
    """A killed run logged steps 1-4 but checkpointed only step 2; the resumed run logs 3-4
    again. TensorBoard itself (its EventAccumulator, purging orphaned data as the UI does)
    must show each step once, with the resumed run's values."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    wd = str(tmp_path)
    log = MetricLogger(wd, resume_step=0)
    for s in (1, 2, 3, 4):
        log.write(s, {"loss": float(s)})
    log.close()
    log = MetricLogger(wd, resume_step=2)
    for s in (3, 4):
        log.write(s, {"loss": 10.0 * s})
    log.close()
    acc = EventAccumulator(os.path.join(wd, "tensorboard"), purge_orphaned_data=True)
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert got == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)], got


def test_tokenizer_save_is_atomic_and_a_truncated_one_is_replaced(tmp_path):
    from socialalign_jax.weights.resolve import resolve_weights

    tok = resolve_weights("random:tiny-qwen2").tokenizer

    class FullDisk:
        def save_pretrained(self, d):
            with open(os.path.join(d, "tokenizer.json"), "w") as f:
                f.write('{"trunc')
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="tokenizer: no space left on device"):
        setup._tokenizer_dir(FullDisk(), str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing a rerun would trust
    os.makedirs(tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / "tokenizer.json").write_text('{"trunc')  # left by an older version
    path = setup._tokenizer_dir(tok, str(tmp_path))
    json.load(open(os.path.join(path, "tokenizer.json")))


# ----------------------------------------------------------------------------- pathological inputs

def _cli(script, *args, timeout=900):
    r = subprocess.run([sys.executable, str(REPO / "launch" / script), *map(str, args)], cwd=REPO, env=script_env(1),
                       capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, [ln for ln in r.stderr.splitlines() if ln.strip()]


def test_megabyte_texts_do_not_hang_the_build(tmp_path):
    """1 MB news, a 1 MB history post and an 80k-character response: bounded work, a generous no-hang guard."""
    from socialalign_jax.data.sample import load_sample_dir

    rs = np.random.default_rng(0)
    alphabet = np.array(list("我们今天的新闻是关于天气和经济发展人民生活水平提高了很多"))
    text = lambda n: "".join(rs.choice(alphabet, n))  # noqa: E731 - no punctuation: jieba's slowest case
    events = tmp_path / "events"
    events.mkdir()
    src = sorted(load_sample_dir().glob("*.json"))[:3]
    for f in src:
        shutil.copy(f, events / f.name)
    ev = json.loads(src[0].read_text(encoding="utf-8"))
    ev["news"] = text(1_000_000)
    ev["cases"][0]["history"][0]["text"] = text(1_000_000)
    ev["cases"][1]["weibo"] = text(80_000)
    (events / src[0].name).write_text(json.dumps(ev, ensure_ascii=False), encoding="utf-8")
    rc, out, err = _cli("build_dataset.py", "--source", "socialweibo", "--input", events, "--out", tmp_path / "d",
                        "--max_length", 320, "--on_overflow", "skip", "--json", timeout=600)  # minutes before the fix; seconds now
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["stats"]["skipped_too_long"] == len(ev["cases"])  # the 1 MB event's cases overflow, counted


def test_a_long_generated_post_does_not_hang_the_labeller(tmp_path):
    from socialalign_jax.data.labellers import MAX_LABEL_CHARS, LexiconLabeller

    labels = list(DEFAULT_LABELS)
    recs = [{"event": "e", "event_id": 0, "user": "u", "prompt_id": i, "generated": g, "reference": "好",
             "label": "positive", "probs": [0.2, 0.2, 0.6], "labels": labels}
            for i, g in enumerate(["太好了" * 27_000, "\u200b \u200d\ufeff"])]
    preds = tmp_path / "p.jsonl"
    atomic_io.write_jsonl(recs, preds)
    rc, out, err = _cli("evaluate.py", "--predictions", preds, "--out", tmp_path / "ev", timeout=600)
    assert rc == 0 and err == [], err
    # what the labeller reads is documented: the first MAX_LABEL_CHARS characters
    lab = LexiconLabeller()
    assert lab.label([recs[0]["generated"]]) == lab.label([recs[0]["generated"][:MAX_LABEL_CHARS]])
    assert lab.label([recs[1]["generated"]]) == ["neutral"]  # whitespace and zero-width only: no sentiment


def test_out_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = _cli("evaluate.py", "--predictions", f, "--out", f)
    assert rc == 2 and len(err) == 1 and "is a file; expected a directory" in err[0], err
    rc, _, err = _cli("build_dataset.py", "--source", "socialweibo", "--input", tmp_path, "--out", f / "sub")
    assert rc == 2 and len(err) == 1 and f"{f} is a file" in err[0], err
    assert f.read_text() == "x"


def test_bad_text_fields_name_file_record_and_field(tmp_path):
    from socialalign_jax.data.records import DataError, read_event_file
    from socialalign_jax.data.sample import load_sample_dir

    src = sorted(load_sample_dir().glob("*.json"))[0]
    good = json.loads(src.read_text(encoding="utf-8"))

    def bad(mutate):
        ev = json.loads(json.dumps(good))
        mutate(ev)
        p = tmp_path / "event.json"
        p.write_text(json.dumps(ev, ensure_ascii=True), encoding="utf-8")  # "\ud800" stays an escape
        with pytest.raises(DataError) as e:
            read_event_file(p)
        assert "\n" not in str(e.value)
        return str(e.value)

    msg = bad(lambda ev: ev["cases"][2]["history"][1].update(text="ok \ud800 no"))
    assert "record 2: field 'history[1].text': not valid Unicode text (lone surrogate" in msg
    assert "record 1: field 'user_level': expected a string or a finite number, got nan" in bad(
        lambda ev: ev["cases"][1].update(user_level=float("nan")))
    assert "record 0: field 'weibo': empty response" in bad(lambda ev: ev["cases"][0].update(weibo=" \u200b\u200d\t"))


def test_duplicate_records_are_refused(tmp_path):
    from socialalign_jax.data.converters import zs_csd
    from socialalign_jax.data.records import DataError
    from socialalign_jax.evaluation.predictions import InputError, load_predictions
    from socialalign_jax.evaluation.report import format_event_table

    recs = [{"id": 7, "target": "t", "sentences": ["a", "b"], "speakers": [0, 1], "label": 0},
            {"id": 8, "target": "t", "sentences": ["a", "c"], "speakers": [0, 2], "label": 1},
            {"id": 7, "target": "t", "sentences": ["a", "d"], "speakers": [0, 3], "label": 2}]
    (tmp_path / "dev_data.json").write_text(json.dumps(recs), encoding="utf-8")
    with pytest.raises(DataError, match=r"dev_data.json: record 2: field 'id': duplicate record id 7 "
                                        r"\(also dev_data.json record 0\)"):
        zs_csd.read_zs_csd(str(tmp_path / "dev_data.json"))

    labels = list(DEFAULT_LABELS)
    row = {"event": "line one\nline two", "event_id": 0, "user": "u", "prompt_id": "0:1", "generated": "g",
           "reference": "r", "label": None, "probs": [0.2, 0.2, 0.6], "labels": labels}
    preds = tmp_path / "p.jsonl"
    atomic_io.write_jsonl([row, dict(row, prompt_id="0:2"), row], preds)
    with pytest.raises(InputError, match=r"p.jsonl: line 3: duplicate record \(the same as line 1; prompt_id \"0:1\"\)"):
        load_predictions(str(preds))
    table = format_event_table([{"event_id": 0, "event": row["event"], "n": 1, "real": None, "head": [0.2, 0.2, 0.6],
                                 "head_jsd": None}], labels)
    assert len(table.splitlines()) == 3 and "line one line two" in table  # the newline does not break the row


def test_score_refuses_to_overwrite_its_input(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "hello"}\n')
    rc, _, err = _cli("score.py", "--weights", tmp_path, "--input", inp, "--out", inp)
    assert rc == 2 and len(err) == 1 and "is the --input file" in err[0], err
    assert inp.read_text() == '{"text": "hello"}\n'


def test_orphaned_read_filter_drops_only_closed_loop_errors(monkeypatch):
    """The hook a restore installs hides the closed-loop tracebacks of a failed restore's
    sibling reads, and passes every other unraisable exception through."""
    import types
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoint._silence_orphaned_reads()
    checkpoint._silence_orphaned_reads()  # installed once
    for exc in (RuntimeError("Event loop is closed"), RuntimeError("other"), ValueError("Event loop is closed")):
        sys.unraisablehook(types.SimpleNamespace(exc_value=exc))
    assert [(type(u.exc_value).__name__, str(u.exc_value)) for u in seen] == [
        ("RuntimeError", "other"), ("ValueError", "Event loop is closed")]


def test_only_orphaned_checkpoint_reads_are_dropped_from_asyncio_logs():
    """A damaged checkpoint's leftover reads may reach asyncio's logger when collected (seen as a
    flaky 8-line traceback in the rerun test above); those records, and only those, are dropped."""
    import logging

    from socialalign_jax.runs import checkpoint as ck

    def rec(msg):
        return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1771, msg, None, None)

    orphan = ("Task exception was never retrieved\nfuture: <Task finished name='Task-7' coro=<async_deserialize() "
              "done, defined at .../serialization.py:400> exception=ValueError('truncated')>")
    assert not ck._orphaned_read_filter(rec(orphan))
    assert ck._orphaned_read_filter(rec("Task exception was never retrieved\nfuture: <Task coro=<serve()>>"))
    # TensorStore's own future for a sibling read (seen in the same rerun test, 2 of 6 runs)
    read = ("Future exception was never retrieved\nfuture: <Future finished exception=ValueError('OUT_OF_RANGE: "
            "Error opening \"cast\" driver: Error reading \"layers.mlp.up.A/.zarray\" in OCDBT database ... "
            "[tensorstore_spec=\\'{\"driver\":\"zarr\"}\\']')>")
    assert not ck._orphaned_read_filter(rec(read))
    assert ck._orphaned_read_filter(rec("Future exception was never retrieved\nfuture: <Future finished "
                                        "exception=ValueError('unrelated')>"))
    assert ck._orphaned_read_filter(rec("Executing <Task ...> took 0.2 seconds"))
