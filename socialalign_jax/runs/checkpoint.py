"""Orbax checkpoints of the trainable state, the data-iterator position and the config.

Only the adapters, their optimizer state and the step are saved: the frozen base is re-read
from its own weights file, so a 7B run's checkpoints stay megabytes. Saves are asynchronous
(training continues while the previous one is written); a restart with the same workdir
picks the latest complete step.

A step directory holds four Orbax items, so that a reader takes only what it needs:
`adapters` (the trainable tree, what generation, prediction and export restore, without
building an optimizer), `train_state` ({step, opt_state}: what only a resume reads), `data`
(the iterator position, JSON) and `config` (JSON). Checkpoints written before this split hold
one `state` item ({step, adapters, opt_state}); both readers still restore them.

Faults (docs/checkpoints.md): a latest checkpoint that does not restore (truncated array
files, a damaged manifest or metadata, a garbage data-iterator state) is moved to
`<workdir>/checkpoints-set-aside/` (renamed, never deleted) with one line naming it, and the
run resumes from the newest step that does restore; when none does, one line says what to
do. A failed save (a full disk) is one line with the path and the space it needed, and
`close` ends in-flight asynchronous saves before the process exits, so an error never ends
in Orbax's executor tracebacks.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from socialalign_jax.core.atomic_io import os_error
from socialalign_jax.core.errors import UserError, one_line
from socialalign_jax.runs.run_config import respell_lists

SET_ASIDE_DIR = "checkpoints-set-aside"


class CheckpointError(UserError):
    """A checkpoint that cannot be written or restored; the message says which and what to do."""


def _enospc(exc: BaseException | None) -> bool:
    err = os_error(exc)
    return err is not None and err.errno == errno.ENOSPC


def _tree_bytes(tree) -> int:
    return int(sum(np.prod(np.shape(x)) * np.dtype(getattr(x, "dtype", np.float32)).itemsize
                   for x in jax.tree.leaves(tree)))


def _save_failed(manager, step: int, exc: BaseException, needed: int | None) -> CheckpointError:
    where = f"{manager.directory}/{step}"
    if _enospc(exc):
        size = f"; a checkpoint needs about {needed / 2**20:.1f} MB" if needed else ""
        return CheckpointError(f"{where}: no space left on device while saving the checkpoint{size}; "
                               "free some space and rerun the same command (it resumes from the last complete step)")
    return CheckpointError(f"{where}: saving the checkpoint failed: {one_line(exc)[:300]}; "
                           "rerun the same command to resume from the last complete step")


def make_manager(workdir: str, *, save_every: int, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    _silence_failed_writes()  # a failed save is reported once, by save() or close(), in one line
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(1, save_every),
        enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_state: Mapping[str, Any] | None,
         config: Mapping[str, Any], *, force: bool = False) -> bool:
    args = ocp.args.Composite(
        adapters=ocp.args.StandardSave(state["adapters"]),
        train_state=ocp.args.StandardSave({k: v for k, v in state.items() if k != "adapters"}),
        data=ocp.args.JsonSave(dict(data_state or {})),
        config=ocp.args.JsonSave(dict(config)),
    )
    if force or manager.should_save(step):
        # Orbax waits for the previous (async) save before it starts this one; waiting here first
        # tells that save's failure, which names its own step, from this one's.
        try:
            manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            previous, needed = getattr(manager, "_socialalign_saving", (step, None))
            raise _save_failed(manager, previous, e, needed) from None
    manager._socialalign_saving = (step, _tree_bytes(state))  # what close() names if this async save fails
    try:
        return manager.save(step, args=args, force=force)
    except Exception as e:  # noqa: BLE001
        raise _save_failed(manager, step, e, _tree_bytes(state)) from None


def close(manager: ocp.CheckpointManager, *, failing: BaseException | bool = False) -> None:
    """Finish (or give up on) in-flight async saves and stop Orbax's threads.

    `failing`: the run is already ending in an error (the exception, or True); a save error is
    then reported in one line on stderr instead of raised, so the original error stays the one
    the user sees, and not at all when both are a full disk (that line already says to free
    space and rerun, and the rerun resumes from the last complete step either way).
    """
    if getattr(manager, "_socialalign_closed", False):
        return
    manager._socialalign_closed = True
    err = None
    try:
        manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
        step, needed = getattr(manager, "_socialalign_saving", None) or (manager.latest_step() or 0, None)
        err = _save_failed(manager, step, e, needed)
    try:
        manager.close()
    except Exception:  # noqa: BLE001 - closing after a failed save may complain again; nothing to add
        pass
    if err is not None:
        if not failing:
            raise err
        if not (isinstance(failing, BaseException) and _enospc(failing) and "no space left" in str(err)):
            print(f"warning: {err}", file=sys.stderr)


def _diff_lora(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            out.append(f"lora.{key}: checkpoint {saved.get(key)!r} vs config {current.get(key)!r}")
    return out


def set_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Move checkpoint `step` out of the manager's directory (kept for inspection, never deleted)."""
    src = os.path.join(str(manager.directory), str(step))
    dest_root = os.path.join(os.path.dirname(str(manager.directory)), SET_ASIDE_DIR)
    os.makedirs(dest_root, exist_ok=True)
    dest = os.path.join(dest_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 0
    while os.path.exists(dest + (f".{n}" if n else "")):
        n += 1
    dest += f".{n}" if n else ""
    shutil.move(src, dest)
    return dest


def _restore_step(manager, step, abstract_state, current_config, check, adapters_only=False):
    meta = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    saved_cfg = meta["config"]
    if not isinstance(saved_cfg, Mapping):
        raise ValueError(f"config item is {type(saved_cfg).__name__}, not a mapping")
    saved_lora = respell_lists(saved_cfg).get("lora", {})  # older checkpoints spell targets 'q,k,...'
    cur_lora = current_config.get("lora", {})
    shape_keys = ("num_analyze", "num_compose", "rank", "targets", "num_classes", "gate_width")
    diffs = _diff_lora({k: saved_lora.get(k) for k in shape_keys}, {k: cur_lora.get(k) for k in shape_keys})
    saved_model = {k: saved_cfg.get("model", {}).get(k) for k in ("preset", "weights")}
    cur_model = {k: current_config.get("model", {}).get(k) for k in ("preset", "weights")}
    if saved_model != cur_model:
        diffs.append(f"model: checkpoint {saved_model} vs config {cur_model}")
    cur_init = current_config.get("model", {}).get("random_init")
    if cur_init and not diffs and saved_cfg.get("model", {}).get("random_init") != cur_init:
        raise UserError(
            f"{manager.directory}/{step}: this run trained its adapters on random base weights "
            f"({cur_model['weights']}) drawn by an older version of the model code; the same seed now draws "
            "other weights, which those adapters do not fit: retrain with a new --workdir "
            "(runs on hf: or gguf: weights are not affected)")
    if diffs:
        raise UserError(
            f"{manager.directory}/{step}: the checkpoint's adapters do not fit this config: " + "; ".join(diffs)
            + " (use a new --workdir, or the checkpoint's settings)")
    if adapters_only:  # inference: the adapters item alone; the optimizer and data items are not read
        if _legacy_layout(manager, step):
            legacy = _legacy_abstract(manager, step, abstract_state)
            state = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(legacy)))["state"]["adapters"]
        else:
            state = manager.restore(step, args=ocp.args.Composite(
                adapters=ocp.args.StandardRestore(abstract_state)))["adapters"]
        return Restored(state, None, saved_cfg, step)
    if _legacy_layout(manager, step):
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        state = restored["state"]
    else:
        restored = manager.restore(step, args=ocp.args.Composite(
            adapters=ocp.args.StandardRestore(abstract_state["adapters"]),
            train_state=ocp.args.StandardRestore({k: v for k, v in abstract_state.items() if k != "adapters"}),
            data=ocp.args.JsonRestore()))
        state = dict(restored["train_state"], adapters=restored["adapters"])
    data = restored["data"]
    if not isinstance(data, Mapping):
        raise ValueError(f"data-iterator state is {type(data).__name__}, not a mapping")
    if check is not None:
        check(state, data)
    return Restored(state, data, saved_cfg, step)


LEGACY_ITEM = "state"


def _legacy_layout(manager, step: int) -> bool:
    """A checkpoint from before the item split: one `state` item, no `adapters` item."""
    d = os.path.join(str(manager.directory), str(step))
    return os.path.isdir(os.path.join(d, LEGACY_ITEM)) and not os.path.isdir(os.path.join(d, "adapters"))


def _legacy_abstract(manager, step: int, abstract_adapters):
    """The abstract tree of a legacy `state` item: the adapters as asked, the rest (step and
    optimizer state, whose shapes an inference reader does not know) read from the item's own
    Orbax metadata, restored on the adapters' first sharding and then dropped."""
    from etils import epath  # Orbax's path type; the manager knows no handler for an item it never saved

    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(manager.directory) / str(step) / LEGACY_ITEM)
    tree = getattr(meta, "tree", meta)
    leaves = jax.tree_util.tree_leaves(abstract_adapters)
    where = leaves[0].sharding if leaves and getattr(leaves[0], "sharding", None) is not None else None

    def as_abstract(m):
        return jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype), sharding=_replicated_like(where))

    rest = {k: jax.tree.map(as_abstract, v) for k, v in dict(tree).items() if k != "adapters"}
    return dict(rest, adapters=abstract_adapters)


def _replicated_like(sharding):
    if sharding is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mesh = getattr(sharding, "mesh", None)
    if mesh is None:
        return sharding
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


class Restored(tuple):
    """(state, data_state, saved_config) as restored, plus `.step`: the checkpoint step it came from."""

    def __new__(cls, state, data, config, step: int):
        out = super().__new__(cls, (state, data, config))
        out.step = int(step)
        return out


def restore(manager: ocp.CheckpointManager, abstract_state, current_config: Mapping[str, Any],
            step: int | None = None, *, check: Callable[[Any, Mapping], None] | None = None,
            fallback: bool = True, move_bad: bool = True, report: Callable[[str], None] | None = None,
            adapters_only: bool = False):
    """Restore (state, data_state, saved_config) at `step` (default: the newest that restores).

    `adapters_only`: `abstract_state` is the abstract adapter tree and the adapters are all
    that is read (state is that tree, data_state None): what inference needs, with no
    optimizer to build and no iterator state to trust.

    The adapter shape (rank, experts, targets, head) must match the current config: a
    mismatch raises a UserError listing what differs, before Orbax sees any array.
    `check(state, data_state)` may raise to reject a step (e.g. an iterator state the data
    pipeline cannot take). Without an explicit `step`, a step that fails to restore is set
    aside (`move_bad`; read-only callers such as export pass False) and the next older one
    is tried; each is reported in one line through `report` (default: stderr).
    """
    report = report or (lambda msg: print(msg, file=sys.stderr))
    _silence_orphaned_reads()  # before any read: a failing one's siblings complete during and after it
    if step is not None or not fallback:
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        try:
            return _restore_step(manager, step, abstract_state, current_config, check, adapters_only)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint: say which, not how Orbax failed inside
            raise CheckpointError(f"{manager.directory}/{step}: checkpoint does not restore "
                                  f"({one_line(e)[:200]}); pick another --step or retrain") from None
    steps = sorted(manager.all_steps(), reverse=True)
    bad: list[tuple[int, str]] = []
    for s in steps:
        try:
            out = _restore_step(manager, s, abstract_state, current_config, check, adapters_only)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001
            bad.append((s, one_line(f"{type(e).__name__}: {e}")[:200]))
            continue
        for b, why in bad:
            where = set_aside(manager, b) if move_bad else None
            moved = f"; moved to {where}" if where else ""
            report(f"warning: checkpoint step {b} in {manager.directory} does not restore ({why}){moved}; "
                   f"using step {s}")
        if bad and move_bad:
            manager.reload()
        return out
    if bad:
        listed = "; ".join(f"step {b}: {why}" for b, why in bad)
        raise CheckpointError(
            f"{manager.directory}: no checkpoint restores ({listed}); to start over, move that directory "
            "aside (or use a new --workdir); nothing was changed")
    return None


def _silence_orphaned_reads() -> None:
    """Drop the "Event loop is closed" noise a failed Orbax restore leaves behind.

    Orbax reads a checkpoint's chunks concurrently through TensorStore inside one asyncio
    loop. When one chunk fails (a truncated file), the restore raises and closes that loop
    while the other reads are still in flight; each of them later completes and tries to
    post its result to the closed loop, and Python prints a traceback per read (hundreds)
    through sys.unraisablehook. The reads' results are discarded either way, so after a
    restore (installed once, before the first) exactly those tracebacks are dropped; any
    other unraisable exception is printed as before.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_socialalign_orphaned_reads", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._socialalign_orphaned_reads = True
    sys.unraisablehook = hook
    # The same orphaned reads, when one of them failed too, reach asyncio's logger instead when
    # they are collected: as a task ("Task exception was never retrieved ... async_deserialize")
    # or as TensorStore's own future ("Future exception was never retrieved ... ValueError(
    # '... tensorstore_spec=...')"), a traceback of a read whose result nobody wanted. Only
    # those records are dropped.
    logging.getLogger("asyncio").addFilter(_orphaned_read_filter)


def _silence_failed_writes() -> None:
    """Drop Orbax's own reports of a failed save; save() or close() reports it once, in one line.

    A save that fails (a full disk) fails in every one of Orbax's writer threads and asyncio
    tasks at once: each thread logs its traceback through absl ("_SignalingThread.run() raised
    an exception", "Save Finalize thread ... failed"), each task that nobody awaits any more is logged by asyncio when collected
    ("Task exception was never retrieved ... write_fragment"), and the coroutines still pending
    at exit print "Exception ignored in" tracebacks: hundreds of lines before and after the one
    that says what happened. The same error reaches the caller through the save's future, so
    exactly these records are dropped; every other log record is kept.
    """
    if getattr(logging.getLogger("absl"), "_socialalign_failed_writes", False):
        return
    logging.getLogger("absl")._socialalign_failed_writes = True
    logging.getLogger("absl").addFilter(_failed_write_filter)
    logging.getLogger("asyncio").addFilter(_failed_write_filter)
    previous = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine collected unfinished
        if code is not None and "orbax" in code.co_filename:
            return
        previous(unraisable)

    sys.unraisablehook = hook


def _failed_write_filter(record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    # Orbax's background threads log the exception that ended them (the writer threads, the
    # commit and finalize threads) with its traceback; the save's future carries the same one.
    exc = record.exc_info[1] if record.exc_info else None
    thread = record.levelno >= logging.ERROR and exc is not None and os_error(exc) is not None
    task = msg.startswith("Task exception was never retrieved") and ("write_fragment" in msg or "serialize" in msg)
    return not (thread or task)


def _orphaned_read_filter(record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    orphaned_task = msg.startswith("Task exception was never retrieved") and "async_deserialize" in msg
    orphaned_read = msg.startswith("Future exception was never retrieved") and "tensorstore_spec=" in msg
    return not (orphaned_task or orphaned_read)


# ----------------------------------------------------------------------------- one trainer per workdir

LOCK_FILE = "train.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), None where unknown.

    A PID alone does not identify a process: after a kill the number is reused (in a
    container the restarted trainer often gets the very same one), so a lock records both.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])  # field 22, counted after "(comm)"
    except (OSError, ValueError, IndexError):
        return None


def _holder_running(pid: int, start: int | None) -> bool:
    if not _pid_alive(pid):
        return False
    now = _process_start(pid)
    return start is None or now is None or now == start


class WorkdirLock:
    """`<workdir>/train.lock` holding {"pid", "pid_start", "host", "started"}: one trainer per workdir.

    A second trainer refuses in one line naming the holder. A lock whose process is gone
    (same host, and that PID not running, or running with another start time: the number
    was reused) is stale and taken over, with one line saying so. A lock from another host cannot be checked from here; the message says to delete the
    file if that run is known to be dead. The lock file is created complete (written to a
    temporary file, then hard-linked into place, which fails if a lock exists).
    """

    def __init__(self, workdir: str):
        import json
        import socket
        import tempfile

        self.path = os.path.join(workdir, LOCK_FILE)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        os.makedirs(workdir, exist_ok=True)
        mine = {"pid": self.pid, "pid_start": _process_start(self.pid), "host": self.host,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".train.lock.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    return
                except FileExistsError:
                    pass
                holder = self._read()
                if holder is None:
                    continue  # removed between our link and our read: try again
                pid, host = holder.get("pid"), holder.get("host")
                if not isinstance(pid, int) or not host:
                    raise CheckpointError(f"{self.path}: unreadable workdir lock; if no trainer runs on {workdir}, "
                                          "delete it and rerun")
                start = holder.get("pid_start") if isinstance(holder.get("pid_start"), int) else None
                if host == self.host and pid != self.pid and not _holder_running(pid, start):
                    os.replace(tmp, self.path)  # take over the stale lock (tmp is consumed)
                    tmp = None
                    print(f"note: {self.path}: took over a stale lock from PID {pid} on {host} (not running)",
                          file=sys.stderr)
                    return
                if host == self.host and pid == self.pid:
                    return
                where = f"PID {pid} on host {host}" + (f", started {holder['started']}" if holder.get("started") else "")
                hint = ("wait for it or stop it" if host == self.host else
                        f"if that run is dead, delete {self.path}")
                raise CheckpointError(f"{workdir}: another trainer holds this workdir ({where}); {hint}, "
                                      "or use another --workdir")
            raise CheckpointError(f"{self.path}: cannot take the workdir lock (it keeps changing)")
        finally:
            if tmp is not None:
                with _suppress():
                    os.unlink(tmp)

    def _read(self) -> dict | None:
        import json

        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as held by an unknown process

    def release(self) -> None:
        holder = self._read()
        if holder and holder.get("pid") == self.pid and holder.get("host") == self.host:
            with _suppress():
                os.unlink(self.path)


def _suppress():
    import contextlib

    return contextlib.suppress(OSError)
