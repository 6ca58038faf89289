"""model/names.py: one name table per outside format, keyed by the Flax path, checked against
the formats' own definitions.

References: the state_dict and module names of Hugging Face transformers' Qwen2ForCausalLM and
LlamaForCausalLM (PyTorch) built from the same configuration; llama.cpp's tensor names as the
`gguf` package defines them for the llama and qwen2 architectures; and the modules stock peft
wraps when given our target_modules.
"""

from __future__ import annotations

import pytest

from socialalign_jax.model import names
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import ALL_TARGETS, MODULE_BLOCK
from socialalign_jax.weights import hf as hf_io

CFGS = {
    "qwen2_tied": ModelConfig("qwen2", 96, 24, 40, 3, 4, 2, 6, tie_embeddings=True),
    "qwen2_untied": ModelConfig("qwen2", 96, 24, 40, 2, 4, 2, 6, tie_embeddings=False),
    "llama_untied": ModelConfig("llama", 96, 24, 40, 2, 4, 1, 6, qkv_bias=False, tie_embeddings=False),
    "llama_tied": ModelConfig("llama", 96, 24, 40, 2, 4, 2, 6, qkv_bias=False, tie_embeddings=True),
}


def _hf_model(cfg):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = hf_io.to_hf_config(cfg)
    cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[cfg.family]
    conf = cls[0](**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    return cls[1](conf)


def _ours(cfg, table):
    out = {}
    for path, name, shape in names.layout(cfg, table):
        one = names.outside_shape(path, shape)
        for i in range(cfg.num_layers if names.is_stacked(path) else 1):
            out[name.format(i=i)] = one
    return out


@pytest.mark.parametrize("name", sorted(CFGS))
def test_hf_table_names_every_tensor_transformers_has(name):
    """Our names and shapes for cfg == the state_dict of HF's model for the same config.json."""
    cfg = CFGS[name]
    model = _hf_model(cfg)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:  # HF lists the tied head under its own name as well
        theirs.pop("lm_head.weight", None)
    theirs = {k: v for k, v in theirs.items() if "rotary_emb" not in k}
    assert _ours(cfg, names.HF) == theirs


def test_every_table_row_is_a_parameter_of_some_configuration():
    declared = set()
    for cfg in CFGS.values():
        declared |= set(names.param_shapes(cfg))
    assert set(names.HF) == declared
    assert set(names.GGUF) == declared


@pytest.mark.parametrize("arch", ["LLAMA", "QWEN2"])
def test_gguf_table_uses_llama_cpp_names(arch):
    gguf = pytest.importorskip("gguf")
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[getattr(gguf.MODEL_ARCH, arch)]}
    for path, name in names.GGUF.items():
        base, _, kind = name.rpartition(".")
        assert kind in ("weight", "bias"), name
        assert base.replace("{i}", "{bid}") in allowed, (arch, path, name)


def test_peft_modules_are_the_hf_linear_maps_with_our_dims():
    """What stock peft adapts for each target is the HF nn.Linear of the same (d_in, d_out)."""
    torch = pytest.importorskip("torch")
    cfg = CFGS["qwen2_untied"]
    modules = dict(_hf_model(cfg).named_modules())
    dims = cfg.module_dims()
    for t in ALL_TARGETS:
        mod = modules["model.layers.1." + names.peft_module(MODULE_BLOCK[t], t)]
        assert isinstance(mod, torch.nn.Linear)
        assert (mod.in_features, mod.out_features) == dims[(MODULE_BLOCK[t], t)]


def test_a_parameter_without_a_name_is_refused():
    cfg = CFGS["qwen2_untied"]
    table = {k: v for k, v in names.HF.items() if k != ("final_norm", "scale")}
    with pytest.raises(KeyError, match="final_norm/scale has no name"):
        names.layout(cfg, table)
