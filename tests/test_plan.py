"""The memory planner on a tiny config and 8 fake CPU devices.

Reference: per-device bytes computed by hand from DESIGN.md's layout and sharding.py's rules
(embed -> fsdp; heads, kv_heads, mlp, vocab -> tensor; norms replicated), and XLA's own
argument size of the compiled step (which must equal the sum of everything passed in).
"""

import os
import subprocess
import sys

import jax
import optax
import pytest

from socialalign_jax import plan as plan_lib
from socialalign_jax.config import ModelConfig
from socialalign_jax.mesh import make_mesh
from socialalign_jax.pac_lora import LoraConfig
from socialalign_jax.train.step import LossConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig("qwen2", 256, 32, 64, 2, 4, 2, 8, tie_embeddings=False)  # D 32, F 64, Q 32, KV 16, V 256


def hand_param_bytes(f: int, t: int, itemsize: int = 4) -> int:
    L, D, F, V = 2, 32, 64, 256
    Q, KV = 4 * 8, 2 * 8
    elems = (V * D // (t * f)  # embedding [vocab, embed]
             + D * V // (f * t)  # lm_head [embed, vocab]
             + D + 2 * L * D  # final_norm, input_norm, post_attn_norm: replicated
             + L * D * Q // (f * t) + L * Q // t  # q kernel [embed, heads], bias [heads]
             + 2 * (L * D * KV // (f * t) + L * KV // t)  # k, v
             + L * Q * D // (t * f)  # o [heads, embed]
             + 3 * L * D * F // (f * t))  # gate, up [embed, mlp]; down [mlp, embed]
    return elems * itemsize


@pytest.mark.parametrize("data,fsdp,tensor", [(2, 2, 2), (1, 8, 1), (2, 1, 4)])
def test_param_bytes_match_hand_computation(data, fsdp, tensor):
    mesh = make_mesh(data, fsdp, tensor)
    p = plan_lib.plan_train_step(CFG, LoraConfig(), LossConfig(max_response_tokens=4),
                                 optax.adamw(1e-3), mesh, batch=8, seq=8, compile_step=False)
    assert p.params == hand_param_bytes(fsdp, tensor)
    assert p.params_total == hand_param_bytes(1, 1)
    # int32/float32 batch fields: 3 x [B, S] + 5 x [B] + example_mask [B] + target_dist [B, 3], rows split data*fsdp
    assert p.batch_arrays == 4 * (3 * 8 * 8 + 6 * 8 + 8 * 3) // (data * fsdp)


def test_bf16_params_halve():
    mesh = make_mesh(1, 8, 1)
    cfg = CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
    p = plan_lib.plan_train_step(cfg, LoraConfig(), LossConfig(max_response_tokens=4), optax.adamw(1e-3),
                                 mesh, batch=8, seq=8, compile_step=False)
    assert p.params == hand_param_bytes(8, 1, itemsize=2)


def test_compiled_arguments_are_the_sum_of_the_trees():
    mesh = make_mesh(2, 2, 2)
    lc = LoraConfig(targets=("q", "down"))
    p = plan_lib.plan_train_step(CFG, lc, LossConfig(max_response_tokens=4), optax.adamw(1e-3), mesh,
                                 batch=8, seq=8)
    assert p.compiled
    # inputs: params, adapters, optimizer state, step counter (int32), batch, rng key (2 x uint32)
    assert p.argument == p.params + p.adapters + p.opt_state + 4 + p.batch_arrays + 8
    # the donated state comes back in place: outputs alias exactly the state's bytes
    assert p.alias == p.adapters + p.opt_state + 4
    assert p.temp > 0
    assert "frozen params" in p.format() and "temp (activations)" in p.format()


def test_parse_mesh():
    assert plan_lib.parse_mesh("data=2,tensor=4") == {"data": 2, "fsdp": 1, "tensor": 4}
    for bad in ("foo=2", "data=0", "data=x", "fsdp"):
        with pytest.raises(ValueError, match="--mesh"):
            plan_lib.parse_mesh(bad)


def test_cli_bad_mesh_is_one_line():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "plan.py"), "--mesh", "data=two"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "data" in r.stderr and "Traceback" not in r.stderr
