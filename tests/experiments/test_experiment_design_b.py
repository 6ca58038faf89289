"""Design B's machinery at tiny sizes on the CPU: a `kind = "train"` plan runs launch/train.py per
cell on a per-fold dataset (the fold's events held out), in parallel, and summarises the held-out
predictions with intervals. Also: experiments/design_b.toml is a valid plan with the rows the
issue asks for."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train_helpers import MAX_LENGTH, built_sample

REPO = Path(__file__).resolve().parents[2]

PLAN = """
name = "design b smoke"
kind = "train"
data = "{data}"
train_config = "configs/weibo.py"
folds = 3
only_folds = [0]
seeds = [0]
parallel = 2
cell_timeout_s = 1200
env = {{ JAX_DISABLE_MOST_OPTIMIZATIONS = "true", XLA_FLAGS = "--xla_force_host_platform_device_count=1" }}
common_flags = [
  "--config.model.weights=random:tiny-qwen2",
  "--config.data.input={sample}",
  "--config.data.max_length={max_length}",
  "--config.data.events_per_batch=2",
  "--config.data.cases_per_event=4",
  "--config.data.eval_batch_size=8",
  "--config.loss.max_response_tokens=24",
  "--config.train.num_steps=2",
  "--config.train.checkpoint_every=100",
  "--config.train.async_checkpoint=false",
  "--config.train.eval_at_end=false",
  "--config.train.tensorboard=false",
  "--config.train.labeller=none",
  "--config.train.generate_at_end=true",
  "--config.sample.max_new_tokens=2",
  "--config.train.eval_max_examples=12",
]
[bootstrap]
n_resamples = 200
[[rows]]
name = "lora_macro"
flags = ["--config.lora.num_analyze=1", "--config.lora.num_compose=1"]
[[rows]]
name = "pac_token_nomacro"
flags = ["--config.lora.routing=token", "--config.loss.lambda_macro=0"]
[[rows]]
name = "prior"
reference = "prior"
[[compare]]
a = "lora_macro"
b = "pac_token_nomacro"
"""


def test_design_b_plan_runs_train_cells_on_fold_datasets(tmp_path):
    from socialalign_jax.data import tfds_builders as B
    from socialalign_jax.data.sample import load_sample_dir

    data = built_sample(str(tmp_path / "sample"))
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.format(data=data, sample=load_sample_dir(), max_length=MAX_LENGTH))
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, str(REPO / "launch" / "experiment.py"), "--plan", str(plan), "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=1500)
    logs = "".join(p.read_text()[-2000:] for p in (out / "runs").glob("*/fold0/seed0.log"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + logs
    assert "cell failed" not in res.stdout, res.stdout + logs

    folds = json.loads((out / "plan.json").read_text())["folds_events"]
    fold_ds = B.open_dataset(out / "data" / "fold0")
    names = fold_ds.metadata["events"]
    test = {names[int(e)] for e in fold_ds.index("test")["event_id"]}
    train = {names[int(e)] for e in fold_ds.index("train")["event_id"]}
    assert test == set(folds[0]) and not test & train and len(test | train) == 12

    summ = json.loads((out / "summary.json").read_text())
    for row in ("lora_macro", "pac_token_nomacro"):
        r = summ["rows"][row]
        assert r["cells"] == 1
        for m in ("jsd_mean", "macro_f1", "accuracy", "rougeL"):
            assert r[m]["low"] <= r[m]["point"] <= r[m]["high"], (row, m, r[m])
    assert 1 <= summ["num_events"] <= len(folds[0])  # eval_max_examples: 12 evenly spaced held-out cases
    d = summ["differences"][0]
    assert d["cells"] == 1 and d["jsd_mean"]["point"] == pytest.approx(
        summ["rows"]["lora_macro"]["jsd_mean"]["point"] - summ["rows"]["pac_token_nomacro"]["jsd_mean"]["point"])
    cells = [json.loads(ln) for ln in (out / "cells.jsonl").read_text().splitlines()]
    assert {c["row"] for c in cells} == {"lora_macro", "pac_token_nomacro", "prior"}
    trained = [c for c in cells if c["row"] != "prior"]
    assert all(sum(e["n"] for e in c["events"]) == 12 for c in trained)
    assert all({e["event"] for e in c["events"]} <= set(folds[0]) for c in cells)
    # the prior row: every held-out event gets the pooled mix of the fold's TRAINING targets (by hand)
    (prior,) = [c for c in cells if c["row"] == "prior"]
    tt = fold_ds.metadata["targets"]["train"].values()
    want = [sum(t["dist"][k] * t["count"] for t in tt) / sum(t["count"] for t in tt) for k in range(3)]
    assert {e["event"] for e in prior["events"]} == set(folds[0])
    for e in prior["events"]:
        assert e["pred"] == pytest.approx(want, abs=1e-12)


def test_design_b_plan_file_is_valid(monkeypatch):
    from socialalign_jax.experiments import runner

    for k in ("DESIGN_B_DATA", "DESIGN_B_GGUF", "DESIGN_B_INPUT"):
        monkeypatch.setenv(k, f"/x/{k}")
    plan = runner.load_plan(REPO / "experiments" / "design_b.toml")
    assert plan["kind"] == "train" and len(plan["seeds"]) == 3
    assert {r["name"] for r in plan["rows"]} == {f"{a}_{m}" for a in ("lora", "pac_token", "pac_pooled")
                                                 for m in ("macro", "nomacro")} | {"prior", "floor"}
    assert plan["baseline"] == "prior"
    steps = [f for f in plan["common_flags"] if f.startswith("--config.train.num_steps=")]
    assert steps and int(steps[0].split("=")[1]) >= 300
    assert "--config.model.weights=gguf:/x/DESIGN_B_GGUF" in plan["common_flags"]
    trained = [c for c in runner.cell_list(plan) if c[0].get("reference") is None]
    assert len(trained) == 18 and plan["parallel"] >= 18
    res = subprocess.run(["bash", "-n", str(REPO / "experiments" / "design_b.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
