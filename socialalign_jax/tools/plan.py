"""Ahead-of-time memory plan of the training step (and the decode loop) on a mesh, without weights.

A TPU/GPU user wants to know whether a 7B run fits a slice before paying for it. Everything
here works on `jax.ShapeDtypeStruct`s carrying the shardings the trainer would use
(`model.axes.shardings`, `sharding.batch_sharding`), so a step compiles ahead of time for
a mesh and the compiler's own buffer assignment (`compiled.memory_analysis()`) reports the
per-device argument, output and temporary bytes. The per-tree figures (frozen params,
adapters, optimizer state, batch) are exact: the shard shapes of each leaf times its itemsize.

Two targets:
- fake CPU devices (`--xla_force_host_platform_device_count`): XLA:CPU schedules differently
  from XLA:TPU, so its `temp` is only an estimate of the accelerator's activation peak;
- a named TPU slice (`tpu_slice('v5p-128')`), described on this host by libtpu
  (`jax.experimental.topologies`, as maxtext's train_compile.py does): the real TPU compiler
  compiles the step for that slice, and its figures are what the chips would hold.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from socialalign_jax.model import axes as model_axes, backend, decoder, sampling
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.parallel import sharding
from socialalign_jax.parallel.mesh import platform_of
from socialalign_jax.train import step as step_lib

# Batch fields of DESIGN.md "Batch": [B] or [B, S] int32 except the float32 ones.
_BATCH_2D = ("input_ids", "attention_mask", "loss_mask")
_BATCH_1D = ("user_end", "news_end", "prompt_len", "label", "event_id")


def abstract_params(cfg: ModelConfig) -> dict:
    """The base tree as ShapeDtypeStructs (no memory): same shapes/dtypes as decoder.init_params."""
    return jax.eval_shape(lambda: decoder.init_params(cfg, jax.random.PRNGKey(0)))


def abstract_state(cfg: ModelConfig, lc: LoraConfig, optimizer) -> dict:
    """The trainable state {'step', 'adapters', 'opt_state'} as ShapeDtypeStructs."""
    def build():
        adapters = decoder.init_adapters(jax.random.PRNGKey(0), cfg, lc)
        return step_lib.init_train_state(adapters, optimizer)
    return jax.eval_shape(build)


def abstract_batch(batch: int, seq: int, num_classes: int) -> dict:
    out = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32) for k in _BATCH_2D}
    out.update({k: jax.ShapeDtypeStruct((batch,), jnp.int32) for k in _BATCH_1D})
    out["example_mask"] = jax.ShapeDtypeStruct((batch,), jnp.float32)
    out["target_dist"] = jax.ShapeDtypeStruct((batch, num_classes), jnp.float32)
    return out


def with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def leaf_bytes_per_device(shape, dtype, sh) -> int:
    """Bytes one device holds of an array: the shard shape times the itemsize.

    Shardings from `logical_to_spec` only split evenly divisible dimensions, so every
    device holds a shard of the same shape.
    """
    return int(math.prod(sh.shard_shape(tuple(shape)))) * jnp.dtype(dtype).itemsize


def tree_bytes_per_device(tree, shardings) -> int:
    leaves = jax.tree.leaves(tree)
    shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return sum(leaf_bytes_per_device(x.shape, x.dtype, s) for x, s in zip(leaves, shs))


def tree_bytes_total(tree) -> int:
    return sum(int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class MemoryPlan:
    """Per-device bytes of one training step on `mesh_shape` (all ints are bytes per device)."""
    mesh_shape: dict
    batch: int
    seq: int
    params: int
    adapters: int
    opt_state: int
    batch_arrays: int
    params_total: int  # unsharded, for reference
    argument: int = 0  # compiled: all inputs (params + state + batch + rng)
    output: int = 0
    alias: int = 0  # outputs sharing an input buffer (the donated state)
    temp: int = 0  # compiled: activations and workspace
    generated_code: int = 0
    compile_seconds: float = 0.0
    compiled: bool = False
    step: str = "train step"  # or "decode (generate)"
    kv_cache: int = 0  # decode: the KV cache, exact from its sharding
    device_kind: str = ""  # the compile target, e.g. 'TPU v5 lite' or 'cpu'
    hbm_bytes: int = 0  # per-device memory of the target (0: unknown, e.g. fake CPU devices)
    error: str = ""  # the compiler refused (e.g. RESOURCE_EXHAUSTED: does not fit)
    lowered: Any = dataclasses.field(default=None, repr=False)  # jax Lowered (StableHLO with constraints)
    executable: Any = dataclasses.field(default=None, repr=False)  # jax Compiled (the target's HLO)

    @property
    def peak_estimate(self) -> int:
        """Arguments + outputs not aliased to a donated input + temporaries."""
        return self.argument + self.output - self.alias + self.temp

    @property
    def fits(self) -> bool | None:
        """None when the target's memory is unknown; False when the compiler ran out of memory."""
        if self.error:
            return False
        if not self.hbm_bytes or not self.compiled:
            return None
        return self.peak_estimate <= self.hbm_bytes

    def format(self) -> str:
        gib = 1024.0 ** 3
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        rows = [("frozen params", self.params), ("adapters (+ head)", self.adapters)]
        if self.step == "train step":
            rows.append(("optimizer state", self.opt_state))
        else:
            rows.append(("KV cache", self.kv_cache))
        rows.append(("batch", self.batch_arrays))
        target = f" {self.device_kind}" if self.device_kind else ""
        lines = [f"{self.step}: mesh {mesh} ({math.prod(self.mesh_shape.values())}{target} devices), "
                 f"global batch {self.batch} x {self.seq}",
                 f"  per device, exact from the shardings (params unsharded: {self.params_total / gib:.2f} GiB):"]
        lines += [f"    {name:<20} {val / gib:9.3f} GiB  ({val} B)" for name, val in rows]
        if self.error:
            lines.append(f"  compile FAILED after {self.compile_seconds:.1f} s: {self.error}")
        if self.compiled:
            lines += [f"  per device, compiled {self.step} memory_analysis (compile {self.compile_seconds:.1f} s):"]
            for name, val in (("arguments", self.argument), ("outputs", self.output),
                              ("aliased (donated)", self.alias), ("temp (activations)", self.temp),
                              ("peak estimate", self.peak_estimate)):
                lines.append(f"    {name:<20} {val / gib:9.3f} GiB  ({val} B)")
        if self.hbm_bytes and (self.compiled or self.error):
            verdict = "fits" if self.fits else "does NOT fit"
            pct = f" ({100.0 * self.peak_estimate / self.hbm_bytes:.0f}% of HBM)" if self.compiled else ""
            lines.append(f"  {verdict}: peak {self.peak_estimate / gib:.2f} GiB of {self.hbm_bytes / gib:.1f} GiB HBM "
                         f"per {self.device_kind} chip{pct}")
        return "\n".join(lines)


def plan_train_step(model_cfg: ModelConfig, lora_cfg: LoraConfig, loss_cfg: step_lib.LossConfig,
                    optimizer, mesh: Mesh, batch: int, seq: int, *, compile_step: bool = True,
                    rules=None) -> MemoryPlan:
    """Shard abstract params/state/batch like `train.loop` does and (optionally) compile the step."""
    sharding.check_batch_divisible(batch, mesh, rules)
    params = abstract_params(model_cfg)
    state = abstract_state(model_cfg, lora_cfg, optimizer)
    bt = abstract_batch(batch, seq, max(lora_cfg.num_classes, 1))
    param_sh = model_axes.shardings(params, mesh, rules)
    state_sh = model_axes.shardings(state, mesh, rules, strict=False)
    bsh = sharding.batch_sharding(mesh, rules)
    batch_sh = jax.tree.map(lambda _: bsh, bt)
    repl = NamedSharding(mesh, P())
    plan = MemoryPlan(
        mesh_shape=dict(mesh.shape), batch=batch, seq=seq,
        params=tree_bytes_per_device(params, param_sh),
        adapters=tree_bytes_per_device(state["adapters"], state_sh["adapters"]),
        opt_state=tree_bytes_per_device(state["opt_state"], state_sh["opt_state"]),
        batch_arrays=tree_bytes_per_device(bt, batch_sh),
        params_total=tree_bytes_total(params))
    _describe_target(plan, mesh)
    if not compile_step:
        return plan
    # Backend choices (attention, fused base matmul) resolved for the target devices, not this
    # host's backend; traced under the mesh's axis rules, so the activation constraints apply.
    step = step_lib.make_train_step(*backend.resolve_for_platform(model_cfg, lora_cfg, platform_of(mesh),
                                                                  train_seq_len=seq), loss_cfg, optimizer)
    fn = jax.jit(sharding.under_mesh(step, mesh, rules),
                 in_shardings=(param_sh, state_sh, bsh, repl), out_shardings=(state_sh, repl),
                 donate_argnums=(1,))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)
    lowered = fn.lower(with_shardings(params, param_sh), with_shardings(state, state_sh),
                       with_shardings(bt, batch_sh), rng)
    _compile_into(plan, lowered)
    return plan


def _describe_target(plan: MemoryPlan, mesh: Mesh) -> None:
    dev = mesh.devices.flat[0]
    plan.device_kind = str(dev.device_kind)
    if platform_of(mesh) == "tpu":
        plan.hbm_bytes = tpu_hbm_bytes(plan.device_kind)


def _compile_into(plan: MemoryPlan, lowered) -> Any:
    """Compile, timing it; a compiler out-of-memory becomes plan.error (it does not fit)."""
    plan.lowered = lowered
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as exc:  # noqa: BLE001 - the TPU compiler reports OOM as XlaRuntimeError
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        plan.compile_seconds = time.perf_counter() - t0
        plan.error = msg[:300]
        return None
    plan.compile_seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    plan.argument = int(mem.argument_size_in_bytes)
    plan.output = int(mem.output_size_in_bytes)
    plan.alias = int(mem.alias_size_in_bytes)
    plan.temp = int(mem.temp_size_in_bytes)
    plan.generated_code = int(mem.generated_code_size_in_bytes)
    plan.compiled = True
    plan.executable = compiled
    return compiled


def plan_decode(model_cfg: ModelConfig, lora_cfg: LoraConfig | None, mesh: Mesh, batch: int, prompt_len: int,
                max_new_tokens: int, *, compile_step: bool = True, rules=None) -> MemoryPlan:
    """Plan of `sampling.generate` (prefill + the whole greedy decode loop, one program) on `mesh`.

    lora_cfg None: the base model (no adapters). The KV cache is generate's (one sample per
    prompt): the prompts' prompt_len slots as the shared block of a branched cache, each row's
    max_new_tokens slots beside it (`decoder.branch_cache`); its per-device bytes are exact from
    its sharding.
    """
    sharding.check_batch_divisible(batch, mesh, rules)
    params = abstract_params(model_cfg)
    param_sh = model_axes.shardings(params, mesh, rules)
    adapters = ad_sh = None
    if lora_cfg is not None:
        adapters = jax.eval_shape(lambda: decoder.init_adapters(jax.random.PRNGKey(0), model_cfg, lora_cfg))
        ad_sh = model_axes.shardings(adapters, mesh, rules, strict=False)
    shared = (batch, prompt_len)
    cache = jax.eval_shape(lambda: decoder.init_cache(model_cfg, batch, max_new_tokens, lora_cfg, shared=shared))
    cache_sh = sharding.shardings_for(cache, decoder.cache_axes(model_cfg, batch, max_new_tokens, lora_cfg, shared),
                                      mesh, rules)
    bsh = sharding.batch_sharding(mesh, rules)
    repl = NamedSharding(mesh, P())
    prompt = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=bsh)
    spans = (jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=bsh),) * 2
    plan = MemoryPlan(
        mesh_shape=dict(mesh.shape), batch=batch, seq=prompt_len + max_new_tokens, step="decode (generate)",
        params=tree_bytes_per_device(params, param_sh),
        adapters=0 if adapters is None else tree_bytes_per_device(adapters, ad_sh),
        opt_state=0, kv_cache=tree_bytes_per_device(cache, cache_sh),
        batch_arrays=2 * leaf_bytes_per_device((batch, prompt_len), jnp.int32, bsh),
        params_total=tree_bytes_total(params))
    _describe_target(plan, mesh)
    if not compile_step:
        return plan
    platform = platform_of(mesh)
    scfg = backend.resolve_sampling(sampling.SamplingConfig(greedy=True, max_new_tokens=max_new_tokens), platform)
    model_cfg, lora_cfg = backend.resolve_for_platform(model_cfg, lora_cfg, platform)
    # A jax.jit of its own around generate's function, traced under the mesh's rules: the jitted
    # `sampling.generate` may hold a trace for this mesh made under other rules (Flax's rules are
    # not part of jit's cache key; the mesh is).
    fn = jax.jit(sharding.under_mesh(sampling.generate.__wrapped__, mesh, rules),
                 static_argnames=("cfg", "lora_cfg", "scfg", "samples"))
    lowered = fn.lower(
        with_shardings(params, param_sh), None if adapters is None else with_shardings(adapters, ad_sh),
        prompt, prompt, model_cfg, lora_cfg, scfg, spans, jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl))
    _compile_into(plan, lowered)
    return plan


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=4,tensor=1' -> {'data': 2, 'fsdp': 4, 'tensor': 1} (missing axes are 1;
    one axis may be -1: whatever the device count leaves)."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, val = part.partition("=")
        if not sep or name.strip() not in sizes:
            raise ValueError(f"--mesh: expected data=N,fsdp=N,tensor=N, got {part!r}")
        try:
            n = int(val)
        except ValueError:
            raise ValueError(f"--mesh: axis {name.strip()} needs a positive integer, got {val!r}") from None
        if n < 1 and n != -1:
            raise ValueError(f"--mesh: axis {name.strip()} needs a positive integer (or -1), got {n}")
        sizes[name.strip()] = n
    return sizes


# ------------------------------------------------------------------ TPU slices described on this host

# HBM per chip by the device_kind the TPU compiler reports (Cloud TPU documentation: v4 32 GiB,
# v5e 16 GiB, v5p 95 GiB, v6e 32 GiB). v4 and v5p chips are megacore: one JAX device per chip.
TPU_HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32, "TPU v6e": 32}

# Chip grids of the slice sizes Cloud TPU sells (2-D torus for v5e/v6e, 3-D for v4/v5p).
_GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_GRID_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
            256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
# name prefix -> (topology prefix, chip config, TensorCores per chip counted in the name, grids,
#                 accelerator type as a TPU VM reports it)
_GENERATIONS = {
    "v5e": ("v5e", "default", 1, _GRID_2D, "v5litepod"), "v5litepod": ("v5e", "default", 1, _GRID_2D, "v5litepod"),
    "v6e": ("v6e", "default", 1, _GRID_2D, "v6e"),
    "v4": ("v4", "megacore", 2, _GRID_3D, "v4"), "v5p": ("v5", "megacore", 2, _GRID_3D, "v5p"),
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A Cloud TPU slice by its user-facing name (v5e-8, v5p-128, ...) as libtpu describes it."""
    name: str
    topology: str  # e.g. 'v5e:2x4', 'v5:4x4x4'
    chip_config: str  # 'default' | 'megacore'
    chips: int
    wrap: tuple[bool, ...]  # torus wrap-around links per grid axis
    accelerator_type: str  # e.g. 'v5litepod-8'


def tpu_slice(name: str) -> TpuSlice:
    """'v5e-8' | 'v5p-128' | 'v4-32' | 'v6e-64' -> TpuSlice; ValueError naming the known sizes."""
    gen, sep, count = name.strip().lower().rpartition("-")
    if not sep or gen not in _GENERATIONS or not count.isdigit():
        raise ValueError(f"--topology {name!r}: expected <generation>-<size> with generation one of "
                         f"{', '.join(sorted(_GENERATIONS))}, e.g. v5e-8, v5p-128, v4-32, v6e-64")
    prefix, chip_config, cores, grids, acc = _GENERATIONS[gen]
    n = int(count)
    chips = n // cores
    if n % cores or chips not in grids:
        sizes = ", ".join(f"{gen}-{c * cores}" for c in sorted(grids))
        raise ValueError(f"--topology {name!r}: no such slice; known sizes: {sizes}")
    grid = grids[chips]
    if len(grid) == 2:  # v5e/v6e: a 16-chip axis closes into a ring (v5e-128: 8x16, v5e-256: 16x16)
        wrap = tuple(d == 16 for d in grid) + (False,)
    else:  # v4/v5p: full cubes of >= 4 chips per side are tori
        wrap = (min(grid) >= 4,) * 3
    return TpuSlice(name, f"{prefix}:{'x'.join(map(str, grid))}", chip_config, chips, wrap, f"{acc}-{n}")


def tpu_hbm_bytes(device_kind: str) -> int:
    gib = TPU_HBM_GIB.get(device_kind)
    return 0 if gib is None else int(gib * 1024 ** 3)


class LibtpuMissing(RuntimeError):
    """Raised when a TPU slice is asked for without libtpu installed."""


LIBTPU_HINT = 'TPU planning needs libtpu (matching jax): pip install -e ".[tpu]"'


def quiet_libtpu_env(sl: TpuSlice | None = None) -> None:
    """Environment for describing a TPU slice on a host that is not a TPU VM.

    On start libtpu looks for the TPU VM it runs on: it queries the GCE metadata server (which
    hangs, then fails, off Google Cloud) and reads TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES,
    warning that it "could not determine" them. Compiling for a described slice needs none of
    that, so we skip the metadata query and declare one local worker. ALLOW_MULTIPLE_LIBTPU_LOAD:
    another process on this host may hold libtpu's lockfile; we never open a TPU, so sharing is
    safe. Existing values are kept (a real TPU VM sets its own).
    """
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", sl.accelerator_type if sl else "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def tpu_devices(sl: TpuSlice) -> list:
    """The slice's devices as libtpu describes them (compile targets; nothing runs on them)."""
    if not libtpu_available():
        raise LibtpuMissing(LIBTPU_HINT)
    quiet_libtpu_env(sl)
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="tpu", topology_name=sl.topology, chip_config_name=sl.chip_config,
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=sl.wrap)
    return list(desc.devices)


def sweep_layouts(n: int, num_heads: int) -> list[tuple[int, int, int]]:
    """(data, fsdp, tensor) layouts worth trying on n devices: pure FSDP, FSDP with tensor 2/4/8
    (while the heads divide), and FSDP with 2-way data parallelism."""
    out = [(1, n, 1)]
    out += [(1, n // t, t) for t in (2, 4, 8) if n % t == 0 and n > t and num_heads % t == 0]
    if n % 2 == 0 and n > 2:
        out.append((2, n // 2, 1))
    return out


def sweep(plan_fn, layouts: Sequence[tuple[int, int, int]], make_mesh_fn, max_per_device: int = 64,
          log=print) -> list[dict]:
    """Per layout, the largest global batch that fits: per-shard batch 1, 2, 4, ... until the
    compiler says no (or `max_per_device`). plan_fn(mesh, batch) -> MemoryPlan."""
    rows = []
    for layout in layouts:
        mesh = make_mesh_fn(*layout)
        shards = layout[0] * layout[1]
        best, per = None, 1
        while per <= max_per_device:
            p = plan_fn(mesh, per * shards)
            log(p.format())
            if not p.fits:
                break
            best, per = p, per * 2
        rows.append({"layout": dict(zip(("data", "fsdp", "tensor"), layout)),
                     "max_batch": best.batch if best else 0,
                     "peak_gib": round(best.peak_estimate / 1024 ** 3, 2) if best else None})
    return rows


__all__ = ["MemoryPlan", "plan_train_step", "plan_decode", "tpu_slice", "tpu_devices", "TpuSlice", "sweep",
           "sweep_layouts", "LibtpuMissing", "LIBTPU_HINT", "quiet_libtpu_env", "libtpu_available",
           "tpu_hbm_bytes", "TPU_HBM_GIB", "abstract_params", "abstract_state", "abstract_batch",
           "tree_bytes_per_device", "leaf_bytes_per_device", "parse_mesh"]
