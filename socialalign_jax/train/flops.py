"""Analytic FLOP count of one training step, for MFU.

The base model is frozen: its matmuls cost a forward (2 N T) plus the input-gradient half of
the backward (2 N T), not the usual 6 N T. Adapters are trained: 6 x their matmul FLOPs.
Attention scores and values are counted like the base (forward + input gradients).
"""

from __future__ import annotations

from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig, MODULE_BLOCK


def base_matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token (embedding lookup excluded, LM head included)."""
    per_layer = sum(din * dout for din, dout in cfg.module_dims().values())
    return cfg.num_layers * per_layer


def adapter_matmul_flops_per_token(cfg: ModelConfig, lc: LoraConfig | None) -> int:
    if lc is None:
        return 0
    dims = cfg.module_dims()
    total = 0
    for name in lc.targets:
        din, dout = dims[(MODULE_BLOCK[name], name)]
        ea, eb, r, g = lc.num_analyze, lc.num_compose, lc.rank, lc.gate_width
        total += 2 * (din * ea * r + eb * r * dout + r * ea + eb * r)  # x A_cat, gated sums, u B_cat
        total += 2 * (din * g + g * ea) + 2 * (din * g + g * eb)  # two gates
    return cfg.num_layers * total


def train_step_flops(cfg: ModelConfig, lc: LoraConfig | None, batch: int, seq: int,
                     logit_positions: int | None = None, num_classes: int = 3) -> float:
    """FLOPs of forward + backward for a [batch, seq] step with a frozen base.

    logit_positions: positions per row at which LM logits are computed (the response tokens
    when the step gathers them; seq when it computes all).
    """
    tokens = batch * seq
    lp = seq if logit_positions is None else logit_positions
    base = 4.0 * base_matmul_params(cfg) * tokens
    # attention: QK^T and PV, 2 * 2 * S * S * Hq * Dh per sequence per layer (causal half not skipped)
    attn = 4.0 * 2.0 * batch * seq * seq * cfg.q_dim * cfg.num_layers
    head = 4.0 * cfg.hidden_size * cfg.vocab_size * batch * lp
    adapters = 3.0 * adapter_matmul_flops_per_token(cfg, lc) * tokens
    sentiment = 6.0 * cfg.hidden_size * num_classes * batch
    return base + attn + head + adapters + sentiment


# Dense bf16 peak per device (FLOP/s), for MFU when the config does not give one.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
}


def peak_flops_for(device_kind: str) -> float | None:
    for key, val in PEAK_FLOPS.items():
        if device_kind.startswith(key):
            return val
    return None
