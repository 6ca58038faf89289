"""The device mesh: three named axes ('data', 'fsdp', 'tensor'), all of type Auto.

Auto axes let XLA's sharding propagation place intermediates from the shardings of the
inputs plus a few `with_sharding_constraint`s; jax 0.10's make_mesh would otherwise make
them Explicit, which changes the typing rules of every op in the model.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")


def mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1, tensor: int = 1) -> tuple[int, int, int]:
    """Resolve at most one -1 so that data * fsdp * tensor == num_devices, or say why not."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    bad = {k: v for k, v in sizes.items() if v != -1 and (not isinstance(v, int) or v < 1)}
    if bad:
        raise ValueError(f"mesh: axis sizes must be positive integers or -1, got {bad}")
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1 (fill the rest), got {free}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by "
                             f"{' x '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)} = {fixed}")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"mesh: data={data} x fsdp={fsdp} x tensor={tensor} = {fixed} "
                         f"but there are {num_devices} devices")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all global devices).

    Multi-host: call after jax.distributed.initialize(); jax.devices() is then global and
    make_mesh orders devices so that 'tensor' (the innermost axis) stays within a host.
    """
    devs = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(len(devs), data, fsdp, tensor)
    # What jax.make_mesh does, plus allow_split_physical_axes: on a TPU torus (e.g. v5p 4x4x4) a
    # logical axis of 2 or 32 must be allowed to split a physical axis of 4.
    grid = mesh_utils.create_device_mesh(shape, devices=devs, allow_split_physical_axes=True)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def platform_of(mesh_or_devices) -> str:
    """'cpu' | 'gpu' | 'tpu' of a mesh, a sharding or a device list (CUDA/ROCm devices report 'gpu').

    A mesh of TPU devices described on a CPU host (`jax.experimental.topologies`, launch/plan.py)
    is 'tpu': this names where a program compiled for the mesh runs, not this host's backend."""
    if isinstance(mesh_or_devices, Mesh):
        dev = mesh_or_devices.devices.flat[0]
    elif isinstance(mesh_or_devices, jax.sharding.Sharding):
        dev = next(iter(mesh_or_devices.device_set))
    else:
        dev = list(mesh_or_devices)[0]
    plat = str(dev.platform).lower()
    return "gpu" if plat in ("gpu", "cuda", "rocm") else plat
