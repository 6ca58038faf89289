"""What a bfloat16 model's matmuls cost on this CPU, by what their dot is asked to return (model.matmul_out).

    python benchmarks/gemm_dtype.py [--repeats 5] [--markdown BENCHMARKS.md] [--json out.json]

1. The linear maps' products (SmolLM2-135M: d 576, mlp 1536; Qwen2.5-0.5B: d 896, mlp 4864) at a
   decode step's rows (8, 32: the decode form's weight-major product, as `pac_lora.base_matmul` forms
   it up to WEIGHT_MAJOR_ROWS) and a prefill's (3328 = 8 prompts x 416 slots: the declared kernel):
   float32; bf16 x bf16 -> bf16 (matmul_out 'dtype'); bf16 x bf16 -> f32 rounded to bf16 after
   (matmul_out 'float32'). GFLOP/s of the best of --repeats calls, each jitted alone.
2. The crowd benchmark's prefill on SmolLM2-135M's shapes (random weights: the time does not depend on
   them; untrained PAC-LoRA 3x3 on all seven maps; 8 prompts x 416 slots, `sampling.prefill`) in float32
   and in bfloat16 with each matmul_out, alternating, best of --repeats.
3. The adapters' gradient (forward + backward of a loss on the final hidden states, `jax.value_and_grad`
   over the PAC-LoRA tree) on 6 of SmolLM2-135M's layers, batch 4 x 256: what a CPU training step
   in bfloat16 spends in the model, the same three ways.

Why: XLA:CPU gives a bf16 x bf16 -> f32 dot to YNNPACK's bf16 kernels (AVX512-BF16 here), but
computes a bf16 x bf16 -> bf16 dot in float32 after converting its operands, so on a CPU a bfloat16
model is only faster when its dots return float32 (`ModelConfig.matmul_out` 'auto' is 'float32' for bfloat16 on CPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

BEGIN, END = "<!-- benchmarks/gemm_dtype.py: begin -->", "<!-- benchmarks/gemm_dtype.py: end -->"
SHAPES = {"smollm2-135m": (576, 1536), "qwen2.5-0.5b": (896, 4864)}
ROWS = (8, 32, 3328)
KINDS = ("float32", "bf16 -> bf16 (dtype)", "bf16 -> f32 -> bf16 (float32)")


def _best(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_rates(repeats: int) -> list[dict]:
    from socialalign_jax.model import pac_lora

    rng = np.random.default_rng(0)
    fns = {KINDS[0]: jax.jit(lambda x, base: pac_lora.base_matmul(x, base)),
           KINDS[1]: jax.jit(lambda x, base: pac_lora.base_matmul(x, base)),
           KINDS[2]: jax.jit(lambda x, base: pac_lora.base_matmul(x, base, out32=True))}
    rows = []
    for model, (d, f) in SHAPES.items():
        for name, (k, n) in (("d x d (q, o)", (d, d)), ("d x mlp (gate, up)", (d, f)), ("mlp x d (down)", (f, d))):
            for m in ROWS:
                x, w = rng.standard_normal((1, m, k), np.float32), 0.05 * rng.standard_normal((k, n), np.float32)
                form = "weight-major" if m <= pac_lora.WEIGHT_MAJOR_ROWS else "plain"
                row = {"model": model, "map": name, "rows": m, "k": k, "n": n, "form": form}
                for kind, fn in fns.items():
                    dt = jnp.float32 if kind == KINDS[0] else jnp.bfloat16
                    base = {"kernel_t": jnp.asarray(w.T, dt)} if form == "weight-major" else {"kernel": jnp.asarray(w, dt)}
                    s = _best(fn, (jnp.asarray(x, dt), base), repeats)
                    row[kind] = 2.0 * m * k * n / s / 1e9
                rows.append(row)
                print(f"{model} {name} rows {m}: " + ", ".join(f"{kd} {row[kd]:.0f}" for kd in KINDS), flush=True)
    return rows


def _three_ways(cfg32, params):
    """{name: (config, weights)}: float32, and bfloat16 weights with each matmul_out."""
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    runs = {"float32": (cfg32, params)}
    for out in ("dtype", "float32"):
        runs[f"bfloat16, matmul_out {out}"] = (cfg32.replace(dtype="bfloat16", param_dtype="bfloat16", matmul_out=out), p16)
    return runs


def _alternating(fns: dict, args: dict, repeats: int, what: str) -> dict:
    """Best of `repeats` of each jitted fn, compiled first, then called in turn (a slow spell falls on all)."""
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            times[name].append(time.perf_counter() - t0)
    out = {name: min(t) for name, t in times.items()}
    for name, t in out.items():
        print(f"{what}, {name}: {t:.2f} s", flush=True)
    return out


def prefill_times(repeats: int) -> dict:
    from socialalign_jax.model import decoder, presets, sampling
    from socialalign_jax.model.pac_lora import LoraConfig

    cfg32 = presets.get_preset("smollm2-135m")
    lc = LoraConfig(dropout=0.0)
    ad = decoder.init_adapters(jax.random.PRNGKey(1), cfg32, lc)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg32.vocab_size, (8, 416)), jnp.int32)
    mask = jnp.ones_like(ids)
    spans = (jnp.full((8,), 100, jnp.int32), jnp.full((8,), 160, jnp.int32))
    runs = _three_ways(cfg32, decoder.init_params(cfg32, jax.random.PRNGKey(0)))
    fns = {name: jax.jit(lambda p, a, c=c: sampling.prefill(p, a, ids, mask, c, lc, spans, 48).last_hidden)
           for name, (c, _) in runs.items()}
    return _alternating(fns, {name: (p, ad) for name, (_, p) in runs.items()}, repeats, "prefill 8 x 416")


def grad_times(repeats: int) -> dict:
    from socialalign_jax.model import decoder, presets
    from socialalign_jax.model.pac_lora import LoraConfig

    cfg32 = presets.get_preset("smollm2-135m", num_layers=6)
    lc = LoraConfig(dropout=0.0)
    ad = decoder.init_adapters(jax.random.PRNGKey(1), cfg32, lc)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg32.vocab_size, (4, 256)), jnp.int32)
    spans = (jnp.full((4,), 60, jnp.int32), jnp.full((4,), 120, jnp.int32))
    runs = _three_ways(cfg32, decoder.init_params(cfg32, jax.random.PRNGKey(0)))

    def grad_fn(c):
        def loss(a, p):
            out = decoder.forward(p, ids, c, adapters=a, lora_cfg=lc, spans=spans, logits_at=None)
            return jnp.mean(out.hidden.astype(jnp.float32) ** 2)
        return jax.jit(jax.value_and_grad(loss))

    fns = {name: grad_fn(c) for name, (c, _) in runs.items()}
    return _alternating(fns, {name: (ad, p) for name, (_, p) in runs.items()}, repeats, "adapter gradient 4 x 256")


def render(gemms: list[dict], prefill: dict, meta: dict, grad: dict | None = None) -> str:
    lines = [BEGIN, "## bfloat16 on the CPU: what a matmul's dot returns (model.matmul_out)", "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['cpu']}, {meta['cores']} cores; "
             f"AVX512-BF16: {meta['avx512_bf16']}) at commit {meta['commit']}; load average {meta['load_start']} at "
             f"start, {meta['load_end']} at end. GFLOP/s of the best of {meta['repeats']} calls of one jitted "
             "[rows, k] x [k, n] product, formed as the model forms it for that many rows (`pac_lora.base_matmul`: "
             "weight-major for a decode step's rows, the declared kernel for a prefill's).", "",
             "| model | map | rows (form) | " + " | ".join(f"{k} GFLOP/s" for k in KINDS) + " | float32-out over float32 | float32-out over dtype |",
             "|---|---|---|" + "---|" * (len(KINDS) + 2)]
    for r in gemms:
        lines.append(f"| {r['model']} | {r['map']} [{r['k']} x {r['n']}] | {r['rows']} ({r['form']}) | "
                     + " | ".join(f"{r[k]:.0f}" for k in KINDS)
                     + f" | {r[KINDS[2]] / r[KINDS[0]]:.2f}x | {r[KINDS[2]] / r[KINDS[1]]:.2f}x |")
    base = prefill["float32"]
    lines += ["", "Prefill of 8 prompts x 416 slots on SmolLM2-135M's shapes (random weights, untrained PAC-LoRA "
              f"3x3 on all seven maps; `sampling.prefill`, jitted; alternating, best of {meta['repeats']}):", "",
              "| compute | seconds | vs float32 |", "|---|---|---|"]
    lines += [f"| {name} | {t:.2f} | {base / t:.2f}x |" for name, t in prefill.items()]
    if grad:
        lines += ["", "The adapters' gradient (forward + backward, `jax.value_and_grad` over the PAC-LoRA 3x3 tree) on "
                  "6 of SmolLM2-135M's layers, batch 4 x 256 (alternating, best of "
                  f"{meta['repeats']}):", "", "| compute | seconds | vs float32 |", "|---|---|---|"]
        lines += [f"| {name} | {t:.2f} | {grad['float32'] / t:.2f}x |" for name, t in grad.items()]
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, help="update this file's section (e.g. BENCHMARKS.md)")
    args = p.parse_args(argv)
    from benchmarks.predict import _commit, update_markdown

    cpu, flags = "?", ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name"))
        flags = next(ln for ln in text.splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        pass
    meta = {"command": "python benchmarks/gemm_dtype.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu, "cores": os.cpu_count(),
            "avx512_bf16": "yes" if "avx512_bf16" in flags.split() else "no", "repeats": args.repeats,
            "load_start": tuple(round(x, 1) for x in os.getloadavg()), "commit": _commit()}
    gemms = gemm_rates(args.repeats)
    prefill = prefill_times(args.repeats)
    grad = grad_times(args.repeats)
    meta["load_end"] = tuple(round(x, 1) for x in os.getloadavg())
    section = render(gemms, prefill, meta, grad)
    print("\n" + section)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "gemms": gemms, "prefill": prefill, "grad": grad},
                                              indent=1) + "\n")
    if args.markdown:
        update_markdown(args.markdown, section, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
