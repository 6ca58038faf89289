"""After training: generate posts for the held-out events and evaluate them (the quickstart's last step)."""

from __future__ import annotations

import os

import jax

from socialalign_jax.data.labellers import LexiconLabeller
from socialalign_jax.evaluation import plots, report
from socialalign_jax.evaluation.predictions import evaluate, load_gates, load_predictions
from socialalign_jax.inference import generation


def generate_and_evaluate(cfg, workdir: str, *, progress: bool = True, split: str = "test") -> dict | None:

    preds = os.path.join(workdir, f"predictions_{split}.jsonl")
    gates = os.path.join(workdir, f"gates_{split}.json")
    generation.run_generate(cfg, workdir, split=split, out=preds, gates_out=gates, progress=progress,
                            max_examples=cfg.train.eval_max_examples)
    if jax.process_index() != 0:
        return None
    labeller = None
    if cfg.train.labeller == "lexicon":
        labeller = LexiconLabeller()
    result = evaluate(load_predictions(preds), labeller)
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    with_real = [e for e in result["per_event"] if e["real"] is not None]
    figures = plots.plot_event_distributions(with_real, result["labels"], out) if with_real else []
    if os.path.exists(gates):
        figures += plots.plot_gate_heatmaps(load_gates(gates), out, "max")
    result["figures"] = [os.path.basename(f) for f in figures]
    table = report.write_report(result, out, None)
    print("\n" + table)
    print(f"\npredictions: {preds}\nreport: {os.path.join(out, 'metrics.md')}   plots: "
          + ", ".join(os.path.join(out, f) for f in result["figures"]))
    return result
