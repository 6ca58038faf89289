"""Zero-shot labelling time: one full forward per (post, label word) vs one prefill per post.

    python benchmarks/zeroshot.py [--weights gguf:smollm2] [--texts 64] [--repeats 2] [--batch_size 16] \
        [--json out.json]

Labels the first N posts of the bundled sample (the users' real Weibo posts) with
`evaluation.model_labeller`'s ZeroShotLabeller twice on the same loaded weights: `pairs`
(cached=False: `scoring.score_examples` runs N*K prompt+word sequences, K = 3 label words)
and `cached` (`score_words`: the N prompts are prefilled once and the K words run from the
repeated KV cache). Each mode: a first call that compiles, then `--repeats` timed calls;
steady = their median. Prints both, the steady ratio pairs / cached and the largest difference
between the two modes' probabilities (they compute the same numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sample_posts(n: int) -> list[str]:
    from socialalign_jax.data.records import read_event_dir
    from socialalign_jax.data.sample import load_sample_dir

    posts = [c.weibo for ev in read_event_dir(load_sample_dir()) for c in ev.cases if c.weibo]
    if n > len(posts):
        raise SystemExit(f"--texts {n}: the bundled sample has {len(posts)} posts")
    return posts[:n]


def bench(weights: str, texts: list[str], repeats: int, batch_size: int) -> dict:
    import jax
    import numpy as np

    from socialalign_jax.data.labellers import ZeroShotLabeller
    from socialalign_jax.evaluation.model_labeller import model_score_fn
    from socialalign_jax.weights.resolve import resolve_weights

    w = resolve_weights(weights)
    params = jax.device_put(w.params)
    out = {"weights": weights, "texts": len(texts), "batch_size": batch_size, "repeats": repeats,
           "devices": str(jax.devices()), "load_start": os.getloadavg()}
    probs = {}
    for mode in ("pairs", "cached"):
        zs = ZeroShotLabeller(model_score_fn(params, w.cfg, w.tokenizer, batch_size=batch_size,
                                             cached=mode == "cached"))
        t0 = time.perf_counter()
        probs[mode] = zs.probs(texts)
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            zs.probs(texts)
            times.append(time.perf_counter() - t0)
        steady = statistics.median(times) if times else first
        out[mode] = {"first_s": first, "steady_s": steady, "times": times, "posts_per_s": len(texts) / steady}
        print(f"{mode:6s}: steady {steady:.1f} s ({len(texts) / steady:.2f} posts/s), first call {first:.1f} s",
              flush=True)
    out["ratio"] = out["pairs"]["steady_s"] / out["cached"]["steady_s"]
    out["ratio_first"] = out["pairs"]["first_s"] / out["cached"]["first_s"]
    out["max_prob_diff"] = float(np.abs(probs["pairs"] - probs["cached"]).max())
    out["load_end"] = os.getloadavg()
    print(f"pairs / cached: {out['ratio']:.2f}x steady, {out['ratio_first']:.2f}x first call; "
          f"max |probs difference| {out['max_prob_diff']:.2e}; load average {out['load_start'][0]:.2f} -> "
          f"{out['load_end'][0]:.2f}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="gguf:smollm2")
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    out = bench(args.weights, sample_posts(args.texts), args.repeats, args.batch_size)
    out["command"] = "python3 benchmarks/zeroshot.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
