"""Backend choices, made on the host for the devices a program will run on, before it is traced.

Four settings default to 'auto': `ModelConfig.attention` (cuDNN's fused attention or ours),
`ModelConfig.matmul_out` (what a half-precision matmul's dot returns), `LoraConfig.fuse_base`
(PAC-LoRA's [x | u] @ [W0; B] as one matmul) and `SamplingConfig.layer_loop` (the decode layers
as a Python loop or a scan). Where a step is
built for its devices (the train and eval steps, `tools/plan.py`, generation, scoring), the
configs go through `resolve_for_platform` / `resolve_sampling` first, with the platform of the
mesh the step is compiled for: `parallel.mesh.platform_of(mesh)`, which for a TPU slice
described on a CPU host (`launch/plan.py --topology`) is 'tpu'. The configs are static
arguments of `jax.jit`, so the concrete choice is part of the compiled program's cache key, and
traced code never asks where it runs nor catches a backend's refusal.

A config that reaches traced code still saying 'auto' (a direct caller of `decoder.forward`,
the tests, the benchmarks) gets the choice for the default devices (`default_platform`): what
resolving for a program without a mesh gives. A program for a mesh of other devices must be
resolved for them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from socialalign_jax.model.config import ModelConfig, as_dtype
from socialalign_jax.parallel.mesh import platform_of

if TYPE_CHECKING:
    from socialalign_jax.model.pac_lora import LoraConfig

PLATFORMS = ("cpu", "gpu", "tpu")
# What cuDNN's fused attention accepts that can be read off the config (jax's
# fused_attention_stablehlo: check_layout, check_is_flash_attention): float16/bfloat16, and a head
# size that is a multiple of 8 and at most 128 (256 on Hopper and later; 'auto' does not query the
# card, so a 256-wide head there takes 'einsum' unless model.attention names 'cudnn').
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128


def default_platform() -> str:
    """The platform of the default devices (`jax.devices()`), for a program jitted without a mesh."""
    return platform_of(jax.devices())


def _platform(platform: str | None) -> str:
    platform = default_platform() if platform is None else platform
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; expected one of {PLATFORMS}")
    return platform


def cudnn_accepts(cfg: ModelConfig, train_seq_len: int | None = None) -> bool:
    """Whether cuDNN's fused attention takes this model's attention, as far as the host can tell.

    train_seq_len: the sequence length of a training step, when known. cuDNN refuses to
    differentiate masked attention (the mask becomes a bias) over an odd length.
    """
    dh = cfg.head_dim
    if as_dtype(cfg.dtype) not in CUDNN_DTYPES or dh % 8 or dh > CUDNN_MAX_HEAD_DIM:
        return False
    return train_seq_len is None or train_seq_len % 2 == 0


def attention_impl(cfg: ModelConfig, platform: str | None = None, *, train_seq_len: int | None = None) -> str:
    """cfg.attention with 'auto' resolved: 'cudnn' for GPUs where `cudnn_accepts`, else 'einsum'
    (on TPUs XLA's own attention is the same computation as ours). An explicit value is kept:
    'cudnn' where cuDNN refuses fails when the step is traced, with cuDNN's message."""
    if cfg.attention != "auto":
        return cfg.attention
    return "cudnn" if _platform(platform) == "gpu" and cudnn_accepts(cfg, train_seq_len) else "einsum"


def matmul_out(cfg: ModelConfig, platform: str | None = None) -> str:
    """cfg.matmul_out with 'auto' resolved: 'float32' for a bfloat16 model on CPUs (XLA:CPU runs a
    bf16 x bf16 dot about twice as fast when it returns float32 as when it returns bf16, on a CPU
    with AVX512-BF16: benchmarks/gemm_dtype.py), else 'dtype': on GPUs and TPUs (whose bf16 dots
    accumulate in float32 and round in their epilogue already), for float16 (XLA:CPU has no fast
    float16 kernel either way; not measured) and for float32 (the same program either way)."""
    if cfg.matmul_out != "auto":
        return cfg.matmul_out
    cpu_bf16 = _platform(platform) == "cpu" and as_dtype(cfg.dtype) == jnp.bfloat16
    return "float32" if cpu_bf16 else "dtype"


def matmul_out32(cfg: ModelConfig) -> bool:
    """Whether the model's matmuls ask for a float32 result (`layers.matmul`): traced code's reading
    of `matmul_out` (a config resolved for its platform, or 'auto' for the default devices)."""
    return matmul_out(cfg) == "float32"


def fuse_base(lc: LoraConfig, platform: str | None = None) -> str:
    """lc.fuse_base with 'auto' resolved: 'by_size' on CPUs (XLA:CPU does not fuse the add of two
    matmul outputs; fused where the saved delta outweighs the weight copy, `pac_lora._fuse_base`),
    'never' on GPUs and TPUs (they fuse it themselves)."""
    if lc.fuse_base != "auto":
        return lc.fuse_base
    return "by_size" if _platform(platform) == "cpu" else "never"


def layer_loop(scfg: Any, platform: str | None = None) -> str:
    """scfg.layer_loop with 'auto' resolved: 'unrolled' on CPUs (a scan copies every layer's
    weights out of the stack for every generated token), 'scan' on accelerators."""
    if scfg.layer_loop != "auto":
        return scfg.layer_loop
    return "unrolled" if _platform(platform) == "cpu" else "scan"


def resolve_for_platform(model_cfg: ModelConfig, lora_cfg: LoraConfig | None, platform: str | None = None, *,
                         train_seq_len: int | None = None) -> tuple[ModelConfig, LoraConfig | None]:
    """(model_cfg, lora_cfg) with attention, matmul_out and fuse_base concrete for `platform` ('cpu' | 'gpu' |
    'tpu'; None: the default devices). Call it where a step is built, before jit traces it."""
    model_cfg = model_cfg.replace(attention=attention_impl(model_cfg, platform, train_seq_len=train_seq_len),
                                  matmul_out=matmul_out(model_cfg, platform))
    if lora_cfg is not None:
        lora_cfg = dataclasses.replace(lora_cfg, fuse_base=fuse_base(lora_cfg, platform))
    return model_cfg, lora_cfg


def resolve_sampling(scfg, platform: str | None = None):
    """The sampling config with layer_loop concrete for `platform` (None: the default devices)."""
    return dataclasses.replace(scfg, layer_loop=layer_loop(scfg, platform))
