"""The training job: config -> base model, adapters, mesh, data, jitted step, checkpoints, logs.

Runs unchanged from one CPU to a multi-host TPU slice: every process builds the same mesh
over the global devices, reads only its rows of each global batch, and assembles global
arrays with `jax.make_array_from_process_local_data`. Only process 0 logs and prints.

`train` is the entry point; the run itself is a `TrainLoop` in three parts, `init` (the job,
the data iterator, the optimizer, the state restored or created on the mesh, the logger, the
jitted step), `run` (the steps) and `finish` (what the run returns), and everything done with
a step's result (logging, checkpoints, evaluation) is a hook of train/hooks.py.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Any, Sequence

import jax

from socialalign_jax.core.atomic_io import write_json
from socialalign_jax.core.errors import UserError
from socialalign_jax.data.pipeline import BatchConfig, TrainIterator
from socialalign_jax.data.setup import BUILD_KEYS
from socialalign_jax.model import axes as model_axes, backend
from socialalign_jax.parallel import sharding
from socialalign_jax.parallel.mesh import platform_of
from socialalign_jax.runs import checkpoint
from socialalign_jax.runs.restore import config_to_dict
from socialalign_jax.runs.run_config import as_run_config, respell_lists, RunConfig
from socialalign_jax.runs.validation import validate_run_config
from socialalign_jax.train import optim, step as step_lib
from socialalign_jax.train.hooks import default_hooks, Hook
from socialalign_jax.train.job import build_job, global_batch
from socialalign_jax.train.metrics_log import MetricLogger


# ----------------------------------------------------------------------------- distributed

def setup_distributed(cfg: RunConfig) -> None:
    """jax.distributed.initialize from the config/flags, or from the environment on a pod.

    "auto" initializes only when the environment describes more than one process (a bare
    SLURM_JOB_ID or a one-task MPI launch is a single process and needs no coordinator), and
    never after this process has already started a JAX backend (a notebook or a test that
    calls `train` in-process): JAX refuses a late initialize, so auto skips it and warns.
    """
    mode = cfg.distributed.initialize
    addr = cfg.distributed.coordinator_address
    if mode == "no" or (mode == "auto" and not addr and not _multi_process_environment()):
        return
    from jax._src import xla_bridge  # no public query for "has a backend started?"
    if xla_bridge.backends_are_initialized():
        if mode == "auto" and not addr:
            print("warning: distributed.initialize=auto: JAX was already started in this process, "
                  "so it runs single-process; launch train.py as its own process on a pod", file=sys.stderr)
            return
        raise UserError("distributed: jax.distributed.initialize must run before any JAX computation; "
                        "launch train.py as its own process (JAX was already started in this one)")
    kw = {}
    if addr:
        kw = dict(coordinator_address=addr, num_processes=int(cfg.distributed.num_processes),
                  process_id=int(cfg.distributed.process_id))
    if (jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") or "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kw)


def _multi_process_environment() -> bool:
    """True when a cluster launcher says this job has more than one process."""
    env = os.environ

    def count(name: str) -> int:
        try:
            return int(env.get(name, "1").split("(")[0])  # SLURM writes "2(x3)" in some fields
        except ValueError:
            return 1

    if "MEGASCALE_COORDINATOR_ADDRESS" in env:  # multi-slice TPU
        return True
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return True
    if "SLURM_JOB_ID" in env and max(count("SLURM_NTASKS"), count("SLURM_NPROCS")) > 1:
        return True
    return count("OMPI_COMM_WORLD_SIZE") > 1


# ----------------------------------------------------------------------------- resuming

# Keys that may change when a run resumes: they do not change what the steps already taken
# meant (logging, checkpoint cadence, the length of the run, evaluation, decoding, layout).
# Any other difference from the run's config.json is refused unless accept_config_change.
RESUME_FREE = ("train.num_steps", "train.num_epochs", "train.log_every", "train.checkpoint_every",
               "train.keep_checkpoints", "train.async_checkpoint", "train.eval_at_end", "train.eval_max_examples",
               "train.tensorboard", "train.generate_at_end", "train.labeller", "data.eval_batch_size",
               "model.remat", "model.remat_policy", "model.scan_layers", "model.attention", "model.matmul_out",
               "lora.fuse_base",
               "mesh.", "distributed.", "sample.", "hardware.")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """'key: checkpoint X vs config Y' for every key that differs and may not change on resume."""
    import json

    saved_f, cur_f = _flat(respell_lists(saved)), _flat(json.loads(json.dumps(current, default=str)))
    # data.* build settings are checked against the built dataset itself (data_setup.check_build_settings)
    dataset_keys = tuple(f"data.{k}" for k in BUILD_KEYS)
    out = []
    for key in sorted(set(saved_f) & set(cur_f)):
        if key.startswith(RESUME_FREE) or key in dataset_keys or saved_f[key] == cur_f[key]:
            continue
        out.append(f"{key}: checkpoint {saved_f[key]!r} vs config {cur_f[key]!r}")
    return out


def _has_checkpoint(workdir: str) -> bool:
    d = os.path.join(workdir, "checkpoints")
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def _check_resume(cfg: RunConfig, workdir: str, accept: bool) -> None:
    """Before any weights are read: a resume must not silently change what the run is."""
    import json

    path = os.path.join(workdir, "config.json")
    if not (_has_checkpoint(workdir) and os.path.isfile(path)):
        return
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return  # TrainLoop.init rewrites config.json; the checkpoint's own config is checked on restore
    diffs = resume_conflicts(saved, config_to_dict(cfg))
    if not diffs:
        return
    if not accept:
        raise UserError(f"{workdir}: resuming with a config that contradicts the run's config.json: "
                        + "; ".join(diffs) + " (use a new --workdir, the run's values, or pass "
                        "--accept_config_change to continue with the new values)")
    if jax.process_index() == 0:
        print("note: resuming with changed settings (config.json updated): " + "; ".join(diffs))


# ----------------------------------------------------------------------------- the loop

class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.signum = None
        self._old = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):  # noqa: ARG002
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def total_steps(cfg: RunConfig, batches_per_epoch: int) -> int:
    """train.num_steps, or (when it is -1) train.num_epochs passes over the training batches."""
    if int(cfg.train.num_steps) > 0:
        return int(cfg.train.num_steps)
    return max(1, int(cfg.train.num_epochs) * batches_per_epoch)


class TrainLoop:
    """One training run: `init()`, `run()`, `finish()` (and `abort(error)` when any of them raises).

    The loop takes the steps, reading each step's loss one step late so that the host stays a
    step ahead of the device (`confirm_finite`); the hooks
    (train/hooks.py: `default_hooks()` then `hooks`) do the rest. What they read, set by `init`:
    cfg (the run config, with the data.* values the dataset was built with), job (train/job.py),
    workdir, is_main (process 0: the only one that logs and prints), batch_config, it (this
    process's TrainIterator), n_steps, start_step (the restored step, 0 when fresh), state
    ({'step': int32 [], 'adapters': tree, 'opt_state': tree}, sharded on job.mesh), manager (the
    Orbax CheckpointManager), cfg_dict (the config saved with each checkpoint), logger; and by
    `run`: run_started (perf_counter() before the first step), batch (this process's rows of the
    last step's batch), bar (the progress bar, None when off or outside `run`), stop_signal (the
    signal that stopped the run, else None).
    """

    def __init__(self, cfg: RunConfig, workdir: str, *, progress: bool = True, hooks: Sequence[Hook] = ()):
        self.cfg, self.workdir, self.progress = cfg, workdir, progress
        self.hooks: list[Hook] = default_hooks() + list(hooks)
        self.manager = self.logger = self.bar = self.stop_signal = None
        self._pending = None  # (index of a step, its metrics) whose loss the host has not read yet

    def init(self) -> None:
        """Everything before the first step; ends with every hook's on_start."""
        self.job = job = build_job(self.cfg, self.workdir)
        self.cfg = cfg = job.cfg  # the data.* values a named dataset was built with replace the config's
        self.is_main = jax.process_index() == 0
        self.batch_config = bcfg = BatchConfig(
            events_per_batch=int(cfg.data.events_per_batch), cases_per_event=int(cfg.data.cases_per_event),
            seq_len=job.data.seq_len, pad_id=job.data.pad_id, num_classes=job.lora_cfg.num_classes,
            seed=int(cfg.data.seed), read_threads=2, prefetch=2)
        sharding.check_batch_divisible(bcfg.global_batch_size, job.mesh, job.rules)
        self.it = TrainIterator(job.data.train, bcfg, process_index=jax.process_index(),
                                process_count=jax.process_count())
        self.n_steps = total_steps(cfg, len(self.it.plan(0)))
        optimizer, schedule = optim.make_optimizer(cfg.optim, self.n_steps)

        # Nothing is computed yet: a restored run never draws the fresh adapters it would overwrite.
        abstract_state, create_state = step_lib.sharded_train_state(int(cfg.train.seed), job.model_cfg, job.lora_cfg,
                                                                    optimizer, job.mesh, job.rules)
        self.cfg_dict = config_to_dict(cfg)
        self.manager = checkpoint.make_manager(self.workdir, save_every=int(cfg.train.checkpoint_every),
                                               keep=int(cfg.train.keep_checkpoints),
                                               async_save=bool(cfg.train.async_checkpoint))
        # The newest checkpoint that restores; damaged newer ones are set aside with one line each.
        restored = checkpoint.restore(self.manager, abstract_state, self.cfg_dict, check=self._set_data_position,
                                      move_bad=jax.process_count() == 1)
        if restored is not None:
            self.state = restored[0]
            if self.is_main:
                print(f"resumed from {self.manager.directory} at step {int(self.state['step'])}")
        else:
            self.state = create_state()
        if self.is_main:  # what this run uses (a resume may have changed the free keys, see RESUME_FREE)
            write_json(self.cfg_dict, os.path.join(self.workdir, "config.json"))
        self.start_step = int(self.state["step"])
        self.logger = MetricLogger(self.workdir, enabled=self.is_main, tensorboard=bool(cfg.train.tensorboard),
                                   resume_step=self.start_step)

        state_sh = jax.tree.map(lambda x: x.sharding, abstract_state)
        repl = jax.sharding.NamedSharding(job.mesh, jax.sharding.PartitionSpec())
        # Backend choices resolved on the host for the mesh's devices; traced under the mesh's axis
        # rules, so model/modules.py's activation constraints apply (sharding.under_mesh).
        step_cfgs = backend.resolve_for_platform(job.model_cfg, job.lora_cfg, platform_of(job.mesh),
                                                 train_seq_len=bcfg.seq_len)
        self._train_step = jax.jit(
            sharding.under_mesh(step_lib.make_train_step(*step_cfgs, job.loss_cfg, optimizer, schedule),
                                job.mesh, job.rules),
            in_shardings=(model_axes.shardings(job.params, job.mesh, job.rules), state_sh,
                          sharding.batch_sharding(job.mesh, job.rules), repl),
            out_shardings=(state_sh, repl), donate_argnums=(1,))
        self._rng = jax.random.PRNGKey(int(cfg.train.seed) + 1)  # folded with the step inside the step
        for hook in self.hooks:
            hook.on_start(self)

    def _set_data_position(self, _, data_state) -> None:
        """checkpoint.restore's check: a garbage iterator state rejects the step (restore tries an older one)."""
        pos = {k: data_state.get(k) for k in ("epoch", "batch")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pos.values()):
            raise ValueError(f"data-iterator position {pos} is not two counts")
        self.it.set_state(data_state)

    def run(self) -> None:
        """The steps from start_step to n_steps (fewer when the data ends), each followed by every
        hook's on_step_end; a SIGTERM/SIGINT stops it at the next step boundary (stop_signal)."""
        stop = _StopFlag()  # only while stepping: a signal during evaluation ends the process as usual
        if self.is_main and self.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=self.n_steps, initial=self.start_step, desc="train", unit="step",
                            dynamic_ncols=True)
        self.run_started = time.perf_counter()
        try:
            for step in range(self.start_step, self.n_steps):
                try:
                    self.batch = next(self.it)  # {name: [local rows, ...] numpy}
                except StopIteration:
                    break
                step_lib.check_response_lengths(self.batch, self.job.loss_cfg.max_response_tokens,
                                                f"train batch {step}")
                batch = global_batch(self.batch, self.job.mesh, self.job.rules)
                self.state, metrics = self._train_step(self.job.params, self.state, batch, self._rng)
                # The previous step's loss is ready by now: reading it here keeps the host one step
                # ahead of the device (a float() of this step's loss would stall every dispatch).
                self.confirm_finite()
                self._pending = (step, metrics)
                for hook in self.hooks:
                    hook.on_step_end(self, step + 1, metrics)
                if self.bar is not None:  # after the hooks: the bar shows this step's logged numbers
                    self.bar.update(1)
                if stop.signum is not None:
                    self.stop_signal = stop.signum
                    return
        finally:
            stop.restore()
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    def confirm_finite(self) -> None:
        """Read the newest step's loss if the host has not yet; a non-finite one ends the run in one
        line naming the step, its loss terms and the last good checkpoint."""
        if self._pending is None:
            return
        step, metrics = self._pending
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            self.manager.wait_until_finished()
            raise UserError(
                f"step {step}: loss is {loss} (terms: " + ", ".join(
                    f"{k}={float(metrics[k]):.4g}" for k in ("lm", "sent", "macro"))
                + f"); stopped; the last good checkpoint is step {self.manager.latest_step()} in "
                + f"{self.manager.directory}")
        self._pending = None

    def finish(self) -> dict[str, Any]:
        """The run's result: {"step": n, ...what the hooks add} or, after a signal, {"stopped_at": n}."""
        self.confirm_finite()
        step = int(self.state["step"])
        result: dict[str, Any] = {"stopped_at": step} if self.stop_signal is not None else {"step": step}
        for hook in self.hooks:
            hook.on_finish(self, result)
        self.logger.close()
        return result

    def abort(self, error: BaseException) -> None:
        """The run ends in `error`: in-flight async saves end and the logs close before it is reported."""
        if self.manager is not None:
            checkpoint.close(self.manager, failing=error)
        if self.logger is not None:
            self.logger.close(failing=True)


def train(cfg, workdir: str, *, progress: bool = True, accept_config_change: bool = False,
          hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Run (or resume) training; returns the final metrics dict.

    Startup order: distributed init, one config validation, the workdir lock, the resume
    check against config.json, then weights, data and its metadata checks; nothing has
    compiled when any of those refuses. `hooks` run after the trainer's own at each point
    (train/hooks.py: subclass `Hook`).
    """
    cfg = as_run_config(cfg)  # the library's entry point converts as the launchers do; below, typed only
    setup_distributed(cfg)
    validate_run_config(cfg, device_count=jax.device_count())
    os.makedirs(workdir, exist_ok=True)
    lock = checkpoint.WorkdirLock(workdir) if jax.process_index() == 0 else None
    try:
        _check_resume(cfg, workdir, accept_config_change)
        loop = TrainLoop(cfg, workdir, progress=progress, hooks=hooks)
        try:
            loop.init()
            loop.run()
            return loop.finish()
        except BaseException as e:
            loop.abort(e)
            raise
    finally:
        if lock is not None:
            lock.release()
