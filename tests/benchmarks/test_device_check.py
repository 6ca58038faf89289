"""benchmarks/device_check.sh --smoke: the script a lent GPU runs first works, at tiny shapes on the CPU.

Every section (env, agree, layer, train, decode) must write its JSON line with ok = true. The
`agree` section compares bf16 against float32 (here both on the CPU): each measured error must
be under its stated bound AND above zero (a zero would mean float32 was compared with itself).
The benchmark sections run their own agreement checks against PyTorch before timing, so an
ok line means ours and HF/torch_ref agreed; the HF decode baseline must hold bf16 weights only.
"""

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one CPU device, as on a plain host
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_check.sh"), str(out), "--smoke"],
                       capture_output=True, text=True, env=env, timeout=1800)
    path = out / "device_check.jsonl"
    assert path.exists(), r.stderr[-3000:]
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert r.returncode == 0, (r.stderr[-3000:], [x for x in recs if not x.get("ok")])
    return {x["section"]: x for x in recs}


def test_every_section_passes(lines):
    assert set(lines) == {"env", "agree", "layer", "train", "decode"}
    assert all(x["ok"] and x["smoke"] for x in lines.values())
    assert lines["env"]["versions"]["jax"]


def test_bf16_agreement_is_measured_not_trivial(lines):
    checks = lines["agree"]["checks"]
    assert lines["agree"]["attention"] == {"einsum": "ran", "xla": "ran"}  # on a GPU: einsum and cudnn
    for name in ("forward_logits_fuse_always_rel_max", "forward_logits_fuse_never_rel_max", "loss_rel",
                 "adapter_grads_rel_l2", "forward_logits_attention_einsum_rel_max",
                 "forward_logits_attention_xla_rel_max"):
        assert 0 < checks[name]["value"] <= checks[name]["bound"], (name, checks[name])
    for loop in ("scan", "unrolled"):
        c = checks[f"decode_{loop}_worst_margin_rel"]
        assert 0 <= c["value"] <= c["bound"]
    assert 0 < checks["train_step_adapter_change_rel_l2"] < 1
    assert len(lines["agree"]["decoded"]["scan"]) == 2


def test_benchmarks_ran_in_bf16_on_both_sides(lines):
    assert lines["decode"]["hf_param_dtypes"] == ["torch.bfloat16"]
    assert lines["train"]["speedup"] > 0 and lines["train"]["pac_over_lora"] > 0
    assert lines["layer"]["speedup"] > 0
