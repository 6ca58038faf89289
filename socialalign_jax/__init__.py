"""SocialAlign in JAX: PAC-LoRA on Qwen2/Llama decoders for dual-level public response prediction."""

__version__ = "0.1.0"
