"""Named model shapes. Base and instruct checkpoints of Qwen2.5 share shapes."""

from __future__ import annotations

from socialalign_jax.model.config import ModelConfig

_QWEN_VOCAB = 151936

PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": ModelConfig("qwen2", _QWEN_VOCAB, 896, 4864, 24, 14, 2, 64,
                                rope_theta=1e6, tie_embeddings=True),
    "qwen2.5-1.5b": ModelConfig("qwen2", _QWEN_VOCAB, 1536, 8960, 28, 12, 2, 128,
                                rope_theta=1e6, tie_embeddings=True),
    "qwen2.5-3b": ModelConfig("qwen2", _QWEN_VOCAB, 2048, 11008, 36, 16, 2, 128,
                              rope_theta=1e6, tie_embeddings=True),
    "qwen2.5-7b": ModelConfig("qwen2", 152064, 3584, 18944, 28, 28, 4, 128,
                              rope_theta=1e6, tie_embeddings=False),
    "smollm2-135m": ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, rope_theta=100000.0,
                                rms_norm_eps=1e-5, qkv_bias=False, tie_embeddings=True,
                                max_position_embeddings=8192),
    # Test and quickstart shapes: Qwen2 vocabulary so the real tokenizer applies.
    "tiny-qwen2": ModelConfig("qwen2", _QWEN_VOCAB, 64, 128, 2, 4, 2, 16, rope_theta=1e6,
                              tie_embeddings=True),
    # The embedded quickstart default: small enough to train in minutes on 2 CPU cores.
    "small-qwen2": ModelConfig("qwen2", _QWEN_VOCAB, 128, 384, 2, 4, 2, 32, rope_theta=1e6,
                               tie_embeddings=True),
    "tiny-llama": ModelConfig("llama", 512, 64, 128, 2, 4, 2, 16, rope_theta=10000.0,
                              rms_norm_eps=1e-5, qkv_bias=False, tie_embeddings=False),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg
