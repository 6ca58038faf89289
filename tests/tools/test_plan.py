"""The memory planner on a tiny config and 8 fake CPU devices.

Reference: per-device bytes computed by hand from DESIGN.md's layout and parallel/sharding.py's rules
(embed -> fsdp; heads, kv_heads, mlp, vocab -> tensor; norms replicated), and XLA's own
argument size of the compiled step (which must equal the sum of everything passed in).
"""

import dataclasses
import os
import subprocess
import sys

import optax
import pytest

from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.tools import plan as plan_lib
from socialalign_jax.parallel.mesh import make_mesh
from socialalign_jax.train.step import LossConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


@pytest.mark.parametrize("name,topology,chips,wrap,chip_config", [
    ("v5e-8", "v5e:2x4", 8, (False, False, False), "default"),
    ("v5e-256", "v5e:16x16", 256, (True, True, False), "default"),
    ("v4-32", "v4:2x2x4", 16, (False, False, False), "megacore"),  # v4/v5p names count TensorCores, 2 per chip
    ("v5p-128", "v5:4x4x4", 64, (True, True, True), "megacore"),
    ("v6e-64", "v6e:8x8", 64, (False, False, False), "default"),
])
def test_tpu_slice_names(name, topology, chips, wrap, chip_config):
    sl = plan_lib.tpu_slice(name)
    assert (sl.topology, sl.chips, sl.wrap, sl.chip_config) == (topology, chips, wrap, chip_config)


@pytest.mark.parametrize("bad", ["v5e-7", "v9-8", "v5p", "v5p-3", "tpu"])
def test_tpu_slice_bad_names(bad):
    with pytest.raises(ValueError, match="--topology"):
        plan_lib.tpu_slice(bad)


def test_hbm_table_and_fit_verdict():
    gib = 1024 ** 3
    assert plan_lib.tpu_hbm_bytes("TPU v5 lite") == 16 * gib and plan_lib.tpu_hbm_bytes("TPU v5") == 95 * gib
    assert plan_lib.tpu_hbm_bytes("TPU v4") == 32 * gib and plan_lib.tpu_hbm_bytes("cpu") == 0
    p = plan_lib.MemoryPlan({"fsdp": 4}, 8, 16, 0, 0, 0, 0, 0, argument=10 * gib, output=gib, alias=gib,
                            temp=6 * gib + 1, compiled=True, device_kind="TPU v5 lite", hbm_bytes=16 * gib)
    assert p.peak_estimate == 16 * gib + 1 and p.fits is False and "does NOT fit" in p.format()
    assert dataclasses.replace(p, temp=6 * gib).fits is True
    assert dataclasses.replace(p, hbm_bytes=0).fits is None  # fake CPU devices: no verdict
    oom = dataclasses.replace(p, compiled=False, error="RESOURCE_EXHAUSTED: Ran out of memory")
    assert oom.fits is False and "compile FAILED" in oom.format()


def test_sweep_stops_at_the_first_batch_that_does_not_fit():
    calls = []

    def fake_plan(mesh, batch):  # fits up to 4 rows per shard
        calls.append((mesh, batch))
        shards = mesh[0] * mesh[1]
        return plan_lib.MemoryPlan({}, batch, 8, 0, 0, 0, 0, 0, temp=batch // shards, compiled=True,
                                   hbm_bytes=4)
    rows = plan_lib.sweep(fake_plan, [(1, 4, 1), (2, 1, 1)], lambda *l: l, log=lambda _: None)
    assert [r["max_batch"] for r in rows] == [16, 8]
    assert [b for m, b in calls if m == (1, 4, 1)] == [4, 8, 16, 32]
    assert plan_lib.sweep_layouts(8, 28) == [(1, 8, 1), (1, 4, 2), (1, 2, 4), (2, 4, 1)]


def test_cli_topology_without_libtpu_is_one_line(monkeypatch, capsys):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import plan as plan_cli

    monkeypatch.setattr(plan_lib, "libtpu_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        plan_cli.main(["--config", os.path.join(ROOT, "configs", "weibo.py:7b"), "--topology", "v5e-8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install -e ".[tpu]"' in err


@pytest.mark.parametrize("flag", ["--seq=-5", "--batch=-1", "--max_new_tokens=0"])
def test_cli_bad_size_is_one_line(flag):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "plan.py"), flag], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: {flag.split('=')[0]}: {flag.split('=')[1]}: expected a positive number"
        + (" (or 0 for the config's)" if "max_new" not in flag else "")], r.stderr[-2000:]


def test_cli_errors_come_alone_without_pytorch(tmp_path):
    """In an environment without PyTorch (pip install -e . does not bring it), transformers announces
    "PyTorch was not found" on import; plan.py's one error line must still be all stderr holds."""
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.util\n_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a, **k: None if name == 'torch' else _find(name, *a, **k)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    for k in ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "plan.py"), "--model", "nope", "--nocompile"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: --model: unknown model preset 'nope'; known: qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-3b, qwen2.5-7b, "
        "small-qwen2, smollm2-135m, tiny-llama, tiny-qwen2"], r.stderr[-2000:]
