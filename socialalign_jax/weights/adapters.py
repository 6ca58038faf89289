"""Adapter files: our safetensors layout, the original SocialAlign layout, and stock PEFT LoRA.

Three layouts, all safetensors only (no pickle is ever read):

- ours: the adapter tree of docs/DESIGN.md flattened with '/'-joined keys
  ('layers/attn/q/A' -> [L, Ea, d_in, r], 'head/kernel' -> [D, K], ...), with a JSON header
  holding the LoraConfig and the model dimensions, so a file is self-describing and is
  checked against the model it is applied to;
- socialalign, the original fork's layout (SPEC section 2): one tensor per layer, module and
  expert, 'base_model.model.model.layers.{i}.{self_attn|mlp}.{q_proj|...}.{lora_A|lora_A1|...
  |lora_A_gate_dense1|...}.default.weight' in PyTorch [out, in] layout, plus an
  adapter_config.json. Only the authors' patched PEFT reads it; stock PEFT loads it without an
  error but computes other outputs (it has no experts or gates), so it is never called 'peft'
  here, and launch/export.py says so when it writes one;
- peft, the stock PEFT LoRA layout: '...{q_proj|...}.lora_A.weight' [r, d_in] and
  '...lora_B.weight' [d_out, r], a stock adapter_config.json (base_model_name_or_path included,
  no custom entries), loadable by stock `peft` under any adapter name. It holds a fixed rank-r
  LoRA, so it is written only for adapters whose gate weights do not depend on the input
  (plain LoRA, or 'uniform' routing, whose experts average into one pair).

The sentiment head is part of neither PyTorch layout; it travels beside them as our-layout
'sentiment_head.safetensors'. Every problem with a file raises AdapterError naming the file,
the key and expected vs found.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from socialalign_jax.core.atomic_io import write_bytes, write_json
from socialalign_jax.core.errors import UserError
from socialalign_jax.model import names, pac_lora
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.decoder import init_adapters
from socialalign_jax.model.pac_lora import ALL_TARGETS, MODULE_BLOCK, LoraConfig

FORMAT = "socialalign-adapters/1"
OUR_FILE = "adapters.safetensors"
PEFT_FILE = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
HEAD_FILE = "sentiment_head.safetensors"
PEFT_PREFIX = "base_model.model.model.layers."
# target -> (HF block, HF projection) of the module PEFT adapts, from the HF name table.
PEFT_MODULE = {t: tuple(names.peft_module(MODULE_BLOCK[t], t).split(".")) for t in ALL_TARGETS}
_FROM_PEFT = {proj: (block, name) for name, (block, proj) in PEFT_MODULE.items()}
_PEFT_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\."
    r"(lora_[AB]\d*|lora_[AB]_gate_dense[12])(\.default)?\.weight$")
_DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}


def _write_safetensors(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str]) -> None:
    """safetensors' own serialisation (byte for byte what `safetensors.numpy.save_file` writes), written
    through atomic_io: whole or not at all, with the umask's mode (save_file creates files 0600), and a
    full disk as one line."""
    write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


class AdapterError(UserError):
    """An adapter file that does not match its format or the model it is applied to."""


def input_dependent_gates(lc: LoraConfig) -> list[str]:
    """The gates whose mixing weights depend on the input (they read the user/news spans).

    Empty when the adapter is one fixed rank-r LoRA per module: a side with one expert (its
    softmax is 1) or an ungated side (1/E each). The one rule behind 'can be merged', 'can be
    written as stock PEFT' and 'needs spans to be scored'.
    """
    if not lc.targets:
        return []
    out = []
    if lc.gated_a and lc.num_analyze > 1:
        out.append(f"gate_a mixes {lc.num_analyze} analyze experts")
    if lc.gated_b and lc.num_compose > 1:
        out.append(f"gate_b mixes {lc.num_compose} compose experts")
    return out


def fixed_lora(module_adapter: dict) -> tuple[np.ndarray, np.ndarray]:
    """(A [L, d_in, r], B [L, r, d_out]) float32 of a module whose gates are input-independent.

    The gate weight is 1/E on an ungated side and 1 on a single-expert side, so the mix is the
    expert mean either way: delta = s x mean_i(A_i) mean_j(B_j). Callers check
    input_dependent_gates first.
    """
    a, b = pac_lora.fixed_factors(module_adapter)
    return np.asarray(a), np.asarray(b)


# ----------------------------------------------------------------------------- helpers


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def expected_shapes(model_cfg: ModelConfig, lc: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Flat key -> shape of the adapter tree `init_adapters` would build (no compute)."""
    tree = jax.eval_shape(lambda: init_adapters(jax.random.PRNGKey(0), model_cfg, lc))
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def _model_dims(cfg: ModelConfig) -> dict:
    return {"family": cfg.family, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "q_dim": cfg.q_dim, "kv_dim": cfg.kv_dim}


def _lora_to_json(lc: LoraConfig) -> str:
    d = dataclasses.asdict(lc)
    d["targets"] = list(d["targets"])
    return json.dumps(d, sort_keys=True)


def _lora_from_json(text: str, where: str) -> LoraConfig:
    try:
        d = json.loads(text)
        d["targets"] = tuple(d["targets"])
        return LoraConfig(**d)
    except (ValueError, TypeError, KeyError) as e:
        raise AdapterError(f"{where}: metadata field 'lora_config' is invalid ({e})") from None


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if not path.is_file():
        raise AdapterError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, meta


def _check_shapes(flat: dict, want: dict, where: Path, hint: str = ""):
    for k in sorted(want):
        if k not in flat:
            raise AdapterError(f"{where}: missing key '{k}' (expected shape {want[k]}){hint}")
        if tuple(flat[k].shape) != want[k]:
            raise AdapterError(f"{where}: key '{k}': expected shape {want[k]}, found {tuple(flat[k].shape)}{hint}")
    extra = sorted(set(flat) - set(want))
    if extra:
        raise AdapterError(f"{where}: unexpected key '{extra[0]}'{hint}")


def _as_f32(a: np.ndarray, where: Path, key: str) -> np.ndarray:
    if a.dtype not in (np.float32, np.float16, np.dtype(jax.numpy.bfloat16), np.float64):
        raise AdapterError(f"{where}: key '{key}': expected a floating tensor, found dtype {a.dtype}")
    return np.asarray(a, np.float32)


# ----------------------------------------------------------------------------- our layout


def save_adapters(adapters: dict, lora_cfg: LoraConfig, model_cfg: ModelConfig, path) -> Path:
    """Write the adapter tree (float32) with its LoraConfig and model dims; a directory gets adapters.safetensors."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / OUR_FILE
    flat = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flatten(adapters).items()}
    _check_shapes(flat, expected_shapes(model_cfg, lora_cfg), path, " (adapters do not match lora_cfg/model_cfg)")
    meta = {"format": FORMAT, "lora_config": _lora_to_json(lora_cfg),
            "model_dims": json.dumps(_model_dims(model_cfg), sort_keys=True)}
    _write_safetensors(flat, str(path), metadata=meta)
    return path


def load_adapters(path, model_cfg: ModelConfig | None = None) -> tuple[dict, LoraConfig]:
    """Read adapters in either layout -> (adapter tree of float32 numpy arrays, LoraConfig).

    Our layout (a file, or a directory holding adapters.safetensors) is checked against
    model_cfg when given. A file or directory in the original PEFT layout is handed to
    `import_peft` (which needs model_cfg).
    """
    path = Path(path)
    if path.is_dir():
        if (path / OUR_FILE).is_file():
            path = path / OUR_FILE
        elif (path / PEFT_FILE).is_file():
            return import_peft(path, _need_cfg(model_cfg, path))
        else:
            raise AdapterError(f"{path}: directory holds neither {OUR_FILE} nor {PEFT_FILE}")
    tensors, meta = _read_safetensors(path)
    if meta.get("format") != FORMAT:
        if any(k.startswith(PEFT_PREFIX) for k in tensors):
            return import_peft(path, _need_cfg(model_cfg, path))
        raise AdapterError(f"{path}: metadata field 'format' is {meta.get('format')!r}, expected {FORMAT!r} "
                           f"(or PEFT keys '{PEFT_PREFIX}...')")
    lc = _lora_from_json(meta.get("lora_config", ""), str(path))
    try:
        dims = json.loads(meta.get("model_dims", ""))
    except ValueError:
        raise AdapterError(f"{path}: metadata field 'model_dims' is not JSON") from None
    if model_cfg is not None:
        have = _model_dims(model_cfg)
        for k, v in dims.items():
            if k != "family" and have.get(k) != v:
                raise AdapterError(f"{path}: adapters were made for {k} = {v}, the model has {have.get(k)}")
        want = expected_shapes(model_cfg, lc)
    else:
        want = {k: tuple(v.shape) for k, v in tensors.items()}
    flat = {k: _as_f32(v, path, k) for k, v in tensors.items()}
    _check_shapes(flat, want, path)
    return unflatten(flat), lc


def _need_cfg(model_cfg, path):
    if model_cfg is None:
        raise AdapterError(f"{path}: reading the original (PEFT) layout needs the model config")
    return model_cfg


# ----------------------------------------------------------------------------- original layout


def _expert_name(kind: str, i: int) -> str:
    return f"lora_{kind}" if i == 0 else f"lora_{kind}{i}"


def peft_key(layer: int, target: str, name: str, suffix: str = ".default.weight") -> str:
    block, proj = PEFT_MODULE[target]
    return f"{PEFT_PREFIX}{layer}.{block}.{proj}.{name}{suffix}"


def _resolve_peft(path: Path) -> tuple[Path, Path]:
    """(tensor file, directory holding adapter_config.json / sentiment_head.safetensors)."""
    if path.suffix == ".safetensors":
        return path, path.parent
    if path.is_dir() and not (path / PEFT_FILE).is_file():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        extra = f" ({', '.join(pickled)} is a pickle; convert it to safetensors)" if pickled else ""
        raise AdapterError(f"{path}: no {PEFT_FILE}{extra}")
    return path / PEFT_FILE, path


def _export_target(path, dtype: str) -> Path:
    """The .safetensors file an export writes (a directory gets PEFT_FILE), after checking dtype."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / PEFT_FILE
    if dtype not in _DTYPES:
        raise AdapterError(f"unknown export dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return path


def export_socialalign(adapters: dict, lora_cfg: LoraConfig, model_cfg: ModelConfig, path, *,
                       suffix: str = ".default.weight", dtype: str = "float32") -> Path:
    """Write the original SocialAlign layout (experts and gates): tensor file + adapter_config.json
    (+ sentiment_head.safetensors). Not stock PEFT: see export_peft for that.

    path: a directory (gets adapter_model.safetensors) or a .safetensors file name.
    Transposes are exact, so import_peft(export_socialalign(x)) == x bit for bit in float32.
    """
    path = _export_target(path, dtype)
    np_dt = _DTYPES[dtype]
    lc = lora_cfg
    _check_shapes({k: np.asarray(v) for k, v in flatten(adapters).items()}, expected_shapes(model_cfg, lc),
                  path, " (adapters do not match lora_cfg/model_cfg)")
    out: dict[str, np.ndarray] = {}

    def put(layer, target, name, arr):  # arr in our [in, out] layout -> PyTorch [out, in]
        out[peft_key(layer, target, name, suffix)] = np.ascontiguousarray(np.asarray(arr, np.float32).T).astype(np_dt)

    for target in lc.targets:
        ad = adapters["layers"][MODULE_BLOCK[target]][target]
        for layer in range(model_cfg.num_layers):
            for i in range(lc.num_analyze):
                put(layer, target, _expert_name("A", i), ad["A"][layer, i])         # [r, d_in]
            for j in range(lc.num_compose):
                put(layer, target, _expert_name("B", j), ad["B"][layer, j])         # [d_out, r]
            for kind, gate in (("A", "gate_a"), ("B", "gate_b")):
                put(layer, target, f"lora_{kind}_gate_dense1", ad[gate]["w1"][layer])  # [G, d_in]
                put(layer, target, f"lora_{kind}_gate_dense2", ad[gate]["w2"][layer])  # [E, G]
    _write_safetensors(out, str(path), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lc.rank, "lora_alpha": lc.alpha,
        "lora_dropout": lc.dropout, "use_rslora": lc.rslora, "bias": "none",
        "target_modules": [PEFT_MODULE[t][1] for t in lc.targets],
        "socialalign": {"num_analyze": lc.num_analyze, "num_compose": lc.num_compose,
                        "gate_width": lc.gate_width, "routing": lc.routing},
    }
    write_json(config, str(path.parent / PEFT_CONFIG), indent=2, sort_keys=True)
    if "head" in adapters:
        save_adapters_head(adapters["head"], path.parent / HEAD_FILE)
    return path


def export_peft(adapters: dict, lora_cfg: LoraConfig, model_cfg: ModelConfig, path, *,
                base_model_name_or_path: str | None = None, dtype: str = "float32") -> Path:
    """Write the stock PEFT LoRA layout (+ sentiment_head.safetensors beside it).

    Keys '{prefix}{i}.{self_attn|mlp}.{proj}.lora_A.weight' [r, d_in] and '.lora_B.weight'
    [d_out, r] (what stock PEFT saves: no adapter name, no gates), and a stock
    adapter_config.json. Refused, naming the 'socialalign' format, when a gate's weights
    depend on the input: stock LoRA has no experts or gates to hold them.
    """
    why = peft_refusal(lora_cfg)
    if why:
        raise AdapterError(f"stock PEFT LoRA cannot hold these adapters: {why}")
    path = _export_target(path, dtype)
    _check_shapes({k: np.asarray(v) for k, v in flatten(adapters).items()}, expected_shapes(model_cfg, lora_cfg),
                  path, " (adapters do not match lora_cfg/model_cfg)")
    out: dict[str, np.ndarray] = {}
    for target in lora_cfg.targets:
        a, b = fixed_lora(adapters["layers"][MODULE_BLOCK[target]][target])  # [L, d_in, r], [L, r, d_out]
        for layer in range(model_cfg.num_layers):
            for name, arr in (("lora_A", a[layer]), ("lora_B", b[layer])):  # PyTorch [out, in]
                out[peft_key(layer, target, name, ".weight")] = np.ascontiguousarray(arr.T).astype(_DTYPES[dtype])
    _write_safetensors(out, str(path), metadata={"format": "pt"})
    write_json(stock_peft_config(lora_cfg, base_model_name_or_path), str(path.parent / PEFT_CONFIG))
    if "head" in adapters:
        save_adapters_head(adapters["head"], path.parent / HEAD_FILE)
    return path


def peft_refusal(lc: LoraConfig) -> str | None:
    """Why these adapters cannot be written as stock PEFT LoRA, or None. Stock PEFT has no layout for them
    at all: the reason names this project's layout and the authors' one, and how to train a run that
    stock PEFT can load."""
    gated = input_dependent_gates(lc)
    if not gated:
        return None
    return (f"routing {lc.routing!r}: " + " and ".join(gated) + " with weights that depend on the user/news "
            "spans, which stock PEFT LoRA cannot hold; for stock PEFT train plain LoRA (--config.lora.num_analyze=1 "
            "--config.lora.num_compose=1) or --config.lora.routing=uniform; --format safetensors keeps these "
            "adapters for this project, --format socialalign for the authors' patched PEFT")


def stock_peft_config(lc: LoraConfig, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json as stock PEFT's LoraConfig.save_pretrained writes it, for a LoRA on lc's targets."""
    return {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layers_pattern": None, "layers_to_transform": None, "lora_alpha": lc.alpha, "lora_dropout": lc.dropout,
        "modules_to_save": None, "peft_type": "LORA", "r": lc.rank, "rank_pattern": {}, "revision": None,
        "target_modules": sorted(PEFT_MODULE[t][1] for t in lc.targets), "task_type": "CAUSAL_LM",
        "use_dora": False, "use_rslora": lc.rslora,
    }


def save_adapters_head(head: dict, path) -> None:
    _write_safetensors({f"head/{k}": np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in head.items()},
                       str(path), metadata={"format": FORMAT + "+head"})


def _parse_peft_keys(tensors: dict, where: Path, num_layers: int) -> dict[str, dict[int, dict[str, tuple]]]:
    """{target: {layer: {name: (key, array)}}}; any other key is an error."""
    found: dict[str, dict[int, dict[str, tuple]]] = {}
    for key, arr in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise AdapterError(
                f"{where}: unexpected key '{key}' (expected '{PEFT_PREFIX}{{i}}.{{self_attn|mlp}}.{{module}}_proj."
                "{lora_A|lora_A1|...|lora_B|...|lora_A_gate_dense1|...}[.default].weight')")
        layer, block, proj, name = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if proj not in _FROM_PEFT or _FROM_PEFT[proj][0] != block:
            raise AdapterError(f"{where}: key '{key}': unknown module '{block}.{proj}'")
        if layer >= num_layers:
            raise AdapterError(f"{where}: key '{key}': layer {layer} but the model has {num_layers} layers")
        slot = found.setdefault(_FROM_PEFT[proj][1], {}).setdefault(layer, {})
        if name in slot:
            raise AdapterError(f"{where}: key '{key}' duplicates '{slot[name][0]}'")
        slot[name] = (key, arr)
    if not found:
        raise AdapterError(f"{where}: no adapter tensors")
    return found


def _count_experts(names, kind: str, where: Path, key_hint: str) -> int:
    idx = sorted(0 if n == f"lora_{kind}" else int(n[len(f"lora_{kind}"):])
                 for n in names if re.fullmatch(rf"lora_{kind}\d*", n))
    if not idx or idx != list(range(len(idx))):
        missing = next(i for i in range(len(idx) + 1) if i not in idx)
        raise AdapterError(f"{where}: missing key '{key_hint}.{_expert_name(kind, missing)}.default.weight'")
    return len(idx)


def _read_peft_config(cfg_dir: Path) -> dict | None:
    p = cfg_dir / PEFT_CONFIG
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (ValueError, OSError) as e:
        raise AdapterError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise AdapterError(f"{p}: expected a JSON object")
    return d


def import_peft(path, model_cfg: ModelConfig, lora_cfg: LoraConfig | None = None) -> tuple[dict, LoraConfig]:
    """Read the original SocialAlign layout or a stock PEFT LoRA -> (adapter tree of float32 numpy arrays, LoraConfig).

    Infers E_a, E_b, r and the gate width from the tensors (stock LoRA: E = 1, zero gates); alpha/dropout/rsLoRA come from
    lora_cfg if given, else from adapter_config.json beside the file (required then).
    A given lora_cfg must agree with what the file holds.
    """
    path = Path(path)
    file, cfg_dir = _resolve_peft(path)
    tensors, _ = _read_safetensors(file)
    found = _parse_peft_keys(tensors, file, model_cfg.num_layers)
    targets = tuple(t for t in ALL_TARGETS if t in found)
    t0 = targets[0]
    names0 = found[t0][min(found[t0])]
    hint0 = f"{PEFT_PREFIX}{min(found[t0])}.{'.'.join(PEFT_MODULE[t0])}"
    ea = _count_experts(names0, "A", file, hint0)
    eb = _count_experts(names0, "B", file, hint0)
    r = names0["lora_A"][1].shape[0]
    gw_key = "lora_A_gate_dense1"
    # Stock PEFT LoRA: one lora_A / lora_B pair and no gates (a single expert's gate is constant,
    # so the gate tensors are filled with zeros of the configured width).
    stock = ea == eb == 1 and not any("gate" in n for n in names0)
    if stock:
        gw = lora_cfg.gate_width if lora_cfg is not None else LoraConfig().gate_width
    elif gw_key not in names0:
        raise AdapterError(f"{file}: missing key '{hint0}.{gw_key}.default.weight'")
    else:
        gw = names0[gw_key][1].shape[0]

    pcfg = _read_peft_config(cfg_dir)
    inferred = dict(num_analyze=ea, num_compose=eb, rank=r, gate_width=gw, targets=targets)
    if lora_cfg is None:
        if pcfg is None:
            raise AdapterError(f"{file}: no {PEFT_CONFIG} beside it; pass lora_cfg to give alpha and dropout")
        extra = pcfg.get("socialalign") or {}
        try:
            lora_cfg = LoraConfig(alpha=float(pcfg["lora_alpha"]), dropout=float(pcfg.get("lora_dropout", 0.0)),
                                  rslora=bool(pcfg.get("use_rslora", False)),
                                  routing=extra.get("routing", "token"), num_classes=0, **inferred)
        except KeyError as e:
            raise AdapterError(f"{cfg_dir / PEFT_CONFIG}: missing field {e}") from None
    for field, value in inferred.items():
        if getattr(lora_cfg, field) != value:
            raise AdapterError(f"{file}: lora_cfg.{field} = {getattr(lora_cfg, field)!r} but the file holds {value!r}")
    if pcfg is not None:
        if "r" in pcfg and int(pcfg["r"]) != r:
            raise AdapterError(f"{cfg_dir / PEFT_CONFIG}: field 'r' = {pcfg['r']} but the tensors have rank {r}")
        tm = pcfg.get("target_modules")
        if isinstance(tm, list) and set(tm) != {PEFT_MODULE[t][1] for t in targets}:
            raise AdapterError(f"{cfg_dir / PEFT_CONFIG}: field 'target_modules' = {sorted(tm)} but the tensors "
                               f"cover {sorted(PEFT_MODULE[t][1] for t in targets)}")

    dims = model_cfg.module_dims()
    layers_tree: dict[str, dict] = {}
    for target in targets:
        d_in, d_out = dims[(MODULE_BLOCK[target], target)]
        want = {_expert_name("A", i): (r, d_in) for i in range(ea)}
        want.update({_expert_name("B", j): (d_out, r) for j in range(eb)})
        gates = {"lora_A_gate_dense1": (gw, d_in), "lora_A_gate_dense2": (ea, gw),
                 "lora_B_gate_dense1": (gw, d_in), "lora_B_gate_dense2": (eb, gw)}
        if not stock:
            want.update(gates)
        per_layer = []
        for layer in range(model_cfg.num_layers):
            have = found[target].get(layer, {})
            for name, shape in want.items():
                if name not in have:
                    raise AdapterError(f"{file}: missing key '{peft_key(layer, target, name)}' "
                                       f"(expected shape {shape})")
                key, arr = have[name]
                if tuple(arr.shape) != shape:
                    raise AdapterError(f"{file}: key '{key}': expected shape {shape}, found {tuple(arr.shape)}")
            extra = sorted(set(have) - set(want))
            if extra:
                raise AdapterError(f"{file}: unexpected key '{have[extra[0]][0]}' "
                                   f"(other modules have {ea} analyze / {eb} compose experts)")
            per_layer.append({n: _as_f32(have[n][1], file, have[n][0]).T for n in want})
            if stock:
                per_layer[-1].update({n: np.zeros(shape[::-1], np.float32) for n, shape in gates.items()})
        layers_tree.setdefault(MODULE_BLOCK[target], {})[target] = {
            "A": np.stack([np.stack([p[_expert_name("A", i)] for i in range(ea)]) for p in per_layer]),
            "B": np.stack([np.stack([p[_expert_name("B", j)] for j in range(eb)]) for p in per_layer]),
            "gate_a": {"w1": np.stack([p["lora_A_gate_dense1"] for p in per_layer]),
                       "w2": np.stack([p["lora_A_gate_dense2"] for p in per_layer])},
            "gate_b": {"w1": np.stack([p["lora_B_gate_dense1"] for p in per_layer]),
                       "w2": np.stack([p["lora_B_gate_dense2"] for p in per_layer])},
        }
    tree: dict[str, Any] = {"layers": layers_tree}

    head_path = cfg_dir / HEAD_FILE
    if head_path.is_file():
        head, _ = _read_safetensors(head_path)
        k = head.get("head/kernel")
        if k is None or k.ndim != 2:
            raise AdapterError(f"{head_path}: missing key 'head/kernel' [hidden, classes]")
        want = {"head/kernel": (model_cfg.hidden_size, k.shape[1]), "head/bias": (k.shape[1],)}
        _check_shapes(head, want, head_path)
        tree["head"] = {n.split("/")[1]: _as_f32(v, head_path, n) for n, v in head.items()}
        if lora_cfg.num_classes not in (0, k.shape[1]):
            raise AdapterError(f"{head_path}: head has {k.shape[1]} classes, "
                               f"lora_cfg.num_classes = {lora_cfg.num_classes}")
        lora_cfg = dataclasses.replace(lora_cfg, num_classes=int(k.shape[1]))
    elif lora_cfg.num_classes:
        lora_cfg = dataclasses.replace(lora_cfg, num_classes=0)  # the original layout carries no head
    return tree, lora_cfg


__all__ = ["AdapterError", "save_adapters", "load_adapters", "export_peft", "export_socialalign", "import_peft",
           "peft_refusal", "stock_peft_config", "input_dependent_gates", "fixed_lora", "expected_shapes", "flatten", "unflatten",
           "peft_key"]
