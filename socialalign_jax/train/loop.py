"""The training job: config -> base model, adapters, mesh, data, jitted step, checkpoints, logs.

Runs unchanged from one CPU to a multi-host TPU slice: every process builds the same mesh
over the global devices, reads only its rows of each global batch, and assembles global
arrays with `jax.make_array_from_process_local_data`. Only process 0 logs and prints.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from socialalign_jax.core.atomic_io import write_json
from socialalign_jax.core.errors import UserError
from socialalign_jax.data.pipeline import BatchConfig, TrainIterator
from socialalign_jax.data.setup import BUILD_KEYS
from socialalign_jax.evaluation import skill
from socialalign_jax.model import axes as model_axes, backend
from socialalign_jax.parallel import sharding
from socialalign_jax.parallel.mesh import platform_of
from socialalign_jax.runs import checkpoint
from socialalign_jax.runs.restore import SKILL_FILE, config_to_dict
from socialalign_jax.runs.run_config import as_run_config, respell_lists, RunConfig
from socialalign_jax.runs.validation import validate_run_config
from socialalign_jax.train import flops, optim, step as step_lib
from socialalign_jax.train.evaluate import eval_source, evaluate_split, forecast_track_record
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


# ----------------------------------------------------------------------------- the run

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
    if int(cfg.train.num_steps) > 0:
        return int(cfg.train.num_steps)
    return max(1, int(cfg.train.num_epochs) * batches_per_epoch)


# Keys that may change when a run resumes: they do not change what the steps already taken
# meant (logging, checkpoint cadence, the length of the run, evaluation, decoding, layout).
# Any other difference from the run's config.json is refused unless accept_config_change.
RESUME_FREE = ("train.num_steps", "train.num_epochs", "train.log_every", "train.checkpoint_every",
               "train.keep_checkpoints", "train.async_checkpoint", "train.eval_at_end", "train.eval_max_examples",
               "train.tensorboard", "train.generate_at_end", "train.labeller", "data.eval_batch_size",
               "model.remat", "model.remat_policy", "model.scan_layers", "model.attention", "lora.fuse_base", "mesh.", "distributed.", "sample.", "hardware.")


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
        return  # config.json is rewritten below; the checkpoint's own config is checked on restore
    diffs = resume_conflicts(saved, config_to_dict(cfg))
    if not diffs:
        return
    if not accept:
        raise UserError(f"{workdir}: resuming with a config that contradicts the run's config.json: "
                        + "; ".join(diffs) + " (use a new --workdir, the run's values, or pass "
                        "--accept_config_change to continue with the new values)")
    if jax.process_index() == 0:
        print("note: resuming with changed settings (config.json updated): " + "; ".join(diffs))


def train(cfg, workdir: str, *, progress: bool = True, accept_config_change: bool = False) -> dict[str, Any]:
    """Run (or resume) training; returns the final metrics dict.

    Startup order: distributed init, one config validation, the workdir lock, the resume
    check against config.json, then weights, data and its metadata checks; nothing has
    compiled when any of those refuses.
    """
    cfg = as_run_config(cfg)  # the library's entry point converts as the launchers do; below, typed only
    setup_distributed(cfg)
    validate_run_config(cfg, device_count=jax.device_count())
    os.makedirs(workdir, exist_ok=True)
    lock = checkpoint.WorkdirLock(workdir) if jax.process_index() == 0 else None
    try:
        _check_resume(cfg, workdir, accept_config_change)
        return _train(cfg, workdir, progress=progress)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, workdir: str, *, progress: bool) -> dict[str, Any]:
    job = build_job(cfg, workdir)
    cfg = job.cfg  # the data.* values a named dataset was built with replace the config's
    is_main = jax.process_index() == 0

    bcfg = BatchConfig(events_per_batch=int(cfg.data.events_per_batch), cases_per_event=int(cfg.data.cases_per_event),
                       seq_len=job.data.seq_len, pad_id=job.data.pad_id, num_classes=job.lora_cfg.num_classes,
                       seed=int(cfg.data.seed), read_threads=2, prefetch=2)
    sharding.check_batch_divisible(bcfg.global_batch_size, job.mesh, job.rules)
    it = TrainIterator(job.data.train, bcfg, process_index=jax.process_index(), process_count=jax.process_count())
    n_steps = total_steps(cfg, len(it.plan(0)))
    optimizer, schedule = optim.make_optimizer(cfg.optim, n_steps)

    # Nothing is computed yet: a restored run never draws the fresh adapters it would overwrite.
    abstract_state, create_state = step_lib.sharded_train_state(int(cfg.train.seed), job.model_cfg, job.lora_cfg,
                                                                optimizer, job.mesh, job.rules)
    state_sh = jax.tree.map(lambda x: x.sharding, abstract_state)
    param_sh = model_axes.shardings(job.params, job.mesh, job.rules)
    batch_sh = sharding.batch_sharding(job.mesh, job.rules)
    repl = jax.sharding.NamedSharding(job.mesh, jax.sharding.PartitionSpec())

    cfg_dict = config_to_dict(cfg)
    manager = checkpoint.make_manager(workdir, save_every=int(cfg.train.checkpoint_every),
                                      keep=int(cfg.train.keep_checkpoints), async_save=bool(cfg.train.async_checkpoint))
    logger = None
    try:
        def check_data(_, data_state):  # a garbage iterator state rejects the step
            pos = {k: data_state.get(k) for k in ("epoch", "batch")}
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pos.values()):
                raise ValueError(f"data-iterator position {pos} is not two counts")
            it.set_state(data_state)

        # The newest checkpoint that restores; damaged newer ones are set aside with one line each.
        restored = checkpoint.restore(manager, abstract_state, cfg_dict, check=check_data,
                                      move_bad=jax.process_count() == 1)
        if restored is not None:
            state, _, _ = restored
            if is_main:
                print(f"resumed from {manager.directory} at step {int(state['step'])}")
        else:
            state = create_state()
        if is_main:  # what this run uses (a resume may have changed the free keys, see RESUME_FREE)
            write_json(cfg_dict, os.path.join(workdir, "config.json"))
        logger = MetricLogger(workdir, enabled=is_main, tensorboard=bool(cfg.train.tensorboard),
                              resume_step=int(state["step"]))

        # Backend choices resolved on the host for the mesh's devices; traced under the mesh's axis
        # rules, so model/modules.py's activation constraints apply (sharding.under_mesh).
        step_cfgs = backend.resolve_for_platform(job.model_cfg, job.lora_cfg, platform_of(job.mesh),
                                                 train_seq_len=bcfg.seq_len)
        train_step = jax.jit(
            sharding.under_mesh(step_lib.make_train_step(*step_cfgs, job.loss_cfg, optimizer, schedule),
                                job.mesh, job.rules),
            in_shardings=(param_sh, state_sh, batch_sh, repl), out_shardings=(state_sh, repl), donate_argnums=(1,))
        rng = jax.random.PRNGKey(int(cfg.train.seed) + 1)

        peak = float(cfg.hardware.peak_flops_per_device) or (flops.peak_flops_for(jax.devices()[0].device_kind) or 0.0)
        step_flops = flops.train_step_flops(job.model_cfg, job.lora_cfg, bcfg.global_batch_size, bcfg.seq_len,
                                            job.loss_cfg.max_response_tokens or None, job.lora_cfg.num_classes)

        baseline = None
        if cfg.train.eval_at_end and int(state["step"]) == 0 and job.data.test is not None and len(job.data.test):
            baseline = evaluate_split(job, state["adapters"], eval_source(cfg, job.data.test),
                                      desc="test split (step 0)")
            if is_main:
                logger.write(0, baseline, prefix="eval/")
                write_json(baseline, os.path.join(workdir, "eval_step0.json"))

        stop = _StopFlag()
        start_step = int(state["step"])
        bar = None
        if is_main and progress:
            from tqdm import tqdm
            bar = tqdm(total=n_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        last = {}
        t_last, tok_last = time.perf_counter(), 0.0
        pending = None  # (step, metrics) whose loss the host has not looked at yet

        def check_loss(step_i, mets):
            loss = float(mets["loss"])
            if not math.isfinite(loss):
                manager.wait_until_finished()
                raise UserError(
                    f"step {step_i}: loss is {loss} (terms: " + ", ".join(
                        f"{k}={float(mets[k]):.4g}" for k in ("lm", "sent", "macro"))
                    + f"); stopped; the last good checkpoint is step {manager.latest_step()} in {manager.directory}")
        try:
            for step in range(start_step, n_steps):
                try:
                    local = next(it)
                except StopIteration:
                    break
                step_lib.check_response_lengths(local, job.loss_cfg.max_response_tokens, f"train batch {step}")
                batch = global_batch(local, job.mesh, job.rules)
                state, metrics = train_step(job.params, state, batch, rng)
                # The previous step's loss is ready by now: reading it here keeps the host one step
                # ahead of the device (a float() of this step's loss would stall every dispatch).
                if pending is not None:
                    check_loss(*pending)
                pending = (step, metrics)
                tok_last += float(np.asarray(local["attention_mask"]).sum()) * jax.process_count()
                done = step + 1
                if done % int(cfg.train.log_every) == 0 or done == n_steps:
                    check_loss(*pending)  # synced here anyway: a non-finite step is never logged
                    dt = time.perf_counter() - t_last
                    m = jax.device_get(metrics)
                    m["tokens_per_s"] = tok_last / max(dt, 1e-9)
                    steps_done = done - (start_step if not last else last.get("_step", start_step))
                    m["step_time_s"] = dt / max(steps_done, 1)
                    m["tflops_per_s"] = step_flops / max(m["step_time_s"], 1e-9) / 1e12
                    if peak > 0:
                        m["mfu"] = step_flops / m["step_time_s"] / (peak * jax.device_count())
                    last = logger.write(done, m, prefix="train/")
                    last["_step"] = done
                    t_last, tok_last = time.perf_counter(), 0.0
                    if bar is not None:
                        bar.set_postfix(loss=f"{m['loss']:.3f}", lm=f"{m['lm']:.3f}", macro=f"{m['macro']:.3f}")
                if bar is not None:
                    bar.update(1)
                if stop.signum is not None or done == n_steps or manager.should_save(done):
                    check_loss(*pending)  # a state is saved only after its loss was seen to be finite
                checkpoint.save(manager, done, state, it.get_state(), cfg_dict)
                if stop.signum is not None:
                    if manager.latest_step() != done:  # the periodic save above may already hold this step
                        checkpoint.save(manager, done, state, it.get_state(), cfg_dict, force=True)
                    checkpoint.close(manager)
                    if is_main:
                        print(f"\nreceived signal {stop.signum}: saved checkpoint at step {done} in {manager.directory}; exiting")
                    return {"stopped_at": done}
            if pending is not None:
                check_loss(*pending)
            final_step = int(state["step"])
            if manager.latest_step() != final_step:
                checkpoint.save(manager, final_step, state, it.get_state(), cfg_dict, force=True)
            checkpoint.close(manager)
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
        result = {"step": int(state["step"]), "train": {k: v for k, v in last.items() if not k.startswith("_")}}
        track = None  # the forecast's track record on the held-out events (evaluation/skill.py)
        if cfg.train.eval_at_end and job.data.test is not None and len(job.data.test):
            final = evaluate_split(job, state["adapters"], eval_source(cfg, job.data.test), desc="test split",
                                   per_event=True)
            track = forecast_track_record(job, final.pop("_per_event", {}), seed=int(cfg.train.seed))
            result["eval"] = final
            result["forecast_skill"] = track
            if baseline is None and os.path.exists(os.path.join(workdir, "eval_step0.json")):
                import json
                baseline = json.load(open(os.path.join(workdir, "eval_step0.json")))
            result["eval_step0"] = baseline
            if is_main:
                logger.write(result["step"], final, prefix="eval/")
                write_json(result, os.path.join(workdir, "eval_final.json"))
        if is_main:  # read by predict.py, the API, report.md and the page: every forecast carries this line
            if track is None:
                track = {"num_events": 0, "status": "none", "w": 1.0,
                         "reason": "no test split" if job.data.test is None or not len(job.data.test)
                         else "train.eval_at_end is off"}
            track["step"] = result["step"]  # the adapters it describes (an export of another step carries none)
            write_json(track, os.path.join(workdir, SKILL_FILE))
            print(f"forecast skill: {skill.skill_sentence(track)}")
        logger.close()
        return result
    except BaseException as e:
        checkpoint.close(manager, failing=e)  # in-flight async saves end before the error is reported
        if logger is not None:
            logger.close(failing=True)
        raise
