"""Every base parameter's name in each outside format, keyed by its Flax param path.

One table per format, beside the module tree that declares the parameters (`modules`). What a
tensor's shape is, and whether a configuration has it at all (q/k/v biases in Qwen2, lm_head
only when untied), is not restated here: `param_shapes` reads both from the declaration
(`decoder.init_params` under `jax.eval_shape`), and `weights.hf` / `weights.gguf` lay a
checkpoint out from the pair. Stacked layers have the path prefix 'layers' and '{i}' in their
outside name; kernels are stored [d_in, d_out] = the outside weight transposed.

Adding a family with new parameters (Qwen3's q/k norms, say) is: declare them in `modules`,
then give each a row in HF and GGUF below. A declared parameter without a row is an error at
load time, not a silently missing tensor.
"""

from __future__ import annotations

import functools

import jax

from socialalign_jax.model import decoder
from socialalign_jax.model.config import ModelConfig

Path = tuple[str, ...]

_HF_LAYER = "model.layers.{i}."

# Flax path -> Hugging Face safetensors name (Qwen2ForCausalLM / LlamaForCausalLM).
HF: dict[Path, str] = {
    ("embed", "embedding"): "model.embed_tokens.weight",
    ("layers", "input_norm", "scale"): _HF_LAYER + "input_layernorm.weight",
    ("layers", "attn", "q", "kernel"): _HF_LAYER + "self_attn.q_proj.weight",
    ("layers", "attn", "q", "bias"): _HF_LAYER + "self_attn.q_proj.bias",
    ("layers", "attn", "k", "kernel"): _HF_LAYER + "self_attn.k_proj.weight",
    ("layers", "attn", "k", "bias"): _HF_LAYER + "self_attn.k_proj.bias",
    ("layers", "attn", "v", "kernel"): _HF_LAYER + "self_attn.v_proj.weight",
    ("layers", "attn", "v", "bias"): _HF_LAYER + "self_attn.v_proj.bias",
    ("layers", "attn", "o", "kernel"): _HF_LAYER + "self_attn.o_proj.weight",
    ("layers", "post_attn_norm", "scale"): _HF_LAYER + "post_attention_layernorm.weight",
    ("layers", "mlp", "gate", "kernel"): _HF_LAYER + "mlp.gate_proj.weight",
    ("layers", "mlp", "up", "kernel"): _HF_LAYER + "mlp.up_proj.weight",
    ("layers", "mlp", "down", "kernel"): _HF_LAYER + "mlp.down_proj.weight",
    ("final_norm", "scale"): "model.norm.weight",
    ("lm_head", "kernel"): "lm_head.weight",
}

# Flax path -> GGUF tensor name (llama.cpp's names for the llama and qwen2 architectures).
GGUF: dict[Path, str] = {
    ("embed", "embedding"): "token_embd.weight",
    ("layers", "input_norm", "scale"): "blk.{i}.attn_norm.weight",
    ("layers", "attn", "q", "kernel"): "blk.{i}.attn_q.weight",
    ("layers", "attn", "q", "bias"): "blk.{i}.attn_q.bias",
    ("layers", "attn", "k", "kernel"): "blk.{i}.attn_k.weight",
    ("layers", "attn", "k", "bias"): "blk.{i}.attn_k.bias",
    ("layers", "attn", "v", "kernel"): "blk.{i}.attn_v.weight",
    ("layers", "attn", "v", "bias"): "blk.{i}.attn_v.bias",
    ("layers", "attn", "o", "kernel"): "blk.{i}.attn_output.weight",
    ("layers", "post_attn_norm", "scale"): "blk.{i}.ffn_norm.weight",
    ("layers", "mlp", "gate", "kernel"): "blk.{i}.ffn_gate.weight",
    ("layers", "mlp", "up", "kernel"): "blk.{i}.ffn_up.weight",
    ("layers", "mlp", "down", "kernel"): "blk.{i}.ffn_down.weight",
    ("final_norm", "scale"): "output_norm.weight",
    ("lm_head", "kernel"): "output.weight",
}


def peft_module(block: str, name: str) -> str:
    """The HF module path of an adapted linear map inside a layer ('self_attn.q_proj'): what
    PEFT's `target_modules` and its tensor names use (PEFT wraps the HF model, so it is HF's)."""
    hf = HF[("layers", block, name, "kernel")]
    return hf[len(_HF_LAYER):-len(".weight")]


def is_stacked(path: Path) -> bool:
    """Stacked over layers (leading axis L; one outside tensor per layer)."""
    return path[0] == "layers"


def is_kernel(path: Path) -> bool:
    """A linear map's kernel: ours [d_in, d_out], the outside weight [d_out, d_in]."""
    return path[-1] == "kernel"


@functools.lru_cache(maxsize=64)
def _shapes(cfg: ModelConfig) -> tuple[tuple[Path, tuple[int, ...]], ...]:
    abstract = jax.eval_shape(lambda: decoder.init_params(cfg, jax.random.PRNGKey(0)))
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return tuple((tuple(str(k.key) for k in path), tuple(leaf.shape)) for path, leaf in flat)


def param_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """{Flax path: our shape (stacked: [L, ...])} of every base parameter `cfg` declares."""
    return dict(_shapes(cfg))


def outside_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Our shape -> the shape of one outside tensor (per layer when stacked, transposed kernels)."""
    one = shape[1:] if is_stacked(path) else shape
    return one[::-1] if is_kernel(path) else one


def layout(cfg: ModelConfig, table: dict[Path, str]) -> list[tuple[Path, str, tuple[int, ...]]]:
    """[(Flax path, outside name with '{i}', our full shape)] of every parameter of `cfg`.

    Raises if the model declares a parameter the table has no name for.
    """
    out = []
    for path, shape in param_shapes(cfg).items():
        if path not in table:
            raise KeyError(f"parameter {'/'.join(path)} has no name in this format: add it to model/names.py")
        out.append((path, table[path], shape))
    return out
