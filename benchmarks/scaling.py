"""Benchmark 6: compile time and per-device memory of the step on 1, 2, 4, 8 fake CPU devices.

Each device count needs its own process (XLA fixes the count at start-up), so this module
re-runs itself as a worker. Step times on fake devices would measure nothing (they share
the same cores), so only compile time and memory_analysis are reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(n: int, quick: bool) -> None:
    import optax

    from benchmarks import common
    from socialalign_jax.model.pac_lora import LoraConfig
    from socialalign_jax.tools import plan
    from socialalign_jax.parallel.mesh import make_mesh
    from socialalign_jax.train.step import LossConfig

    layers_n, b, s, resp = (1, 8, 128, 32) if quick else (2, 8, 512, 64)
    cfg = common.small_qwen2(layers_n)
    p = plan.plan_train_step(cfg, LoraConfig(), LossConfig(max_response_tokens=resp), optax.adamw(1e-4),
                             make_mesh(1, n, 1), b, s)
    print(json.dumps({"devices": n, "compile_s": p.compile_seconds, "params": p.params, "adapters": p.adapters,
                      "opt_state": p.opt_state, "argument": p.argument, "temp": p.temp,
                      "peak": p.peak_estimate, "shape": f"fsdp={n}, batch {b} x {s}, layers {layers_n}"}))


def run(quick: bool) -> list[dict]:
    rows = []
    for n in (1, 2, 4, 8):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", PYTHONPATH=ROOT)
        r = subprocess.run([sys.executable, "-m", "benchmarks.scaling", str(n), "1" if quick else "0"],
                           capture_output=True, text=True, cwd=ROOT, env=env)
        if r.returncode:
            raise RuntimeError(f"scaling worker ({n} devices) failed: {r.stderr.strip().splitlines()[-1:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return rows


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2] == "1")
