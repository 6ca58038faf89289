"""Read and write Hugging Face Qwen2/Llama checkpoints (config.json + safetensors) as our param tree.

Why our own safetensors reader: safetensors' numpy backend cannot return bfloat16 (the
dtype of every released Qwen2.5 checkpoint), and we want to copy one layer at a time
out of a memory map so host memory never holds two full copies of a 7B model. The file
format is a little-endian u64 header length, a JSON header with byte offsets, and the
raw tensor bytes; we read exactly that and never touch pickle files.

Loading fills each stacked [L, ...] tensor layer by layer into one preallocated buffer,
moves it to its device sharding as soon as it is complete, and drops the buffer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from socialalign_jax.core.errors import UserError
from socialalign_jax.model import names
from socialalign_jax.model.config import ModelConfig, as_dtype

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")

_ST_TO_NP = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}
_FLOAT_ST = {"F64", "F32", "F16", "BF16"}
_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                np.dtype(ml_dtypes.bfloat16): "bfloat16"}
# Derived RoPE buffers some older checkpoints store; recomputed from rope_theta, never needed.
_IGNORED = re.compile(r"^model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")


# --------------------------------------------------------------------------- safetensors I/O

@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live: enough to memory-map it without reading the file."""
    file: Path
    dtype: str      # safetensors code, e.g. 'BF16'
    shape: tuple[int, ...]
    begin: int      # absolute byte offset in the file
    end: int


def read_safetensors_header(file: str | os.PathLike) -> dict[str, TensorRef]:
    """Parse and validate a safetensors header; errors name the file."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise UserError(f"{file}: not a safetensors file (shorter than 8 bytes)")
            n = int.from_bytes(raw_len, "little")
            if n > size - 8:
                raise UserError(f"{file}: corrupt safetensors header (length {n} exceeds file size {size})")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise UserError(f"{file}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{file}: corrupt safetensors header (not a JSON object)")
    base, data_len, refs = 8 + n, size - 8 - n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{file}: corrupt safetensors header entry for tensor {name!r}") from None
        if dtype not in _ST_TO_NP:
            raise UserError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        nbytes = math.prod(shape) * _ST_TO_NP[dtype].itemsize
        if not (0 <= begin <= end <= data_len) or end - begin != nbytes:
            raise UserError(f"{file}: tensor {name!r} has byte range [{begin}, {end}) inconsistent with "
                            f"dtype {dtype} shape {list(shape)} and data size {data_len} (truncated file?)")
        refs[name] = TensorRef(file, dtype, shape, base + begin, base + end)
    return refs


class _MappedFiles:
    """One read-only memory map per shard, opened on first use (pages are reclaimable)."""

    def __init__(self):
        self._maps: dict[Path, np.memmap] = {}

    def read(self, ref: TensorRef) -> np.ndarray:
        """A zero-copy view of the tensor (bfloat16 via ml_dtypes)."""
        mm = self._maps.get(ref.file)
        if mm is None:
            mm = self._maps[ref.file] = np.memmap(ref.file, dtype=np.uint8, mode="r")
        return mm[ref.begin:ref.end].view(_ST_TO_NP[ref.dtype]).reshape(ref.shape)

    def close(self):
        self._maps.clear()


def load_safetensors(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a whole safetensors file into numpy arrays (bfloat16 as ml_dtypes.bfloat16)."""
    files = _MappedFiles()
    try:
        return {k: np.array(files.read(r)) for k, r in read_safetensors_header(file).items()}
    finally:
        files.close()


def save_safetensors(tensors: Mapping[str, np.ndarray], file: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file (any of our dtypes, bfloat16 included), one tensor at a time."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset, arrays = 0, []
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if a.dtype not in _NP_TO_ST:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _NP_TO_ST[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for a in arrays:
            f.write(np.ascontiguousarray(a).tobytes())


# --------------------------------------------------------------------------- checkpoint layout

@dataclasses.dataclass(frozen=True)
class _Entry:
    """One param leaf and the HF tensor(s) it comes from."""
    path: tuple[str, ...]               # path in our param tree
    hf_name: str                        # HF tensor name, with '{i}' for the layer index if stacked
    hf_shape: tuple[int, ...]           # PyTorch shape of one (per-layer) tensor
    transpose: bool                     # kernel [d_in, d_out] = weight.T
    stacked: bool


def _layout(cfg: ModelConfig) -> list[_Entry]:
    """Every tensor a checkpoint for `cfg` must hold (real vocab size, no padding): the model's
    declared parameters (`model.names.param_shapes`) under their HF names (`model.names.HF`)."""
    return [_Entry(path, name, names.outside_shape(path, shape), names.is_kernel(path), names.is_stacked(path))
            for path, name, shape in names.layout(cfg, names.HF)]


def _hf_names(entry: _Entry, num_layers: int) -> list[str]:
    return [entry.hf_name.format(i=i) for i in range(num_layers)] if entry.stacked else [entry.hf_name]


def padded_vocab(vocab_size: int, multiple: int | None) -> int:
    """Vocab size rounded up to `multiple` (so V shards evenly over the tensor axis)."""
    if not multiple or multiple <= 1:
        return vocab_size
    return -(-vocab_size // multiple) * multiple


def _normalise_hf_config(hf: dict) -> dict:
    """transformers >= 5 writes RoPE settings under `rope_parameters` instead of top-level
    `rope_theta`/`rope_scaling`; fold them back so ModelConfig.from_hf sees one spelling
    (and still rejects non-default RoPE types)."""
    rp = hf.get("rope_parameters")
    if not isinstance(rp, dict):
        return hf
    hf = dict(hf)
    if "rope_theta" in rp:
        hf.setdefault("rope_theta", rp["rope_theta"])
    if (rp.get("rope_type") or rp.get("type")) not in (None, "default") and not hf.get("rope_scaling"):
        hf["rope_scaling"] = rp
    return hf


def read_config(path: str | os.PathLike, **overrides) -> tuple[ModelConfig, dict]:
    """ModelConfig (real vocab, checkpoint dtype) and the raw config.json dict of a checkpoint dir."""
    path = Path(path)
    cfile = path / CONFIG_NAME
    if not path.is_dir():
        raise UserError(f"{path}: checkpoint directory does not exist")
    if not cfile.is_file():
        raise UserError(f"{cfile}: no config.json in checkpoint directory {path}")
    try:
        hf = json.loads(cfile.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{cfile}: cannot parse config.json ({e})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{cfile}: config.json is not a JSON object")
    hf = _normalise_hf_config(hf)
    family = hf.get("model_type")
    if hf.get("use_sliding_window"):
        raise UserError(f"{cfile}: use_sliding_window=true is not supported (full attention only)")
    if family == "llama" and hf.get("mlp_bias"):
        raise UserError(f"{cfile}: mlp_bias=true is not supported (the param tree has no MLP biases)")
    if family == "llama" and hf.get("attention_bias"):
        raise UserError(f"{cfile}: Llama attention_bias=true is not supported (it adds an o_proj bias "
                        "the param tree does not have)")
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    name = name if name in ("float32", "bfloat16", "float16") else "float32"
    kw = {"param_dtype": name, "dtype": name, **overrides}
    try:
        cfg = ModelConfig.from_hf(hf, **kw)
    except KeyError as e:
        raise UserError(f"{cfile}: missing field {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"{cfile}: {e}") from None
    return cfg, hf


def _index_checkpoint(path: Path) -> tuple[dict[str, TensorRef], Path]:
    """Map every tensor name to its bytes, from a single file or a sharded index; also the
    file that lists the tensors (named in 'missing tensor' errors)."""
    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index}: malformed safetensors index ({e})") from None
        refs: dict[str, TensorRef] = {}
        headers: dict[str, dict[str, TensorRef]] = {}
        for name, shard in weight_map.items():
            if shard not in headers:
                sfile = path / shard
                if not sfile.is_file():
                    raise UserError(f"{index}: references shard {shard!r} (for tensor {name!r}) "
                                    "which does not exist")
                headers[shard] = read_safetensors_header(sfile)
            if name not in headers[shard]:
                raise UserError(f"{index}: tensor {name!r} is listed in shard {shard!r} but that file lacks it")
            refs[name] = headers[shard][name]
        for shard, hdr in headers.items():  # a tensor present in a shard but not in the index
            for name in hdr:
                if name not in refs:
                    raise UserError(f"{path / shard}: tensor {name!r} is not listed in {INDEX_FILE}")
        return refs, index
    if single.is_file():
        return read_safetensors_header(single), single
    pickles = [p for p in PICKLE_FILES if (path / p).exists()]
    if pickles:
        raise UserError(f"{path / pickles[0]}: only pickle weights found; pickle files are never loaded "
                        "(they can run arbitrary code). Convert the checkpoint to safetensors, e.g. "
                        "model.save_pretrained(dir, safe_serialization=True) in a trusted environment")
    raise UserError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} in checkpoint directory")


def _check_tensors(refs: Mapping[str, TensorRef], source: Path, cfg: ModelConfig,
                   files: _MappedFiles) -> None:
    """Missing, unexpected, misshaped or non-float tensors: one precise error each."""
    expected: dict[str, tuple[int, ...]] = {}
    for e in _layout(cfg):
        for n in _hf_names(e, cfg.num_layers):
            expected[n] = e.hf_shape
    for name, shape in expected.items():
        if name not in refs:
            raise UserError(f"{source}: missing tensor {name!r} (expected shape {list(shape)})")
        ref = refs[name]
        if ref.shape != shape:
            raise UserError(f"{ref.file}: tensor {name!r} has shape {list(ref.shape)}, expected {list(shape)}")
        if ref.dtype not in _FLOAT_ST:
            raise UserError(f"{ref.file}: tensor {name!r} has dtype {ref.dtype}, expected a float type")
    for name, ref in refs.items():
        if name in expected or _IGNORED.match(name):
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            emb = refs["model.embed_tokens.weight"]
            if ref.shape != emb.shape or not np.array_equal(files.read(ref), files.read(emb)):
                raise UserError(f"{ref.file}: tensor 'lm_head.weight' differs from model.embed_tokens.weight "
                                "but config.json says tie_word_embeddings=true")
            continue
        raise UserError(f"{ref.file}: unexpected tensor {name!r} (not part of a {cfg.family} model "
                        f"with this config.json)")


# --------------------------------------------------------------------------- loading

def check_hf_checkpoint(path: str | os.PathLike) -> ModelConfig:
    """Validate config.json and every tensor's name/shape/dtype from the headers alone (no
    weights are read except a tied lm_head to compare): lets a CLI fail in a second, before it
    loads a tokenizer or gigabytes of weights. Returns the real-vocab ModelConfig."""
    cfg, _ = read_config(path)
    refs, source = _index_checkpoint(Path(path))
    files = _MappedFiles()
    try:
        _check_tensors(refs, source, cfg, files)
    finally:
        files.close()
    return cfg


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _placer(mesh, shardings) -> Callable[[tuple[str, ...], np.ndarray], jax.Array]:
    """How a finished host buffer becomes a (possibly sharded, possibly multi-host) jax.Array."""
    def place(path, buf):
        if shardings is not None:
            sharding = _lookup(shardings, path)
        elif mesh is not None:
            sharding = NamedSharding(mesh, PartitionSpec())
        else:
            return jax.device_put(buf)
        # Each process supplies only its addressable shards: works the same on one host or many.
        return jax.make_array_from_callback(buf.shape, sharding, lambda idx: buf[idx])
    return place


def load_hf_checkpoint(path: str | os.PathLike, *, dtype: Any = None, mesh=None, shardings=None,
                       vocab_multiple: int | None = None) -> tuple[ModelConfig, dict]:
    """Load a local HF Qwen2/Llama checkpoint directory into (ModelConfig, params).

    dtype: parameter (and compute) dtype; None keeps config.json's dtype (or the older torch_dtype;
    float32 if absent).
    mesh / shardings: a pytree of Shardings shaped like params places every tensor as soon as
      it is read (a mesh alone replicates); neither puts everything on the default device.
    vocab_multiple: pad V up to a multiple (zero rows); the returned cfg has the padded
      vocab_size; `read_config(path)[0].vocab_size` (or `real_vocab_size` on the cfg, if the
      config class has that field) is the real one: mask logits beyond it (`mask_padded_vocab`).
    """
    path = Path(path)
    overrides = {}
    if dtype is not None:
        name = _DTYPE_NAMES.get(np.dtype(as_dtype(dtype)))
        if name is None:
            raise UserError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
        overrides = {"param_dtype": name, "dtype": name}
    cfg, _ = read_config(path, **overrides)
    refs, source = _index_checkpoint(path)
    files = _MappedFiles()
    try:
        _check_tensors(refs, source, cfg, files)
        target = np.dtype(as_dtype(cfg.param_dtype))
        vpad = padded_vocab(cfg.vocab_size, vocab_multiple)
        place = _placer(mesh, shardings)
        params: dict = {}
        for e in _layout(cfg):
            names = _hf_names(e, cfg.num_layers)
            one = e.hf_shape[::-1] if e.transpose else e.hf_shape
            if e.path[0] in ("embed", "lm_head") and vpad != cfg.vocab_size:
                vax = 1 if e.transpose else 0  # V is the last axis of lm_head's [D, V] kernel
                one = tuple(vpad if a == vax else s for a, s in enumerate(one))
            buf = np.zeros(((len(names),) if e.stacked else ()) + one, target)
            for i, n in enumerate(names):
                src = files.read(refs[n])
                src = src.T if e.transpose else src
                dst = buf[i] if e.stacked else buf
                dst[tuple(slice(0, s) for s in src.shape)] = src  # casts; padded rows stay 0
            _set(params, e.path, place(e.path, buf))
            del buf
    finally:
        files.close()
    out = cfg.replace(vocab_size=vpad)
    if "real_vocab_size" in {f.name for f in dataclasses.fields(ModelConfig)}:
        out = out.replace(real_vocab_size=cfg.vocab_size)
    return out, params


def mask_padded_vocab(logits, real_vocab_size: int):
    """Logits [..., V_padded] with padded vocab entries set to the dtype's minimum."""
    import jax.numpy as jnp
    v = logits.shape[-1]
    if v == real_vocab_size:
        return logits
    keep = jnp.arange(v) < real_vocab_size
    return jnp.where(keep, logits, jnp.finfo(logits.dtype).min)


# --------------------------------------------------------------------------- export

def to_hf_config(cfg: ModelConfig, vocab_size: int | None = None, token_ids: Mapping[str, int] | None = None) -> dict:
    """A config.json dict that transformers' Qwen2/Llama classes (and our from_hf) read back.

    Current key names ("dtype", not the deprecated "torch_dtype"); token_ids adds
    bos_token_id / eos_token_id / pad_token_id (from the tokenizer, when the caller has one).
    """
    arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[cfg.family]
    hf = {
        "architectures": [arch], "model_type": cfg.family,
        "vocab_size": vocab_size or cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu", "dtype": cfg.param_dtype, **(token_ids or {}),
    }
    if cfg.family == "llama":
        if cfg.qkv_bias:
            raise ValueError("Llama with q/k/v bias only has no HF equivalent (HF adds an o_proj bias too)")
        hf.update(attention_bias=False, mlp_bias=False)
    return hf


def hf_state_dict(params: Mapping, cfg: ModelConfig, vocab_size: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy array in PyTorch layout) for every tensor, one at a time (host memory)."""
    v = vocab_size or cfg.vocab_size
    for e in _layout(cfg.replace(vocab_size=v)):
        leaf = _lookup(params, e.path)
        for i, n in enumerate(_hf_names(e, cfg.num_layers)):
            a = np.asarray(jax.device_get(leaf[i] if e.stacked else leaf))
            a = a.T if e.transpose else a
            if e.path[0] in ("embed", "lm_head"):
                a = a[:v]  # drop vocab padding
            yield n, np.ascontiguousarray(a)


def save_hf_checkpoint(params: Mapping, cfg: ModelConfig, path: str | os.PathLike, *,
                       vocab_size: int | None = None, max_shard_bytes: int | None = None,
                       token_ids: Mapping[str, int] | None = None) -> None:
    """Write params as an HF checkpoint (config.json + safetensors, sharded with an index if
    `max_shard_bytes` is set). vocab_size: the real vocab when params carry padding rows;
    token_ids: bos/eos/pad ids for config.json.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, list[str], int]] = []  # (temporary file, names, bytes)
    shard: dict[str, np.ndarray] = {}

    def flush():
        tmp = path / f".shard-{len(written):05d}.safetensors.tmp"
        save_safetensors(shard, tmp)
        written.append((tmp, list(shard), sum(a.nbytes for a in shard.values())))
        shard.clear()

    size = 0  # host memory holds at most one shard at a time
    for name, a in hf_state_dict(params, cfg, vocab_size):
        if max_shard_bytes and shard and size + a.nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = a
        size += a.nbytes
    flush()
    for stale in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # a leftover layout would shadow or mix with the new one
    if len(written) == 1:
        written[0][0].replace(path / SINGLE_FILE)
    else:
        weight_map = {}
        for k, (tmp, names, _) in enumerate(written):
            fname = f"model-{k + 1:05d}-of-{len(written):05d}.safetensors"
            tmp.replace(path / fname)
            weight_map.update({n: fname for n in names})
        total = sum(b for _, _, b in written)
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                   "weight_map": weight_map}, indent=2))
    (path / CONFIG_NAME).write_text(json.dumps(to_hf_config(cfg, vocab_size, token_ids), indent=2))
