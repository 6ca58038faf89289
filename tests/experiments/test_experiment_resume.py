"""launch/experiment.py resumes after SIGTERM without rerunning finished cells, and its summary
equals an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

PLAN = """
name = "resume test"
kind = "head"
features = "{features}"
folds = 3
seeds = [0, 1]
[bootstrap]
n_resamples = 200
[defaults]
steps = 100
events_per_batch = 2
cases_per_event = 4
[[rows]]
name = "sent"
[[rows]]
name = "macro"
lambda_macro = 1.0
[[rows]]
name = "prior"
reference = "prior"
[[compare]]
a = "macro"
b = "sent"
"""


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return env


def _cmd(plan, out):
    return [sys.executable, str(REPO / "launch" / "experiment.py"), "--plan", str(plan), "--out", str(out)]


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    from socialalign_jax.experiments import features as F
    from socialalign_jax.weights.resolve import resolve_weights

    from tests.experiments.test_experiment import _selection

    w = resolve_weights("random:tiny-llama")
    root = tmp_path_factory.mktemp("exp")
    F.compute(root / "feat", _selection(n_events=9, per_event=6), jax.device_put(w.params), w.cfg,
              model_digest=F.params_digest(w.params), tok_digest="t", chunk_size=16, progress=False)
    plan = root / "plan.toml"
    plan.write_text(PLAN.format(features=root / "feat"))
    return plan


def _lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def test_sigterm_then_resume_reruns_nothing_finished(plan_file, tmp_path):
    out = tmp_path / "interrupted"
    log = out / "cells.jsonl"
    proc = subprocess.Popen(_cmd(plan_file, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the plan finished before it could be interrupted:\n" + proc.stdout.read().decode()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    before_raw = log.read_text()
    before = [ln for ln in before_raw.split("\n")[:-1]]  # complete lines only (a partial last one is dropped)
    n_before = len(before)
    assert 3 <= n_before < 18
    assert not (out / "summary.json").exists()

    res = subprocess.run(_cmd(plan_file, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"18 cells, {n_before} already done, {18 - n_before} to run" in res.stdout
    after = log.read_text().split("\n")[:-1]
    assert after[:n_before] == before  # finished cells kept as they were, not rerun
    keys = [json.loads(ln)["key"] for ln in after]
    assert len(keys) == 18 and len(set(keys)) == 18
    cells = {(r["row"], r["fold"], r["seed"]) for r in map(json.loads, after)}
    assert len(cells) == 18

    ref_out = tmp_path / "straight"
    res = subprocess.run(_cmd(plan_file, ref_out), env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    got = json.loads((out / "summary.json").read_text())
    want = json.loads((ref_out / "summary.json").read_text())
    assert got["rows"] == want["rows"] and got["differences"] == want["differences"]
    assert (out / "summary.md").read_text() == (ref_out / "summary.md").read_text()
    assert (out / "curves.png").stat().st_size > 1000
    # every head cell recorded its loss curve; a reference row has none
    recs = _lines(log)
    assert all("curve" in r for r in recs if r["row"] != "prior")
    assert all("curve" not in r for r in recs if r["row"] == "prior")
    assert np.isfinite(want["rows"]["macro"]["jsd_mean"]["low"])


def test_plan_errors_are_one_line(tmp_path):
    from socialalign_jax.core.errors import UserError
    from socialalign_jax.experiments import runner

    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nkind = "head"\nfeatures = "f"\nfolds = 3\nseeds = [0]\n'
                   '[[rows]]\nname = "a"\nlambda_macr = 1.0\n')
    with pytest.raises(UserError, match=r"rows\[0\].*lambda_macr"):
        runner.load_plan(bad)
    bad.write_text('name = "x"\nkind = "head"\nfeatures = "f"\nfolds = 3\nseeds = [0]\n'
                   '[[rows]]\nname = "a"\n[[compare]]\na = "a"\nb = "zz"\n')
    with pytest.raises(UserError, match=r"compare\[0\]"):
        runner.load_plan(bad)
    res = subprocess.run(_cmd(tmp_path / "missing.toml", tmp_path / "o"), env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "no such plan file" in res.stderr and "Traceback" not in res.stderr


def test_set_overrides_reach_into_tables():
    """`--set defaults.steps=2000` changes one setting of the plan's [defaults] table, and what the
    rows inherit; a top-level key is replaced whole; a key under a non-table is one line."""
    from socialalign_jax.core.errors import UserError
    from socialalign_jax.experiments import runner

    plan_file = REPO / "experiments" / "design_a_ced.toml"
    base = runner.load_plan(plan_file)
    plan = runner.load_plan(plan_file, ["defaults.steps=2000", "name=design_a_ced_2000", "seeds=[0]"])
    assert plan["defaults"] == {**base["defaults"], "steps": 2000}
    assert plan["name"] == "design_a_ced_2000" and plan["seeds"] == [0]
    sent = next(r for r in plan["rows"] if r["name"] == "sent_macro_gumbel")
    assert runner.row_settings(plan, sent) == {**runner.row_settings(base, sent), "steps": 2000}
    with pytest.raises(UserError, match=r"--set 'folds.x=1': folds is not a table"):
        runner.load_plan(plan_file, ["folds.x=1"])
    with pytest.raises(UserError, match=r"field 'defaults': expected a table of settings, got 3"):
        runner.load_plan(plan_file, ["defaults=3"])


def test_a_row_name_that_would_leave_out_is_refused(tmp_path):
    """A row's name becomes <out>/runs/<name>/...: a path out of --out is one line before anything runs."""
    from socialalign_jax.core.errors import UserError
    from socialalign_jax.experiments import runner

    plan = tmp_path / "plan.toml"
    plan.write_text('name = "x"\nkind = "train"\ndata = "d"\ntrain_config = "configs/weibo.py"\nfolds = 2\n'
                    'seeds = [0]\n[[rows]]\nname = "../../../../x"\n')
    with pytest.raises(UserError, match=r"plan.toml: rows\[0\]: field 'name': '\.\./\.\./\.\./\.\./x' is not a usable"):
        runner.load_plan(plan)
    res = subprocess.run(_cmd(plan, tmp_path / "deep" / "out"), env=_env(), capture_output=True, text=True,
                         timeout=120)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.toml"]


def test_a_plan_whose_every_cell_failed_exits_non_zero(tmp_path, monkeypatch, capsys):
    """'no finished cells' is not a success: every cell failing is one error line and exit status 1."""
    sys.path.insert(0, str(REPO / "launch"))
    import experiment

    from socialalign_jax.experiments import runner

    plan = tmp_path / "plan.toml"
    plan.write_text('name = "x"\nkind = "head"\nfeatures = "f"\nfolds = 2\nseeds = [0]\n[[rows]]\nname = "a"\n')

    class Failing:
        folds = [["e0"], ["e1"]]
        identity = "i"

        def __init__(self, plan):
            pass

        def run(self, plan, row, fold, seed):
            raise runner.CellFailed(f"{row['name']} fold {fold}: the features are missing")

    monkeypatch.setattr(runner, "HeadContext", Failing)
    assert experiment.main(["--plan", str(plan), "--out", str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    assert "no finished cells" in out
    assert err.strip().splitlines() == ["error: all 2 cells that ran failed (first: a fold 0: the features are "
                                        "missing); fix that and rerun (finished cells are kept)"]
