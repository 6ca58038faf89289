"""What `launch/train.py` runs: training, then (when configured) generation and evaluation."""

from __future__ import annotations

import os

import jax

from socialalign_jax.core.atomic_io import write_json
from socialalign_jax.runs.run_config import RunConfig
from socialalign_jax.train import loop, post_train


def format_summary(result: dict) -> str:
    """The before/after table the quickstart prints: trained model vs the untrained one and the majority class."""
    ev, ev0 = result.get("eval") or {}, result.get("eval_step0") or {}
    rows = [("held-out response CE (nats/token)", ev0.get("response_ce"), ev.get("response_ce"), None),
            ("held-out sentiment accuracy", ev0.get("sentiment_accuracy"), ev.get("sentiment_accuracy"),
             ev.get("majority_baseline_accuracy")),
            ("held-out macro JSD (mean over events)", ev0.get("macro_jsd"), ev.get("macro_jsd"), None)]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["| metric | untrained (step 0) | trained | majority class |", "|---|---|---|---|"]
    lines += [f"| {name} | {fmt(a)} | {fmt(b)} | {fmt(c)} |" for name, a, b, c in rows]
    return "\n".join(lines)


def run_training(cfg: RunConfig, workdir: str, *, progress: bool = True, accept_config_change: bool = False) -> int:
    result = loop.train(cfg, workdir, progress=progress, accept_config_change=accept_config_change)
    if "stopped_at" in result:
        return 0
    is_main = jax.process_index() == 0
    if is_main:  # every run says where it went, also one with evaluation and generation off
        if result.get("eval"):
            print("\n" + format_summary(result))
        print(f"\ntrained to step {result['step']}: checkpoints in {os.path.join(workdir, 'checkpoints')}, "
              f"logs in {os.path.join(workdir, 'metrics.jsonl')}")
    if cfg.train.generate_at_end:
        post_train.generate_and_evaluate(cfg, workdir, progress=progress)
    if is_main:
        write_json(result, os.path.join(workdir, "result.json"), indent=2)
    return 0
