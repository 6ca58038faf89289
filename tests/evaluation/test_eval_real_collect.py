"""scripts/eval_real_collect.py: the EVAL.md table and its model-free reference rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "eval_real_collect.py"
_spec = importlib.util.spec_from_file_location("eval_real_collect", _PATH)
collect = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(collect)

SUMMARY = """dataset: /x
split  events  cases  unlabelled  favor  against  neutral  p50  p90  p99  max
-----  ------  -----  ----------  -----  -------  -------  ---  ---  ---  ---
train      42     40           0     10       10       20  381  384  384  384
 test       2     10           0      2        3        5  381  384  384  384
"""


def _jsd_np(p, q):
    p, q = np.asarray(p, float), np.asarray(q, float)
    m = (p + q) / 2
    kl = lambda a, b: float(np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1) / b), 0.0)))  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_table_has_rows_and_hand_computed_references(tmp_path):
    (tmp_path / "data_seed0.txt").write_text(SUMMARY, "utf-8")
    events = [{"real": [0.5, 0.5, 0.0]}, {"real": [0.2, 0.2, 0.6]}]
    metrics = {"num_events": 2, "num_records": 10, "per_event": events,
               "micro": {"rougeL": 0.1, "sentiment_macro_f1": 0.2, "sentiment_accuracy": 0.3},
               "macro": {"head": {"jsd_mean": 0.05}}}
    d = tmp_path / "seed0" / "lora_macro" / "eval"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics), "utf-8")

    text = collect.table(tmp_path, steps=10)
    assert "| plain LoRA (1 x 1 experts) | yes | 0 | 0.1000 | 0.2000 | 0.3000 | 0.0500 | 2 / 10 |" in text
    assert text.count("not run") == 7
    prior = [0.25, 0.25, 0.5]  # train counts 10/10/20; majority = neutral
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    ref = cells([line for line in text.splitlines() if "training-label prior" in line][0])
    acc = 5 / 10  # neutral in the test split
    assert ref[5] == f"{acc:.4f}" and ref[4] == f"{(2 * acc / (1 + acc)) / 3:.4f}"
    assert ref[6] == f"{np.mean([_jsd_np(e['real'], prior) for e in events]):.4f}"
    uni = cells([line for line in text.splitlines() if "uniform distribution" in line][0])
    assert uni[6] == f"{np.mean([_jsd_np(e['real'], [1 / 3] * 3) for e in events]):.4f}"
    assert ref[7] == uni[7] == "2 / 10"


def test_no_summary_means_no_reference_rows(tmp_path):
    (tmp_path / "seed0").mkdir()
    text = collect.table(tmp_path, steps=10)
    assert "reference" not in text and text.count("not run") == 8
