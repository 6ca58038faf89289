"""Collect <runs>/seed*/<row>/eval/metrics.json into the results table of EVAL.md.

Only the block between the RESULTS markers is rewritten, so the hand-written parts of
EVAL.md (setup, commands, reading of the numbers) stay; rows that have not run show
"not run" rather than disappearing.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from socialalign_jax.evaluation.distributions import jsd  # the metric the runs report

ROWS = [("base_macro", "base model, head only (lora.targets='')", True),
        ("base_nomacro", "base model, head only (lora.targets='')", False),
        ("lora_macro", "plain LoRA (1 x 1 experts)", True),
        ("lora_nomacro", "plain LoRA (1 x 1 experts)", False),
        ("pac_token_macro", "PAC-LoRA 3 x 3, token routing", True),
        ("pac_token_nomacro", "PAC-LoRA 3 x 3, token routing", False),
        ("pac_pooled_macro", "PAC-LoRA 3 x 3, pooled routing", True),
        ("pac_pooled_nomacro", "PAC-LoRA 3 x 3, pooled routing", False)]
BEGIN, END = "<!-- RESULTS:BEGIN (scripts/eval_real_collect.py) -->", "<!-- RESULTS:END -->"


def fmt(x, nd=4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def label_counts(summary: Path) -> dict[str, list[int]] | None:
    """Per-split (favor, against, neutral) counts from build_dataset's printed summary (data_seed*.txt)."""
    if not summary.exists():
        return None
    counts = {}
    for line in summary.read_text("utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 7 and parts[0] in ("train", "test") and parts[1].isdigit():
            counts[parts[0]] = [int(x) for x in parts[4:7]]
    return counts if {"train", "test"} <= set(counts) else None


def reference_rows(runs: Path, seed: str) -> list[str]:
    """Model-free references on the same held-out events: always the training majority class
    (accuracy, macro-F1) and the training-label prior / uniform as every event's distribution (JSD)."""
    counts = label_counts(runs / f"data_{seed}.txt")
    done = [f for f in sorted((runs / seed).glob("*/eval/metrics.json"))]
    if counts is None or not done:
        return []
    events = json.loads(done[0].read_text("utf-8"))["per_event"]
    train, test = counts["train"], counts["test"]
    prior = [c / sum(train) for c in train]
    major = max(range(3), key=lambda i: train[i])
    acc = test[major] / sum(test)
    f1_major = 2 * acc / (1 + acc)  # precision = acc, recall = 1; the other classes score 0
    mean_jsd = lambda dist: sum(float(jsd(e["real"], dist)) for e in events) / len(events)  # noqa: E731
    n = f"{len(events)} / {sum(test)}"
    return [f"| reference: training majority class / training-label prior for every case (no model) | | {seed[4:]} |"
            f" | {fmt(f1_major / 3)} | {fmt(acc)} | {fmt(mean_jsd(prior))} | {n} |",
            f"| reference: uniform distribution for every event (no model) | | {seed[4:]} | | | | "
            f"{fmt(mean_jsd([1 / 3] * 3))} | {n} |"]


def table(runs: Path, steps: int) -> str:
    seeds = sorted(p.name for p in runs.glob("seed*") if p.is_dir()) or ["seed0"]
    lines = [f"Budget: {steps} training steps of 2 events x 4 cases, 32 new tokens per generated post.", "",
             "| row | macro loss | seed | ROUGE-L (chars) | stance macro-F1 | stance acc. | mean event JSD | "
             "test events / cases |",
             "|---|---|---|---|---|---|---|---|"]
    for seed in seeds:
        for key, name, macro in ROWS:
            f = runs / seed / key / "eval" / "metrics.json"
            if not f.exists():
                lines.append(f"| {name} | {'yes' if macro else 'no (lambda_macro=0)'} | {seed[4:]} | not run | | | | |")
                continue
            m = json.loads(f.read_text("utf-8"))
            mi, ma = m["micro"], m["macro"]["head"]
            lines.append(f"| {name} | {'yes' if macro else 'no (lambda_macro=0)'} | {seed[4:]} | {fmt(mi['rougeL'])} | "
                         f"{fmt(mi['sentiment_macro_f1'])} | {fmt(mi['sentiment_accuracy'])} | "
                         f"{fmt(ma['jsd_mean'])} | {m['num_events']} / {m['num_records']} |")
        lines += reference_rows(runs, seed)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True, help="the RUNS directory of scripts/eval_real.sh")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--out", default="EVAL.md")
    a = ap.parse_args(argv)
    block = f"{BEGIN}\n{table(Path(a.runs), a.steps)}\n{END}"
    out = Path(a.out)
    text = out.read_text("utf-8") if out.exists() else f"# Evaluation on real data\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{out}: no {BEGIN} ... {END} block to fill")
    out.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S), "utf-8")
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
