"""Ahead-of-time memory plan of the training step on a mesh, without weights or devices.

A TPU/GPU user wants to know whether a 7B run fits a slice before paying for it. Everything
here works on `jax.ShapeDtypeStruct`s carrying the shardings the trainer would use
(`sharding.shardings_for`, `sharding.batch_sharding`), so the step compiles for a mesh of fake
CPU devices and XLA's own buffer assignment (`compiled.memory_analysis()`) reports the
per-device argument, output and temporary bytes. The per-tree figures (frozen params,
adapters, optimizer state, batch) are exact: they are the shard shapes of each leaf times
its itemsize, with no compilation involved.

Caveat: XLA:CPU and XLA:TPU schedule differently, so `temp` is an estimate of the
activation/workspace peak on the accelerator, not a guarantee; the tree figures are exact.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from socialalign_jax import model, pac_lora, sharding
from socialalign_jax.config import ModelConfig
from socialalign_jax.pac_lora import LoraConfig
from socialalign_jax.train import step as step_lib

# Batch fields of DESIGN.md "Batch": [B] or [B, S] int32 except the float32 ones.
_BATCH_2D = ("input_ids", "attention_mask", "loss_mask")
_BATCH_1D = ("user_end", "news_end", "prompt_len", "label", "event_id")


def abstract_params(cfg: ModelConfig) -> dict:
    """The base tree as ShapeDtypeStructs (no memory): same shapes/dtypes as model.init_params."""
    return jax.eval_shape(lambda: model.init_params(cfg, jax.random.PRNGKey(0)))


def abstract_state(cfg: ModelConfig, lc: LoraConfig, optimizer) -> dict:
    """The trainable state {'step', 'adapters', 'opt_state'} as ShapeDtypeStructs."""
    def build():
        adapters = pac_lora.init_adapters(jax.random.PRNGKey(0), cfg, lc)
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

    @property
    def peak_estimate(self) -> int:
        """Arguments + outputs not aliased to a donated input + temporaries."""
        return self.argument + self.output - self.alias + self.temp

    def format(self) -> str:
        gib = 1024.0 ** 3
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        rows = [
            ("frozen params", self.params), ("adapters (+ head)", self.adapters),
            ("optimizer state", self.opt_state), ("batch", self.batch_arrays),
        ]
        lines = [f"mesh {mesh} ({math.prod(self.mesh_shape.values())} devices), global batch {self.batch} x {self.seq}",
                 f"  per device, exact from the shardings (params unsharded: {self.params_total / gib:.2f} GiB):"]
        lines += [f"    {name:<20} {val / gib:9.3f} GiB  ({val} B)" for name, val in rows]
        if self.compiled:
            lines += [f"  per device, compiled step memory_analysis (compile {self.compile_seconds:.1f} s):"]
            for name, val in (("arguments", self.argument), ("outputs", self.output),
                              ("aliased (donated)", self.alias), ("temp (activations)", self.temp),
                              ("peak estimate", self.peak_estimate)):
                lines.append(f"    {name:<20} {val / gib:9.3f} GiB  ({val} B)")
        return "\n".join(lines)


def plan_train_step(model_cfg: ModelConfig, lora_cfg: LoraConfig, loss_cfg: step_lib.LossConfig,
                    optimizer, mesh: Mesh, batch: int, seq: int, *, compile_step: bool = True) -> MemoryPlan:
    """Shard abstract params/state/batch like `train.loop` does and (optionally) compile the step."""
    sharding.check_batch_divisible(batch, mesh)
    params = abstract_params(model_cfg)
    state = abstract_state(model_cfg, lora_cfg, optimizer)
    bt = abstract_batch(batch, seq, max(lora_cfg.num_classes, 1))
    param_sh = sharding.shardings_for(params, mesh)
    state_sh = sharding.shardings_for(state, mesh, strict=False)
    bsh = sharding.batch_sharding(mesh)
    batch_sh = jax.tree.map(lambda _: bsh, bt)
    repl = NamedSharding(mesh, P())
    plan = MemoryPlan(
        mesh_shape=dict(mesh.shape), batch=batch, seq=seq,
        params=tree_bytes_per_device(params, param_sh),
        adapters=tree_bytes_per_device(state["adapters"], state_sh["adapters"]),
        opt_state=tree_bytes_per_device(state["opt_state"], state_sh["opt_state"]),
        batch_arrays=tree_bytes_per_device(bt, batch_sh),
        params_total=tree_bytes_total(params))
    if not compile_step:
        return plan
    fn = jax.jit(step_lib.make_train_step(model_cfg, lora_cfg, loss_cfg, optimizer),
                 in_shardings=(param_sh, state_sh, bsh, repl), out_shardings=(state_sh, repl),
                 donate_argnums=(1,))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)
    t0 = time.perf_counter()
    compiled = fn.lower(with_shardings(params, param_sh), with_shardings(state, state_sh),
                        with_shardings(bt, batch_sh), rng).compile()
    plan.compile_seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    plan.argument = int(mem.argument_size_in_bytes)
    plan.output = int(mem.output_size_in_bytes)
    plan.alias = int(mem.alias_size_in_bytes)
    plan.temp = int(mem.temp_size_in_bytes)
    plan.generated_code = int(mem.generated_code_size_in_bytes)
    plan.compiled = True
    return plan


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=4,tensor=1' -> {'data': 2, 'fsdp': 4, 'tensor': 1} (missing axes are 1)."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, val = part.partition("=")
        if not sep or name.strip() not in sizes:
            raise ValueError(f"--mesh: expected data=N,fsdp=N,tensor=N, got {part!r}")
        try:
            n = int(val)
        except ValueError:
            raise ValueError(f"--mesh: axis {name.strip()} needs a positive integer, got {val!r}") from None
        if n < 1:
            raise ValueError(f"--mesh: axis {name.strip()} needs a positive integer, got {n}")
        sizes[name.strip()] = n
    return sizes


__all__ = ["MemoryPlan", "plan_train_step", "abstract_params", "abstract_state", "abstract_batch",
           "tree_bytes_per_device", "leaf_bytes_per_device", "parse_mesh"]
