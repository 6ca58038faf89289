"""launch/export.py and socialalign_jax/inference/export.py.

A run directory is made the way training makes it (config.json + Orbax checkpoints of the
train state at two steps, adapters with non-zero B so the adapted model differs from the
base). Re-imported exports must give the logits of the checkpointed adapters; merged HF
weights (plain LoRA, uniform routing) must give the logits of base + adapters; the PEFT
file must have SPEC section 2's key layout, written out here by hand.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from socialalign_jax.core.atomic_io import write_json
from socialalign_jax.inference import export
from socialalign_jax.model import decoder, pac_lora
from socialalign_jax.model.presets import get_preset
from socialalign_jax.runs import checkpoint, restore
from socialalign_jax.runs.run_config import as_run_config
from socialalign_jax.train import optim, step as step_lib
from socialalign_jax.weights import adapters as adapters_lib, hf

from tests.train_helpers import REPO, script_env, tiny_config

MCFG = get_preset("tiny-qwen2")


def make_run(workdir, **lora):
    """A run directory with checkpoints at steps 1 and 2 holding different random adapters."""
    cfg = tiny_config()
    for k, v in lora.items():
        cfg.lora[k] = v
    cfg = as_run_config(cfg)
    lc = cfg.lora
    optimizer, _ = optim.make_optimizer(cfg.optim, 2)
    cfg_dict = restore.config_to_dict(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(cfg_dict, str(workdir / "config.json"))
    manager = checkpoint.make_manager(str(workdir), save_every=1, keep=3, async_save=False)
    trees = {}
    for step in (1, 2):
        rs = np.random.default_rng(step)
        ad = jax.tree.map(lambda x: rs.normal(0, 0.05, x.shape).astype(np.float32),
                          jax.eval_shape(lambda: decoder.init_adapters(jax.random.PRNGKey(0), MCFG, lc)))
        state = step_lib.init_train_state(ad, optimizer)
        state["step"] = np.int32(step)
        checkpoint.save(manager, step, state, {}, cfg_dict, force=True)
        trees[step] = ad
    manager.wait_until_finished()
    return trees, lc


_forward = jax.jit(decoder.forward, static_argnames=("cfg", "lora_cfg"))


def logits(params, adapters, lc, cfg=MCFG):
    rs = np.random.default_rng(0)
    ids = rs.integers(0, 5000, (2, 12)).astype(np.int32)
    spans = (np.array([4, 3], np.int32), np.array([8, 7], np.int32))
    out = _forward(params, ids, cfg, attention_mask=np.ones_like(ids), adapters=adapters,
                        lora_cfg=lc if adapters is not None else None, spans=spans if adapters is not None else None)
    return np.asarray(out.logits)


@pytest.fixture(scope="module")
def token_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("token_run")
    trees, lc = make_run(wd, num_analyze=3, num_compose=3, routing="token", targets="q,v,down")
    return wd, trees, lc, restore.restore_run(str(wd))


def test_restore_exports_and_reimports_give_the_same_logits(token_run, tmp_path):
    wd, trees, lc, run = token_run
    assert run.step == 2
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(run.adapters), jax.tree.leaves(trees[2])):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(p))
    ref = logits(run.params, trees[2], lc)
    assert np.abs(ref - logits(run.params, None, None)).max() > 1e-3  # the adapters matter

    export.export_run(run, "orbax", tmp_path / "orbax")
    ad, lc2 = export.load_orbax_adapters(tmp_path / "orbax")
    assert lc2 == lc
    np.testing.assert_array_equal(logits(run.params, ad, lc2), ref)

    export.export_run(run, "socialalign", tmp_path / "orig")
    ad, lc3 = adapters_lib.import_peft(tmp_path / "orig", MCFG)
    np.testing.assert_array_equal(logits(run.params, ad, lc3), ref)
    assert adapters_lib.load_adapters(tmp_path / "orig", MCFG)[0]["head"]["kernel"].shape == (MCFG.hidden_size, 3)
    # Stock PEFT LoRA cannot hold gated experts: refused, naming the format that can.
    with pytest.raises(export.ExportError, match=r"--format peft: routing 'token'.*--format socialalign"):
        export.export_run(run, "peft", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_socialalign_export_has_the_original_key_layout(token_run, tmp_path):
    wd, trees, lc, run = token_run
    export.export_run(run, "socialalign", tmp_path)
    from safetensors.numpy import load_file
    got = {k: v.shape for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    D, F, kv, r = MCFG.hidden_size, MCFG.intermediate_size, MCFG.num_kv_heads * MCFG.head_dim, 8
    io = {"self_attn.q_proj": (D, MCFG.num_heads * MCFG.head_dim), "self_attn.v_proj": (D, kv), "mlp.down_proj": (F, D)}
    want = {}
    for i in range(MCFG.num_layers):
        for mod, (d_in, d_out) in io.items():
            pre = f"base_model.model.model.layers.{i}.{mod}."
            for n in ("lora_A", "lora_A1", "lora_A2"):
                want[pre + n + ".default.weight"] = (r, d_in)
            for n in ("lora_B", "lora_B1", "lora_B2"):
                want[pre + n + ".default.weight"] = (d_out, r)
            for s in ("A", "B"):
                want[pre + f"lora_{s}_gate_dense1.default.weight"] = (32, d_in)
                want[pre + f"lora_{s}_gate_dense2.default.weight"] = (3, 32)
    assert got == want
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16.0 and sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]


@pytest.mark.parametrize("lora", [dict(num_analyze=1, num_compose=1, routing="token"),
                                  dict(num_analyze=3, num_compose=2, routing="uniform")],
                         ids=["plain_lora", "uniform"])
def test_merged_weights_equal_base_plus_adapters(tmp_path, lora):
    trees, lc = make_run(tmp_path / "run", targets="q,k,v,o,gate,up,down", **lora)
    run = restore.restore_run(str(tmp_path / "run"))
    export.export_run(run, "merged", tmp_path / "merged")
    cfg2, merged = hf.load_hf_checkpoint(tmp_path / "merged")
    assert (tmp_path / "merged" / "sentiment_head.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    want = logits(run.params, trees[2], lc)
    assert np.abs(want - logits(run.params, None, None)).max() > 1e-3
    np.testing.assert_allclose(logits(merged, None, None, cfg2), want, rtol=1e-4, atol=1e-4)


def test_cli_step_flag_and_merge_refusal(token_run, tmp_path):
    wd, trees, lc, _ = token_run
    cmd = [sys.executable, str(REPO / "launch" / "export.py"), "--workdir", str(wd)]
    r = subprocess.run(cmd + ["--format", "merged", "--out", str(tmp_path / "m")], capture_output=True, text=True,
                       env=script_env(1), timeout=300)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "routing 'token'" in err[0] and "depend on the input" in err[0], r.stderr
    assert not (tmp_path / "m" / "model.safetensors").exists()
    r = subprocess.run(cmd + ["--format", "peft", "--out", str(tmp_path / "p")], capture_output=True, text=True,
                       env=script_env(1), timeout=300)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "--format socialalign" in err[0], r.stderr
    assert not (tmp_path / "p").exists()

    r = subprocess.run(cmd + ["--format", "safetensors", "--out", str(tmp_path / "s"), "--step", "1"],
                       capture_output=True, text=True, env=script_env(1), timeout=300)
    assert r.returncode == 0, r.stderr
    ad, lc2 = adapters_lib.load_adapters(tmp_path / "s", MCFG)
    assert lc2 == lc
    for a, b in zip(jax.tree.leaves(ad), jax.tree.leaves(trees[1])):
        np.testing.assert_array_equal(a, b)


def test_cli_peft_export_names_a_base_a_stock_loader_can_read_or_refuses(tmp_path):
    """A peft export's adapter_config.json names its base for AutoPeftModelForCausalLM: the run's hf: directory
    or GGUF file, or --base_model; a run on random weights has none, so the export is one line, not a config
    with base_model_name_or_path null (with which AutoPeftModelForCausalLM goes to the hub)."""
    wd = tmp_path / "lora_run"
    make_run(wd, num_analyze=1, num_compose=1, targets="q,v")
    cmd = [sys.executable, str(REPO / "launch" / "export.py"), "--workdir", str(wd), "--format", "peft"]
    r = subprocess.run(cmd + ["--out", str(tmp_path / "p")], capture_output=True, text=True, env=script_env(1),
                       timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert err[0].startswith("error: --format peft: the run's base is random:tiny-qwen2 (random weights") and \
        "pass --base_model DIR" in err[0] and "--format merged" in err[0], err
    assert not (tmp_path / "p").exists()
    base = tmp_path / "hf_base"  # any name the user gives is written as it is
    r = subprocess.run(cmd + ["--out", str(tmp_path / "p"), "--base_model", str(base)], capture_output=True, text=True,
                       env=script_env(1), timeout=300)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    conf = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(base)

    # The default: the run's own source, absolute (AutoPeftModelForCausalLM resolves it from anywhere).
    cfg = tiny_config()
    for spec, want in (("hf:rel/ckpt", os.path.abspath("rel/ckpt")), ("gguf:/models/m.gguf", "/models/m.gguf"),
                       ("random:tiny-qwen2", None)):
        cfg.model.weights = spec
        assert export.base_model_path(cfg) == want, spec


def test_cli_out_that_is_a_file_is_one_line(token_run, tmp_path):
    wd, _, _, _ = token_run
    (tmp_path / "f").write_text("x")
    r = subprocess.run([sys.executable, str(REPO / "launch" / "export.py"), "--workdir", str(wd), "--format",
                        "safetensors", "--out", str(tmp_path / "f")], capture_output=True, text=True, env=script_env(1),
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: --out {tmp_path / 'f'}: is a file; expected a directory (the export writes several files)"], r.stderr
    assert (tmp_path / "f").read_text() == "x"


def test_cli_socialalign_export_says_stock_peft_misreads_it(token_run, tmp_path):
    wd, _, _, _ = token_run
    out = tmp_path / "sa"
    r = subprocess.run([sys.executable, str(REPO / "launch" / "export.py"), "--workdir", str(wd), "--format",
                        "socialalign", "--out", str(out)], capture_output=True, text=True, env=script_env(1), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"note: {out} is the original SocialAlign layout, for the authors' patched PEFT only: stock PEFT loads it "
        "without an error but computes other outputs (it ignores the experts and gates); for stock PEFT export a "
        "plain-LoRA or routing 'uniform' run with --format peft"]
    assert (out / "adapter_model.safetensors").is_file()


def test_merge_refusal_reasons():
    assert export.merge_refusal(pac_lora.LoraConfig(num_analyze=1, num_compose=1, routing="pooled")) is None
    assert export.merge_refusal(pac_lora.LoraConfig(routing="uniform")) is None
    why = export.merge_refusal(pac_lora.LoraConfig(num_analyze=3, num_compose=1, routing="uniform_b"))
    assert "gate_a mixes 3 analyze experts" in why and "gate_b" not in why
    with pytest.raises(export.ExportError, match="routing 'pooled'"):
        export.merge_adapters({}, {}, pac_lora.LoraConfig(routing="pooled"), MCFG)
