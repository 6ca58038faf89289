"""PAC-LoRA as the original PEFT-style implementation computes it (the benchmarks' baseline).

Deliberately NOT our two-matmul form: experts are stacked, every compose expert's output is
materialised as [b, s, E, d_out] by an einsum and then mixed by the gate, and the gates read
the full hidden state multiplied by a 0/1 segment mask (news for gate_a, user for gate_b).
Segment ids come from a shared `Routing` holder set before each forward, as the original's
module reads them from the model's input.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

USER, NEWS = 0, 1
TARGET_PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


class Routing:
    """Holds the segment ids [b, s] of the current batch for every adapted module."""
    seg: torch.Tensor | None = None


class PacLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, routing: Routing, ea=3, eb=3, r=8, alpha=16.0, dropout=0.1, g=32):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        d_in, d_out = base.in_features, base.out_features
        self.routing, self.scale = routing, alpha / r
        self.A = nn.Parameter(torch.empty(ea, r, d_in).uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in)))
        self.B = nn.Parameter(torch.zeros(eb, d_out, r))
        self.gate_a = nn.Sequential(nn.Linear(d_in, g, bias=False), nn.GELU(), nn.Linear(g, ea, bias=False))
        self.gate_b = nn.Sequential(nn.Linear(d_in, g, bias=False), nn.GELU(), nn.Linear(g, eb, bias=False))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):  # x [b, s, d_in]
        y = self.base(x)
        xd = self.drop(x)
        seg = self.routing.seg
        ga = torch.softmax(self.gate_a(xd * (seg == NEWS).unsqueeze(-1).to(xd.dtype)).float(), -1).to(xd.dtype)
        gb = torch.softmax(self.gate_b(xd * (seg == USER).unsqueeze(-1).to(xd.dtype)).float(), -1).to(xd.dtype)
        z = torch.einsum("bsd,erd->bser", xd, self.A)  # every analyze expert
        h = torch.einsum("bser,bse->bsr", z, ga)
        out = torch.einsum("bsr,eor->bseo", h, self.B)  # [b, s, E, d_out]: every compose expert
        return y + torch.einsum("bseo,bse->bso", out, gb) * self.scale

    def load_from_jax(self, ad: dict, layer: int | None = None):
        """Copy one module's adapter from our tree (kernels [d_in, d_out]) into PyTorch layout."""
        def pick(a):
            a = np.asarray(a, np.float32)
            return a[layer] if layer is not None else a
        with torch.no_grad():
            self.A.copy_(torch.from_numpy(pick(ad["A"]).transpose(0, 2, 1).copy()))  # [E, d_in, r] -> [E, r, d_in]
            self.B.copy_(torch.from_numpy(pick(ad["B"]).transpose(0, 2, 1).copy()))  # [E, r, d_out] -> [E, d_out, r]
            for gname, seq in (("gate_a", self.gate_a), ("gate_b", self.gate_b)):
                seq[0].weight.copy_(torch.from_numpy(pick(ad[gname]["w1"]).T.copy()))
                seq[2].weight.copy_(torch.from_numpy(pick(ad[gname]["w2"]).T.copy()))


def inject(model, routing: Routing, targets=tuple(TARGET_PATHS), **kw) -> list[PacLoraLinear]:
    """Replace the target projections of every decoder layer of an HF Qwen2/Llama model."""
    for p in model.parameters():
        p.requires_grad_(False)
    made = []
    for layer in model.model.layers:
        for t in targets:
            parent_name, attr = TARGET_PATHS[t].split(".")
            parent = getattr(layer, parent_name)
            mod = PacLoraLinear(getattr(parent, attr), routing, **kw)
            setattr(parent, attr, mod)
            made.append(mod)
    return made


def load_adapters(model, adapters: dict, targets=tuple(TARGET_PATHS)) -> None:
    blocks = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}
    for i, layer in enumerate(model.model.layers):
        for t in targets:
            parent_name, attr = TARGET_PATHS[t].split(".")
            getattr(getattr(layer, parent_name), attr).load_from_jax(adapters["layers"][blocks[t]][t], i)


def segment_ids(positions: torch.Tensor, user_end: torch.Tensor, news_end: torch.Tensor) -> torch.Tensor:
    return torch.where(positions < user_end[:, None], USER,
                       torch.where(positions < news_end[:, None], NEWS, 2))
