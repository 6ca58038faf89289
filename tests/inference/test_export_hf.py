"""Exports read by the stock tools: `peft` (PeftModel / AutoPeftModelForCausalLM) and
transformers (AutoModelForCausalLM + AutoTokenizer + generate).

The references are the stock libraries themselves: whatever they load from our files must
compute what our forward computes, with no missing or unexpected keys, under any adapter name.
"""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import pytest

from socialalign_jax.model import decoder
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.runs import restore
from socialalign_jax.runs.run_config import as_run_config
from socialalign_jax.weights import adapters as adapters_lib, hf as hf_lib

torch = pytest.importorskip("torch", reason="torch (CPU) is needed for the stock-tool references")
transformers = pytest.importorskip("transformers")
from tests.helpers_hf import make_hf_model, save_hf_model  # noqa: E402

ALL = ("q", "k", "v", "o", "gate", "up", "down")
_forward = jax.jit(decoder.forward, static_argnames=("cfg", "lora_cfg"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    ck = save_hf_model(make_hf_model("qwen2", seed=6, vocab=512, hidden=32, inter=64), d / "ck")
    cfg, params = hf_lib.load_hf_checkpoint(ck)
    return ck, cfg, params


def random_adapters(cfg, lc, seed=0):
    rs = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: decoder.init_adapters(jax.random.PRNGKey(0), cfg, lc))
    return jax.tree.map(lambda x: rs.normal(0, 0.2, x.shape).astype(np.float32), shapes)


IDS = np.array([[5, 17, 300, 42, 7, 99, 250, 3, 11, 480]], np.int32)


def ours(cfg, params, adapters=None, lc=None, spans=None):
    out = _forward(params, IDS, cfg, attention_mask=np.ones_like(IDS), adapters=adapters, lora_cfg=lc, spans=spans)
    return np.asarray(out.logits)[0, :, :512]


def hf_logits(m):
    with torch.no_grad():
        return m(input_ids=torch.tensor(IDS.astype(np.int64))).logits[0].double().numpy()


# ----------------------------------------------------------------------------- stock peft


@pytest.mark.parametrize("lora", [dict(num_analyze=1, num_compose=1, routing="token", rank=4, alpha=8.0),
                                  dict(num_analyze=3, num_compose=2, routing="uniform", rank=4, alpha=8.0,
                                       rslora=True)],
                         ids=["plain_lora", "uniform_3x2_rslora"])
def test_stock_peft_loads_the_peft_export_under_any_name(base, tmp_path, lora):
    peft = pytest.importorskip("peft")
    ck, cfg, params = base
    lc = LoraConfig(targets=ALL, num_classes=3, **lora)
    ad = random_adapters(cfg, lc)
    want = ours(cfg, params, ad, lc)
    assert np.abs(want - ours(cfg, params)).max() > 1e-2  # the adapter changes the logits

    out = tmp_path / "peft"
    adapters_lib.export_peft(ad, lc, cfg, out, base_model_name_or_path=str(ck))
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(ck) and "socialalign" not in conf
    # Exactly the fields of stock PEFT's own LoraConfig, no custom entries.
    stock_fields = set(peft.LoraConfig.__dataclass_fields__)
    assert set(conf) <= stock_fields, set(conf) - stock_fields
    from safetensors.numpy import load_file
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys) and len(keys) == 2 * 7 * 2

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(ck))
    plain = hf_logits(hf_base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(hf_base, str(out), adapter_name="first_name")
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
    res = pm.load_adapter(str(out), adapter_name="another")
    assert list(res.unexpected_keys) == [] and [k for k in res.missing_keys if "lora_" in k] == []
    for name in ("first_name", "another"):
        pm.set_adapter(name)
        got = hf_logits(pm.eval())
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.abs(got - plain).max() > 1e-2

    auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    np.testing.assert_allclose(hf_logits(auto), want, rtol=0, atol=1e-4)

    # Our own loader reads stock PEFT back (one expert, constant gates): the same function.
    back, lc2 = adapters_lib.load_adapters(out, cfg)
    assert (lc2.num_analyze, lc2.num_compose, lc2.rank, lc2.rslora) == (1, 1, lc.rank, lc.rslora)
    np.testing.assert_allclose(ours(cfg, params, back, lc2), want, rtol=0, atol=1e-5)


def test_stock_peft_never_misreads_a_socialalign_export_unnoticed(base, tmp_path, monkeypatch):
    """The original layout looks like a PEFT adapter. AutoPeftModelForCausalLM refuses it (it names no base);
    PeftModel.from_pretrained on a base the user gives loads it without an error and computes other outputs
    (it has no experts or gates), which is why launch/export.py --format socialalign says so in one line
    (tests/inference/test_export.py)."""
    peft = pytest.importorskip("peft")
    import huggingface_hub.constants

    ck, cfg, params = base
    lc = LoraConfig(targets=ALL, num_classes=3, rank=4, alpha=8.0)  # PAC-LoRA 3x3, token routing
    spans = (np.array([3]), np.array([6]))
    ad = random_adapters(cfg, lc)
    want = ours(cfg, params, ad, lc, spans)
    assert np.abs(want - ours(cfg, params)).max() > 1e-2
    out = tmp_path / "sa"
    adapters_lib.export_socialalign(ad, lc, cfg, out)
    assert "base_model_name_or_path" not in json.loads((out / "adapter_config.json").read_text())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no hub retries in a test
    with pytest.raises(OSError):
        peft.AutoPeftModelForCausalLM.from_pretrained(str(out))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(ck))
    pm = peft.PeftModel.from_pretrained(hf_base, str(out)).eval()
    assert np.abs(hf_logits(pm) - want).max() > 1e-2  # loaded, no error, other outputs


def test_peft_export_refuses_gated_experts(base, tmp_path):
    ck, cfg, params = base
    lc = LoraConfig(targets=("q",), num_classes=0, rank=4)  # PAC-LoRA 3x3, token routing
    with pytest.raises(adapters_lib.AdapterError, match=r"--format socialalign") as e:
        adapters_lib.export_peft(random_adapters(cfg, lc), lc, cfg, tmp_path / "p")
    assert "\n" not in str(e.value) and not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------- merged + generate


def test_merged_export_generates_out_of_the_box(tmp_path):
    """AutoModelForCausalLM + AutoTokenizer on --format merged: the chat template renders our prompt,
    and greedy `generate` (eos/pad from generation_config.json) stops at <|im_end|> exactly where
    our sampler does, with the same tokens."""
    from socialalign_jax.data.prompt import SYSTEM_PROMPT, chat_prompt
    from socialalign_jax.inference import export
    from socialalign_jax.model import sampling
    from socialalign_jax.inference.generation import sampling_config
    from socialalign_jax.weights.tokenizer import load_tokenizer
    from tests.train_helpers import tiny_config

    tok = load_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    hf = make_hf_model("qwen2", seed=8, vocab=151936, tied=False, hidden=32, inter=64)
    ck = save_hf_model(hf, tmp_path / "ck")
    mc, params = hf_lib.load_hf_checkpoint(ck)
    lc = LoraConfig(num_analyze=1, num_compose=1, rank=4, alpha=8.0, targets=ALL, num_classes=3)
    ad = random_adapters(mc, lc, seed=1)
    cfg = tiny_config()
    cfg.model.weights = f"hf:{ck}"
    cfg = as_run_config(cfg)
    user = "你的用户名为小红, 现在你看到了一则新闻: \n猫咪救主"
    prompt_ids = tok(chat_prompt(user), add_special_tokens=False)["input_ids"]
    scfg = sampling_config(cfg, tok, tok.pad_token_id, greedy=True).replace(max_new_tokens=16)

    def ours_greedy(p):
        ids, mask = sampling.left_pad([prompt_ids], tok.pad_token_id)
        zero = np.zeros((1,), np.int32)
        out = sampling.generate(p, None, ids, mask, mc, None, scfg, (zero, zero), jax.random.PRNGKey(0))
        return np.asarray(out.tokens)[0, : int(out.lengths[0])].tolist()

    def export_merged(p, where):
        run = restore.Run(cfg, mc, lc, p, ad, tok, step=0)
        export.export_run(run, "merged", where)
        return hf_lib.load_hf_checkpoint(where)[1]

    # A random model never says <|im_end|> by itself: make its lm_head row for <|im_end|> a copy
    # (x 1.3) of the row of a token greedy decoding emits at step k, so it stops there instead
    # (x 1.3: <|im_end|> is in the prompt, so the repetition penalty divides its logit by 1.2).
    g = ours_greedy(export_merged(params, tmp_path / "m0"))
    assert im_end not in g and len(g) == 16
    for k in range(2, 10):
        if g[k] in g[:k] or g[k] in prompt_ids:
            continue
        p2 = jax.tree.map(lambda x: x, params)
        head = np.array(p2["lm_head"]["kernel"])
        head[:, im_end] = 1.3 * head[:, g[k]]
        p2["lm_head"]["kernel"] = head
        merged = export_merged(p2, tmp_path / "merged")
        want = ours_greedy(merged)
        if want == g[:k] + [im_end]:
            break
    else:
        pytest.fail("no step k at which the relabelled model stops")

    out = tmp_path / "merged"
    conf = json.loads((out / "config.json").read_text())
    assert "torch_dtype" not in conf and conf["dtype"] == "float32"
    assert conf["eos_token_id"] == im_end and conf["pad_token_id"] == tok.pad_token_id and "bos_token_id" in conf
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == im_end and gen["pad_token_id"] == tok.pad_token_id

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model_hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert model_hf.generation_config.eos_token_id == gen["eos_token_id"]
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == chat_prompt(user)
    enc = hf_tok(text, return_tensors="pt", add_special_tokens=False)
    assert enc["input_ids"][0].tolist() == prompt_ids
    with torch.no_grad():
        seq = model_hf.generate(**enc, do_sample=False, max_new_tokens=16)[0, len(prompt_ids):].tolist()
    assert seq == want  # the same tokens, ending at <|im_end|> (k + 1 < 16 tokens)
    assert seq[-1] == im_end and len(seq) < 16
