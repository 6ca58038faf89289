"""HF checkpoint import/export against transformers' own save_pretrained/from_pretrained."""

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from socialalign_jax.core.errors import UserError
from socialalign_jax.weights.hf import (load_hf_checkpoint, load_safetensors, mask_padded_vocab,
                                        read_safetensors_header, save_hf_checkpoint, save_safetensors)

torch = pytest.importorskip("torch", reason="torch (CPU) is needed to build reference HF checkpoints")
transformers = pytest.importorskip("transformers")
from tests.helpers_hf import hf_numpy_state, make_hf_model, save_hf_model  # noqa: E402


def _ours_to_hf_names(params, num_layers):
    """Independent re-statement of DESIGN.md's name table: our leaf -> HF tensor (PyTorch layout)."""
    out = {"model.embed_tokens.weight": params["embed"]["embedding"],
           "model.norm.weight": params["final_norm"]["scale"]}
    if "lm_head" in params:
        out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
    lay = params["layers"]
    for i in range(num_layers):
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = lay["input_norm"]["scale"][i]
        out[pre + "post_attention_layernorm.weight"] = lay["post_attn_norm"]["scale"][i]
        for n in "qkvo":
            out[pre + f"self_attn.{n}_proj.weight"] = np.asarray(lay["attn"][n]["kernel"][i]).T
            if "bias" in lay["attn"][n]:
                out[pre + f"self_attn.{n}_proj.bias"] = lay["attn"][n]["bias"][i]
        for n in ("gate", "up", "down"):
            out[pre + f"mlp.{n}_proj.weight"] = np.asarray(lay["mlp"][n]["kernel"][i]).T
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


@pytest.fixture(scope="module")
def qwen_sharded(tmp_path_factory):
    model = make_hf_model("qwen2", seed=1, vocab=500)
    d = save_hf_model(model, tmp_path_factory.mktemp("qwen_sharded"), max_shard_size="40KB")
    return model, d


@pytest.fixture(scope="module")
def llama_tied(tmp_path_factory):
    model = make_hf_model("llama", seed=2, tied=True)
    return model, save_hf_model(model, tmp_path_factory.mktemp("llama_tied"))


def test_sharded_qwen2_matches_hf_state_dict(qwen_sharded):
    model, d = qwen_sharded
    assert (d / "model.safetensors.index.json").exists()
    cfg, params = load_hf_checkpoint(d)
    hf = model.config
    assert (cfg.family, cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == ("qwen2", 500, 64, 2)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.qkv_bias) == (4, 2, 16, True)
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"] == 1e6
    assert cfg.rms_norm_eps == hf.rms_norm_eps and not cfg.tie_embeddings
    ours = _ours_to_hf_names(params, cfg.num_layers)
    ref = hf_numpy_state(model)
    assert ours.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


def test_tied_llama_has_no_lm_head(llama_tied):
    model, d = llama_tied
    cfg, params = load_hf_checkpoint(d)
    assert cfg.tie_embeddings and not cfg.qkv_bias and cfg.family == "llama"
    assert "lm_head" not in params and "bias" not in params["layers"]["attn"]["q"]
    ref = {k: v for k, v in hf_numpy_state(model).items() if k != "lm_head.weight"}
    ours = _ours_to_hf_names(params, cfg.num_layers)
    assert ours.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


def test_tied_checkpoint_with_equal_lm_head_is_accepted_and_differing_rejected(llama_tied, tmp_path):
    _, d = llama_tied
    shutil.copytree(d, tmp_path / "ck")
    tensors = load_safetensors(tmp_path / "ck/model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_safetensors(tensors, tmp_path / "ck/model.safetensors")
    cfg, params = load_hf_checkpoint(tmp_path / "ck")
    assert "lm_head" not in params
    tensors["lm_head.weight"][0, 0] += 1.0
    save_safetensors(tensors, tmp_path / "ck/model.safetensors")
    with pytest.raises(UserError, match=r"model\.safetensors: tensor 'lm_head.weight' differs"):
        load_hf_checkpoint(tmp_path / "ck")


def test_bf16_checkpoint_is_bit_exact(tmp_path):
    model = make_hf_model("qwen2", seed=3)
    save_hf_model(model, tmp_path, dtype=torch.bfloat16)
    cfg, params = load_hf_checkpoint(tmp_path)
    assert cfg.param_dtype == "bfloat16" and cfg.dtype == "bfloat16"
    assert params["embed"]["embedding"].dtype == jax.numpy.bfloat16
    ref = model.to(torch.bfloat16).state_dict()
    for k, v in _ours_to_hf_names(params, cfg.num_layers).items():
        # float32 -> bf16 of a bf16 value is exact, so compare the raw bits of both sides
        np.testing.assert_array_equal(v.astype(ml_dtypes.bfloat16).view(np.uint16),
                                      ref[k].view(torch.int16).numpy().view(np.uint16), err_msg=k)
    cfg32, params32 = load_hf_checkpoint(tmp_path, dtype="float32")
    assert cfg32.param_dtype == "float32" and params32["layers"]["mlp"]["up"]["kernel"].dtype == np.float32


def test_reader_matches_safetensors_library(qwen_sharded, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    _, d = qwen_sharded
    shard = sorted(d.glob("model-*.safetensors"))[0]
    ours = load_safetensors(shard)
    with safe_open(str(shard), framework="numpy") as f:
        assert set(f.keys()) == set(ours)
        for k in f.keys():
            np.testing.assert_array_equal(f.get_tensor(k), ours[k])
    # bf16 and odd shapes written by us, read back by safetensors' torch backend
    rng = np.random.default_rng(0)
    t = {"a": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16), "b": rng.normal(size=(7,)).astype(np.float32),
         "c": np.arange(6, dtype=np.int64).reshape(2, 3)}
    save_safetensors(t, tmp_path / "x.safetensors")
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back["a"].dtype == torch.bfloat16
    np.testing.assert_array_equal(back["a"].float().numpy(), t["a"].astype(np.float32))
    np.testing.assert_array_equal(back["b"].numpy(), t["b"])
    np.testing.assert_array_equal(back["c"].numpy(), t["c"])


def test_vocab_padding(qwen_sharded):
    model, d = qwen_sharded
    cfg, params = load_hf_checkpoint(d, vocab_multiple=128)
    assert cfg.vocab_size == 512
    emb, head = np.asarray(params["embed"]["embedding"]), np.asarray(params["lm_head"]["kernel"])
    assert emb.shape == (512, 64) and head.shape == (64, 512)
    ref = hf_numpy_state(model)
    np.testing.assert_array_equal(emb[:500], ref["model.embed_tokens.weight"])
    np.testing.assert_array_equal(head[:, :500], ref["lm_head.weight"].T)
    assert not emb[500:].any() and not head[:, 500:].any()
    logits = np.ones((2, 512), np.float32)
    masked = np.asarray(mask_padded_vocab(logits, 500))
    assert (masked[:, :500] == 1).all() and (masked[:, 500:] < -1e30).all()


def test_sharded_placement_on_mesh(qwen_sharded):
    model, d = qwen_sharded
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    ns = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    lin = lambda: {"kernel": ns(None, "fsdp", "tensor")}  # noqa: E731
    shardings = {
        "embed": {"embedding": ns("tensor", "fsdp")},
        "layers": {"input_norm": {"scale": ns()}, "post_attn_norm": {"scale": ns()},
                   "attn": {n: {"kernel": ns(None, "fsdp", "tensor"), "bias": ns(None, "tensor")} for n in "qkv"}
                   | {"o": {"kernel": ns(None, "tensor", "fsdp")}},
                   "mlp": {"gate": lin(), "up": lin(), "down": {"kernel": ns(None, "tensor", "fsdp")}}},
        "final_norm": {"scale": ns()},
        "lm_head": {"kernel": ns("fsdp", "tensor")},
    }
    cfg, params = load_hf_checkpoint(d, shardings=shardings, vocab_multiple=8)
    q = params["layers"]["attn"]["q"]["kernel"]
    assert q.sharding == shardings["layers"]["attn"]["q"]["kernel"]
    assert q.addressable_shards[0].data.shape == (2, 32, 16)
    ref = hf_numpy_state(model)
    np.testing.assert_array_equal(np.asarray(q)[1], ref["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"])[:500], ref["model.embed_tokens.weight"])
    _, rep = load_hf_checkpoint(d, mesh=mesh)
    assert rep["final_norm"]["scale"].sharding.is_fully_replicated


@pytest.mark.parametrize("shard_bytes", [None, 30_000])
def test_save_roundtrip_through_transformers(qwen_sharded, tmp_path, shard_bytes):
    model, d = qwen_sharded
    cfg, params = load_hf_checkpoint(d, vocab_multiple=64)
    save_hf_checkpoint(params, cfg, tmp_path, vocab_size=500, max_shard_bytes=shard_bytes)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard_bytes)
    back = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path)).float()
    assert back.config.vocab_size == 500 and back.config.rope_parameters["rope_theta"] == 1e6
    ref = hf_numpy_state(model)
    got = hf_numpy_state(back)
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


# ----------------------------------------------------------------------------- errors

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_error_no_config(llama_tied, tmp_path):
    ck = _copy(llama_tied[1], tmp_path / "ck")
    (ck / "config.json").unlink()
    with pytest.raises(UserError, match=r"ck/config\.json: no config\.json"):
        load_hf_checkpoint(ck)


def test_error_unknown_architecture(llama_tied, tmp_path):
    ck = _copy(llama_tied[1], tmp_path / "ck")
    c = json.loads((ck / "config.json").read_text())
    c.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (ck / "config.json").write_text(json.dumps(c))
    with pytest.raises(UserError, match=r"config\.json: unsupported architecture.*mistral"):
        load_hf_checkpoint(ck)


def test_error_shape_mismatch(llama_tied, tmp_path):
    ck = _copy(llama_tied[1], tmp_path / "ck")
    t = load_safetensors(ck / "model.safetensors")
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:100]
    save_safetensors(t, ck / "model.safetensors")
    with pytest.raises(UserError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' "
                                        r"has shape \[100, 64\], expected \[128, 64\]"):
        load_hf_checkpoint(ck)


def test_error_missing_and_unexpected_tensor(llama_tied, tmp_path):
    ck = _copy(llama_tied[1], tmp_path / "ck")
    t = load_safetensors(ck / "model.safetensors")
    t["model.layers.2.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"]
    save_safetensors(t, ck / "model.safetensors")
    with pytest.raises(UserError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.2\.mlp"):
        load_hf_checkpoint(ck)
    del t["model.layers.2.mlp.up_proj.weight"], t["model.norm.weight"]
    save_safetensors(t, ck / "model.safetensors")
    with pytest.raises(UserError, match=r"model\.safetensors: missing tensor 'model\.norm\.weight'"):
        load_hf_checkpoint(ck)


def test_error_pickle_only(llama_tied, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    shutil.copy(llama_tied[1] / "config.json", ck)
    (ck / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UserError, match=r"pytorch_model\.bin: only pickle weights.*safetensors"):
        load_hf_checkpoint(ck)


def test_error_index_references_missing_shard(qwen_sharded, tmp_path):
    ck = _copy(qwen_sharded[1], tmp_path / "ck")
    victim = sorted(ck.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(UserError, match=rf"model\.safetensors\.index\.json: references shard '{victim.name}'"):
        load_hf_checkpoint(ck)


def test_error_truncated_file(llama_tied, tmp_path):
    ck = _copy(llama_tied[1], tmp_path / "ck")
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(UserError, match=r"model\.safetensors: tensor .*truncated file"):
        read_safetensors_header(ck / "model.safetensors")
