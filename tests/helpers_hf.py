"""Tiny random Hugging Face checkpoints (PyTorch, CPU) written with save_pretrained.

The reference side of the import/parity tests: transformers builds and saves the model, so
names, layouts and tying are whatever HF really does, not what we think it does.
"""

from __future__ import annotations

import torch
import transformers


def tiny_hf_config(family: str, *, vocab: int = 512, tied: bool = False, hidden: int = 64,
                   layers: int = 2, heads: int = 4, kv_heads: int = 2, inter: int = 128):
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=256, tie_word_embeddings=tied)
    if family == "qwen2":
        return transformers.Qwen2Config(rope_theta=1e6, rms_norm_eps=1e-6, **common)
    if family == "llama":
        return transformers.LlamaConfig(rope_theta=10000.0, rms_norm_eps=1e-5, attention_bias=False,
                                        **common)
    raise ValueError(family)


def make_hf_model(family: str, seed: int = 0, **kw):
    """A float32 eval-mode model whose every tensor (norms and biases too) is random, so a
    mix-up of any two tensors or a forgotten transpose changes the logits."""
    torch.manual_seed(seed)
    cfg = tiny_hf_config(family, **kw)
    cls = transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM
    model = cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def save_hf_model(model, path, *, max_shard_size=None, dtype=None):
    """save_pretrained with safetensors; max_shard_size like '40KB' forces a sharded index."""
    if dtype is not None:
        model = model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kw)
    return path


def hf_numpy_state(model) -> dict:
    """The model's tensors as float32 numpy (the layout HF itself uses, PyTorch [out, in])."""
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
