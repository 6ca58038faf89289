"""Shared pieces of the benchmarks: timing, machine facts, one model built for both frameworks."""

from __future__ import annotations

import os
import platform
import statistics
import time

import jax
import numpy as np

from socialalign_jax.model import decoder, pac_lora
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.presets import get_preset

THREADS = os.cpu_count() or 1


def setup_torch():
    import torch
    torch.set_num_threads(THREADS)  # every core, as XLA:CPU uses them all
    torch.manual_seed(0)
    return torch


def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of fn() over `repeats` calls after `warmup` calls (fn must block)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def block(tree):
    return jax.block_until_ready(tree)


def machine_info() -> dict:
    import torch
    import transformers
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": THREADS, "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": getattr(jax.lib, "__version__", jax.__version__), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "jax_backend": jax.default_backend(), "torch_threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg()}


def small_qwen2(num_layers: int, vocab: int | None = None) -> ModelConfig:
    """Qwen2.5-0.5B's layer shapes (D 896, F 4864, 14/2 heads, dim 64) with fewer layers."""
    cfg = get_preset("qwen2.5-0.5b", num_layers=num_layers)
    return cfg.replace(vocab_size=vocab) if vocab else cfg


def random_adapters(cfg: ModelConfig, lc: pac_lora.LoraConfig, seed: int = 1) -> dict:
    """Adapters with B != 0 (B = 0 at init would make every comparison trivially equal)."""
    ad = decoder.init_adapters(jax.random.PRNGKey(seed), cfg, lc)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = getattr(path[-1], "key", "")
        if name == "B":
            return rng.uniform(-0.05, 0.05, x.shape).astype(np.float32)
        return np.asarray(x)
    return jax.tree_util.tree_map_with_path(fill, ad)


def hf_model_from(params, cfg: ModelConfig):
    """transformers Qwen2ForCausalLM carrying exactly our params (float32, eval mode)."""
    import torch
    import transformers
    from socialalign_jax.weights import hf

    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in hf.to_hf_config(cfg).items()
                                         if k not in ("architectures", "model_type", "torch_dtype")})
    hf_cfg._attn_implementation = "sdpa"
    m = transformers.Qwen2ForCausalLM(hf_cfg)
    sd = {n: torch.from_numpy(a.astype(np.float32)) for n, a in hf.hf_state_dict(params, cfg)}
    missing, unexpected = m.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        m.tie_weights()
    return m.float().eval()


def init_params(cfg: ModelConfig, seed: int = 0):
    return jax.jit(decoder.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(seed))
