"""Adapter files: our layout round trip, the original PEFT layout (bitwise round trip, errors),
a PyTorch re-implementation of the original PAC-LoRA module as the numerical reference, and
`launch/score.py --adapters` against HF transformers with those torch modules patched in."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from socialalign_jax.core.errors import is_user_error
from socialalign_jax.model import pac_lora
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.weights import adapters as adapters_lib
from socialalign_jax.weights.adapters import AdapterError, export_socialalign, import_peft, load_adapters, save_adapters

torch = pytest.importorskip("torch")

CFG = ModelConfig("qwen2", 50, 16, 24, 2, 2, 1, 8, qkv_bias=True, tie_embeddings=True)  # q 16, kv 8
PROJ = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
        "o": ("self_attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
        "down": ("mlp", "down_proj")}
# (d_in, d_out) written out from CFG by hand: q 16->16, k/v 16->8, o 16->16, gate/up 16->24, down 24->16.
DIMS = {"q": (16, 16), "k": (16, 8), "v": (16, 8), "o": (16, 16), "gate": (16, 24), "up": (16, 24), "down": (24, 16)}
R, EA, EB, G = 4, 3, 3, 32
USER, NEWS = 0, 1


def original_state_dict(seed=0, suffix=".default.weight", dtype=np.float32, targets=tuple(PROJ)):
    """What the original PyTorch code saves: per layer/module/expert tensors in [out, in] layout."""
    rng = np.random.default_rng(seed)
    sd = {}
    for layer in range(CFG.num_layers):
        for t in targets:
            d_in, d_out = DIMS[t]
            pre = f"base_model.model.model.layers.{layer}.{PROJ[t][0]}.{PROJ[t][1]}."
            for i, n in enumerate(["lora_A", "lora_A1", "lora_A2"]):
                sd[pre + n + suffix] = rng.normal(0, 0.5, (R, d_in))
            for n in ["lora_B", "lora_B1", "lora_B2"]:
                sd[pre + n + suffix] = rng.normal(0, 0.5, (d_out, R))
            for k in "AB":
                sd[pre + f"lora_{k}_gate_dense1" + suffix] = rng.normal(0, 0.5, (G, d_in))
                sd[pre + f"lora_{k}_gate_dense2" + suffix] = rng.normal(0, 0.5, (3, G))
    return {k: v.astype(dtype) for k, v in sd.items()}


def write_original(d: Path, sd, config=True, alpha=16.0):
    d.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    if config:
        (d / "adapter_config.json").write_text(json.dumps(
            {"r": R, "lora_alpha": alpha, "lora_dropout": 0.1, "peft_type": "LORA",
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}))
    return d


# ----------------------------------------------------------------------------- the torch reference


class OrigPacLora(torch.nn.Module):
    """The original module, written from SPEC section 2 in PyTorch: experts as nn.Linear,
    gates Linear -> GELU -> Linear -> softmax, token routing by a segment-id tensor."""

    def __init__(self, base: torch.nn.Linear, sd: dict, prefix: str, suffix: str, scale: float):
        super().__init__()
        self.base, self.scale, self.seg = base, scale, None
        w = lambda n: torch.tensor(np.asarray(sd[prefix + n + suffix], np.float32))  # noqa: E731
        lin = lambda t: _linear_from(t)  # noqa: E731
        self.A = torch.nn.ModuleList([lin(w(n)) for n in ("lora_A", "lora_A1", "lora_A2")])
        self.B = torch.nn.ModuleList([lin(w(n)) for n in ("lora_B", "lora_B1", "lora_B2")])
        self.gate_a = torch.nn.Sequential(lin(w("lora_A_gate_dense1")), torch.nn.GELU(), lin(w("lora_A_gate_dense2")))
        self.gate_b = torch.nn.Sequential(lin(w("lora_B_gate_dense1")), torch.nn.GELU(), lin(w("lora_B_gate_dense2")))

    def forward(self, x):
        seg = self.seg if self.seg is not None else torch.full(x.shape[:2], 2)
        ga = torch.softmax(self.gate_a(x * (seg == NEWS).unsqueeze(-1)), -1)
        gb = torch.softmax(self.gate_b(x * (seg == USER).unsqueeze(-1)), -1)
        h = sum(ga[..., i:i + 1] * a(x) for i, a in enumerate(self.A))
        return self.base(x) + self.scale * sum(gb[..., j:j + 1] * b(h) for j, b in enumerate(self.B))


def _linear_from(weight):
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


# ----------------------------------------------------------------------------- original layout


def test_original_layout_round_trip_is_bitwise(tmp_path):
    src = write_original(tmp_path / "orig", original_state_dict())
    adapters, lc = import_peft(src, CFG)
    assert (lc.num_analyze, lc.num_compose, lc.rank, lc.gate_width, lc.alpha) == (3, 3, R, G, 16.0)
    assert lc.targets == pac_lora.ALL_TARGETS and lc.scale == 16.0 / R
    assert adapters["layers"]["mlp"]["down"]["A"].shape == (CFG.num_layers, EA, 24, R)
    out = export_socialalign(adapters, lc, CFG, tmp_path / "again")
    a = (src / "adapter_model.safetensors").read_bytes()
    assert out.read_bytes() == a  # same keys, same order, same bytes
    cfg = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert cfg["r"] == R and cfg["lora_alpha"] == 16.0 and len(cfg["target_modules"]) == 7


def test_weight_suffix_and_bf16_are_read(tmp_path):
    sd = original_state_dict(seed=1)
    a, _ = import_peft(write_original(tmp_path / "d", sd), CFG)
    b, _ = import_peft(write_original(tmp_path / "w", {k.replace(".default.weight", ".weight"): v
                                                         for k, v in sd.items()}), CFG)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    bf = {k: v.astype(jnp.bfloat16) for k, v in sd.items()}
    src = write_original(tmp_path / "bf", bf)
    c, lc = import_peft(src, CFG)
    assert c["layers"]["attn"]["q"]["A"].dtype == np.float32
    out = export_socialalign(c, lc, CFG, tmp_path / "bf_again", dtype="bfloat16")
    assert out.read_bytes() == (src / "adapter_model.safetensors").read_bytes()


def test_layout_matches_torch_reference_module(tmp_path):
    """An imported adapter gives the original module's output (token routing, spans inside)."""
    sd = original_state_dict(seed=2)
    adapters, lc = import_peft(write_original(tmp_path / "o", sd, alpha=6.0), CFG)
    rng = np.random.default_rng(0)
    seg = np.array([[0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 2, 2, 2, 2]])
    for target, layer in (("q", 1), ("down", 0), ("k", 0)):
        d_in, d_out = DIMS[target]
        base = torch.nn.Linear(d_in, d_out, bias=True)
        pre = f"base_model.model.model.layers.{layer}.{PROJ[target][0]}.{PROJ[target][1]}."
        mod = OrigPacLora(base, sd, pre, ".default.weight", 6.0 / R)
        mod.seg = torch.tensor(seg)
        x = rng.normal(0, 1, (2, 7, d_in)).astype(np.float32)
        with torch.no_grad():
            want = mod(torch.tensor(x)).numpy()
        block = pac_lora.MODULE_BLOCK[target]
        ad = jax.tree_util.tree_map(lambda a: jnp.asarray(a[layer]), adapters["layers"][block][target])
        base_j = {"kernel": jnp.asarray(base.weight.detach().numpy().T), "bias": jnp.asarray(base.bias.detach().numpy())}
        route = {"seg": jnp.asarray(seg), "valid": jnp.ones(seg.shape, bool), "deterministic": True}
        got, _, _ = pac_lora.adapted_linear(jnp.asarray(x), base_j, ad, lc, route)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=target)
        assert np.abs(want - base(torch.tensor(x)).detach().numpy()).max() > 1e-2  # adapter matters


def _err(fn, *needles):
    with pytest.raises(AdapterError) as e:
        fn()
    msg = str(e.value)
    assert is_user_error(e.value) and "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_original_layout_errors(tmp_path):
    sd = original_state_dict(seed=3)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A1.default.weight"

    bad = dict(sd)
    bad[key] = np.zeros((R, 15), np.float32)
    _err(lambda: import_peft(write_original(tmp_path / "shape", bad), CFG), key, "(4, 16)", "(4, 15)")

    missing = {k: v for k, v in sd.items() if k != key}
    _err(lambda: import_peft(write_original(tmp_path / "miss", missing), CFG), "missing key", key)

    extra = dict(sd, **{"base_model.model.lm_head.weight": np.zeros((2, 2), np.float32)})
    _err(lambda: import_peft(write_original(tmp_path / "extra", extra), CFG), "unexpected key",
         "base_model.model.lm_head.weight")

    one_layer = CFG.replace(num_layers=1)
    _err(lambda: import_peft(write_original(tmp_path / "ok", sd), one_layer), "layers.1.", "1 layers")
    _err(lambda: import_peft(tmp_path / "ok", CFG.replace(hidden_size=32)), "expected shape", "found")
    _err(lambda: import_peft(tmp_path / "ok", CFG, LoraConfig(rank=8)), "rank", "8", "4")
    _err(lambda: import_peft(write_original(tmp_path / "nocfg", sd, config=False), CFG), "adapter_config.json")

    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04")
    _err(lambda: import_peft(tmp_path / "pickled", CFG), "adapter_model.bin", "pickle")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    _err(lambda: import_peft(tmp_path / "junk.safetensors", CFG), "junk.safetensors")


# ----------------------------------------------------------------------------- our layout


def _trained_adapters(cfg, lc, seed=0):
    """An adapter tree of the right shapes with every leaf random (B and head bias included), as after training."""
    rng = np.random.default_rng(seed)
    shapes = adapters_lib.expected_shapes(cfg, lc)
    return adapters_lib.unflatten({k: rng.normal(0, 0.2, s).astype(np.float32) for k, s in shapes.items()})


def test_our_layout_round_trip_exact(tmp_path):
    lc = LoraConfig(num_analyze=2, num_compose=3, rank=4, alpha=8.0, rslora=True, targets=("q", "v", "down"),
                    routing="pooled", num_classes=3, gate_width=8)
    ad = _trained_adapters(CFG, lc)
    path = save_adapters(ad, lc, CFG, tmp_path / "run")
    got, got_lc = load_adapters(path, CFG)
    assert got_lc == lc
    assert adapters_lib.flatten(got).keys() == adapters_lib.flatten(ad).keys()
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), got, ad)
    got2, _ = load_adapters(tmp_path / "run")  # a directory, no model config needed
    jax.tree_util.tree_map(np.testing.assert_array_equal, got2, got)

    # PEFT export carries the head beside it; importing gives back the same tree.
    export_socialalign(ad, lc, CFG, tmp_path / "peft")
    back, back_lc = import_peft(tmp_path / "peft", CFG)
    assert (back_lc.routing, back_lc.rslora, back_lc.num_classes, back_lc.targets) == ("pooled", True, 3, lc.targets)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), back, ad)


def test_our_layout_errors(tmp_path):
    lc = LoraConfig(rank=4, targets=("q",), num_classes=3)
    ad = _trained_adapters(CFG, lc)
    path = save_adapters(ad, lc, CFG, tmp_path / "a.safetensors")
    _err(lambda: load_adapters(path, CFG.replace(hidden_size=32, num_heads=4, num_kv_heads=2)), "hidden_size", "16", "32")
    _err(lambda: load_adapters(tmp_path / "nothing.safetensors"), "no such adapter file")
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    _err(lambda: load_adapters(tmp_path / "other.safetensors", CFG), "format")
    bad = dict(ad)
    bad["head"] = {"kernel": np.zeros((16, 2), np.float32), "bias": np.zeros(3, np.float32)}
    _err(lambda: save_adapters(bad, lc, CFG, tmp_path / "b.safetensors"), "head/kernel", "(16, 3)", "(16, 2)")


# ----------------------------------------------------------------------------- score --adapters

QWEN_VOCAB = 151936


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from tests.helpers_hf import make_hf_model, save_hf_model

    from socialalign_jax.weights.tokenizer import load_tokenizer
    model = make_hf_model("qwen2", seed=5, vocab=QWEN_VOCAB, tied=True, hidden=32, inter=64)
    d = save_hf_model(model, tmp_path_factory.mktemp("ck"))
    load_tokenizer().save_pretrained(str(d))
    return model, d


def test_score_cli_applies_adapters(hf_checkpoint, tmp_path):
    """score.py --adapters --routing uniform equals transformers with the torch reference PAC-LoRA
    modules patched in and no spans (every gate input 0: uniform gates). Routing by the spans
    is tested in test_score_spans.py."""
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "launch"))
    import score as score_cli

    from socialalign_jax.weights.hf import read_config
    from socialalign_jax.weights.tokenizer import load_tokenizer
    model, ck = hf_checkpoint
    model = copy.deepcopy(model)  # patched below; the fixture stays the plain model
    cfg, _ = read_config(ck)
    lc = LoraConfig(rank=4, alpha=8.0, num_classes=3)
    ad = _trained_adapters(cfg, lc, seed=9)
    ours = save_adapters(ad, lc, cfg, tmp_path / "ours")
    export_socialalign(ad, lc, cfg, tmp_path / "peft")
    from safetensors.numpy import load_file
    sd = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))

    text = "今天的新闻让人很难过。#地震# 希望大家平安"
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    # Both layouts load to the same tree, so one CLI run (on the PEFT directory) covers both.
    a, a_lc = load_adapters(ours, cfg)
    b, b_lc = load_adapters(tmp_path / "peft", cfg)
    assert a_lc == b_lc == lc
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    out = tmp_path / "out.jsonl"
    argv = ["--weights", str(ck), "--input", str(inp), "--out", str(out), "--batch_size", "1",
            "--adapters", str(tmp_path / "peft"), "--routing", "uniform"]
    with pytest.raises(SystemExit) as e:
        score_cli.cli_main(score_cli.main, argv)
    assert e.value.code == 0
    got = np.array(json.loads(out.read_text(encoding="utf-8"))["token_logprobs"])

    # Reference: HF model with every adapted Linear replaced by the torch PAC-LoRA module.
    ids = load_tokenizer(ck).encode(text, add_special_tokens=False)

    def hf_logprobs():
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        return np.array([lp[t - 1, ids[t]].item() for t in range(1, len(ids))])

    plain = hf_logprobs()
    for i, layer in enumerate(model.model.layers):
        for t, (block, proj) in PROJ.items():
            parent = getattr(layer, block)
            pre = f"base_model.model.model.layers.{i}.{block}.{proj}."
            setattr(parent, proj, OrigPacLora(getattr(parent, proj), sd, pre, ".default.weight", lc.scale))
    ref = hf_logprobs()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    assert np.abs(plain - ref).max() > 1e-2  # the adapters really change the scores
    assert math.isfinite(ref.sum())


def test_score_cli_bad_adapters_is_one_line_error(hf_checkpoint, tmp_path, capsys):
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "launch"))
    import score as score_cli

    _, ck = hf_checkpoint
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"text": "hello there, world"}) + "\n", encoding="utf-8")
    small = LoraConfig(rank=4, targets=("q",), num_classes=0)
    wrong = save_adapters(_trained_adapters(CFG, small), small, CFG, tmp_path / "wrong.safetensors")  # hidden 16
    with pytest.raises(SystemExit) as e:
        score_cli.cli_main(score_cli.main, ["--weights", str(ck), "--input", str(inp),
                                            "--out", str(tmp_path / "o.jsonl"), "--adapters", str(wrong)])
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "wrong.safetensors" in lines[0], lines
    assert "hidden_size" in lines[0] and not (tmp_path / "o.jsonl").exists()


def test_every_adapter_file_gets_the_umask_mode(tmp_path):
    """Under umask 022 an export is readable by others like the adapter_config.json beside it (0644), not
    0600 (safetensors' save_file); and it is written whole or not at all (atomic_io)."""
    import os
    import stat

    lc = LoraConfig(targets=("q", "v"), rank=R, num_classes=3, num_analyze=1, num_compose=1)
    from socialalign_jax.model.decoder import init_adapters

    ad = jax.tree.map(np.asarray, init_adapters(jax.random.PRNGKey(0), CFG, lc))
    old = os.umask(0o022)
    try:
        save_adapters(ad, lc, CFG, tmp_path / "ours")
        export_socialalign(ad, lc, CFG, tmp_path / "sa")
        adapters_lib.export_peft(ad, lc, CFG, tmp_path / "peft", base_model_name_or_path="/x")
    finally:
        os.umask(old)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"adapters.safetensors", "adapter_model.safetensors", "sentiment_head.safetensors",
                                       "adapter_config.json"}
    assert {p.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
        p.relative_to(tmp_path).as_posix(): "0o644" for p in files}
