"""Static model configuration.

A frozen dataclass so it can be a static argument of `jax.jit` (hashable) and so the
same object describes a Hugging Face checkpoint, a GGUF file or a random test model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from socialalign_jax.core.dtypes import DTYPE_NAMES

_DTYPES = {name: getattr(jnp, name) for name in DTYPE_NAMES}  # DTYPE_NAMES: the names a config may give


def as_dtype(name_or_dtype: Any):
    """Accept 'bfloat16' or jnp.bfloat16 alike (configs hold strings)."""
    if isinstance(name_or_dtype, str):
        if name_or_dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {name_or_dtype!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[name_or_dtype]
    return jnp.dtype(name_or_dtype).type


ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")
MATMUL_OUTS = ("auto", "float32", "dtype")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # 'qwen2' | 'llama'
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False  # rematerialise each layer in the backward pass (saves activation memory)
    # what a rematerialised layer keeps from its forward (modules.REMAT_POLICIES)
    remat_policy: str = "nothing_saveable"
    # False: the layers run as a Python loop: compile time grows with depth, but XLA:CPU no
    # longer copies each layer's weights and saved activations in and out of stacks.
    scan_layers: bool = True
    # How attention is computed (`layers.attention`): 'einsum' (our path: float32 scores, masked
    # by a select), 'xla' / 'cudnn' (jax.nn.dot_product_attention with that implementation),
    # or 'auto': resolved on the host for the step's devices before tracing
    # (`backend.resolve_for_platform`): cuDNN's fused attention for GPUs in bfloat16/float16 with
    # a head size cuDNN takes, else 'einsum'.
    attention: str = "auto"
    # What the linear maps of a half-precision (bfloat16/float16) model ask their dots to return:
    # 'float32' (rounded once to the compute dtype after: `layers.matmul`), 'dtype' (the compute
    # dtype), or 'auto': resolved on the host (`backend.matmul_out`): 'float32' for bfloat16 on CPUs,
    # where XLA:CPU runs bf16 x bf16 -> f32 ~2x faster than float32 on a CPU with AVX512-BF16 but
    # computes a bf16 -> bf16 dot in float32 after converting its operands (benchmarks/gemm_dtype.py),
    # else 'dtype'. The products accumulate in float32 either way; a float32 model is unaffected.
    matmul_out: str = "auto"

    def __post_init__(self):
        if self.family not in ("qwen2", "llama"):
            raise ValueError(f"unknown model family {self.family!r}; expected 'qwen2' or 'llama'")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        as_dtype(self.param_dtype)
        as_dtype(self.dtype)
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention {self.attention!r}; expected one of {ATTENTION_IMPLS}")
        if self.matmul_out not in MATMUL_OUTS:
            raise ValueError(f"unknown matmul_out {self.matmul_out!r}; expected one of {MATMUL_OUTS}")
        policies = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")
        if self.remat_policy not in policies:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; expected one of {policies}")

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def module_dims(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(d_in, d_out) of every adaptable linear map, keyed by (block, name)."""
        d, f = self.hidden_size, self.intermediate_size
        return {
            ("attn", "q"): (d, self.q_dim),
            ("attn", "k"): (d, self.kv_dim),
            ("attn", "v"): (d, self.kv_dim),
            ("attn", "o"): (self.q_dim, d),
            ("mlp", "gate"): (d, f),
            ("mlp", "up"): (d, f),
            ("mlp", "down"): (f, d),
        }

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict (Qwen2ForCausalLM or LlamaForCausalLM)."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type", "")
        if model_type == "qwen2" or "Qwen2ForCausalLM" in archs:
            family = "qwen2"
        elif model_type == "llama" or "LlamaForCausalLM" in archs:
            family = "llama"
        else:
            raise ValueError(
                f"unsupported architecture (model_type={model_type!r}, architectures={archs}); "
                "supported: Qwen2ForCausalLM (qwen2), LlamaForCausalLM (llama)")
        rope = hf.get("rope_parameters") or {}  # transformers >= 5 nests RoPE settings here
        scaling = hf.get("rope_scaling") or ({"rope_type": rope["rope_type"]} if rope.get("rope_type") else None)
        if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
            raise ValueError(f"rope_scaling {scaling} is not supported (only default RoPE)")
        heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        kw = dict(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=bool(hf.get("attention_bias", family == "qwen2")) if family == "llama" else True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        )
        kw.update(overrides)
        return cls(**kw)
