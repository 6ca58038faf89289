"""Plans of rows x folds x seeds: run each cell once, append its metrics, resume, summarise.

A plan (TOML, experiments/*.toml; docs/experiments.md) names a kind of cell:

* ``kind = "head"`` (design A): the sentiment head trained on a cached feature set
  (features.py) with settings `heads.HeadConfig`; a row with ``reference = "prior"`` or
  ``"uniform"`` is a model-free reference (the training events' pooled label distribution,
  or the uniform one, predicted for every held-out case);
* ``kind = "train"`` (design B): `launch/train.py` on a per-fold dataset (the fold's events
  held out), with the plan's common flags plus the row's flags; metrics from the run's
  held-out predictions.

Results go to ``<out>/cells.jsonl``, one line per finished cell, appended with
`atomic_io.AppendLog` (flushed per line; a partial line left by a kill is dropped when
the log is reopened). Each line carries its cell key, a hash of everything that decides
the cell's result; a rerun skips cells whose key is already there, so an interrupted run
resumes where it stopped and a changed row reruns only its own cells. The summary
(``summary.json``, ``summary.md``, ``curves.png``) is rewritten atomically from the log
after every run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from socialalign_jax.core import atomic_io
from socialalign_jax.core.errors import UserError
from socialalign_jax.data import tfds_builders as B
from socialalign_jax.evaluation.predictions import load_predictions
from socialalign_jax.experiments import cells as C, folds as FO, heads, summary as S
from socialalign_jax.experiments.features import FeatureSet
from socialalign_jax.experiments.heads import HeadConfig

CELLS = "cells.jsonl"
KINDS = ("head", "train")
REFERENCES = ("prior", "uniform")
_ROW_META = ("name", "label", "reference", "flags")


# ----------------------------------------------------------------------------- plan

def _expand(x):
    if isinstance(x, str):
        return os.path.expandvars(x)
    if isinstance(x, list):
        return [_expand(v) for v in x]
    if isinstance(x, dict):
        return {k: _expand(v) for k, v in x.items()}
    return x


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_plan(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """Read and check a plan; `overrides` are KEY=VALUE strings (TOML values). A dotted KEY reaches
    into a table, e.g. `defaults.steps=2000`, so a variant of a plan is one flag, not a copy of it."""
    path = Path(path)
    try:
        plan = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such plan file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    for o in overrides:
        if "=" not in o:
            raise UserError(f"--set {o!r}: expected KEY=VALUE")
        k, v = o.split("=", 1)
        *tables, leaf = k.strip().split(".")
        node = plan
        for i, t in enumerate(tables):
            node = node.setdefault(t, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {o!r}: {'.'.join(tables[:i + 1])} is not a table")
        node[leaf] = _parse_value(v.strip())
    plan = _expand(plan)

    def need(key, ok, what):
        if key not in plan:
            raise UserError(f"{path}: field '{key}': missing")
        if not ok(plan[key]):
            raise UserError(f"{path}: field '{key}': expected {what}, got {plan[key]!r}")
        return plan[key]

    need("name", lambda v: isinstance(v, str) and v, "a name")
    need("kind", lambda v: v in KINDS, f"one of {KINDS}")
    need("folds", lambda v: isinstance(v, int) and v >= 2, "an integer >= 2")
    need("seeds", lambda v: isinstance(v, list) and v and all(isinstance(s, int) for s in v), "a list of ints")
    plan.setdefault("fold_seed", 0)
    plan.setdefault("only_folds", [])  # a subset of folds to run (design B on a time budget)
    plan.setdefault("defaults", {})
    need("defaults", lambda v: isinstance(v, dict), "a table of settings")
    plan.setdefault("compare", [])
    plan.setdefault("bootstrap", {})
    plan.setdefault("parallel", 1)  # train kind: cells run as concurrent launch/train.py processes
    plan.setdefault("cell_timeout_s", 0)  # train kind: a cell still running after this is stopped (0 = none)
    plan.setdefault("deadline_s", 0)  # train kind: no cell starts after this many seconds (0 = none)
    plan.setdefault("rouge", True)  # train kind: ROUGE-L of the generated posts (off when max_new_tokens is tiny)
    rows = need("rows", lambda v: isinstance(v, list) and v, "a list of [[rows]] tables")
    seen = set()
    for i, r in enumerate(rows):
        where = f"{path}: rows[{i}]"
        if not isinstance(r.get("name"), str) or not r["name"]:
            raise UserError(f"{where}: field 'name': missing")
        atomic_io.output_name(r["name"], f"{where}: field 'name'")  # <out>/runs/<name>: never a path out of --out
        if r["name"] in seen:
            raise UserError(f"{where}: field 'name': {r['name']!r} is used twice")
        seen.add(r["name"])
        if r.get("reference") is not None and r["reference"] not in REFERENCES:
            raise UserError(f"{where}: field 'reference': expected one of {REFERENCES}, got {r['reference']!r}")
        if plan["kind"] == "head" and r.get("reference") is None:
            try:
                HeadConfig.from_dict(row_settings(plan, r))
            except (TypeError, ValueError) as e:
                raise UserError(f"{where}: {e}") from None
    for i, c in enumerate(plan["compare"]):
        if not isinstance(c, dict) or c.get("a") not in seen or c.get("b") not in seen:
            raise UserError(f"{path}: compare[{i}]: expected {{a = ROW, b = ROW}} naming rows of this plan, got {c!r}")
    if plan["kind"] == "head":
        need("features", lambda v: isinstance(v, str) and v, "the feature cache directory")
    else:
        need("data", lambda v: isinstance(v, str) and v, "the dataset built with every event (test_fraction 0)")
        need("train_config", lambda v: isinstance(v, str) and v, "a config, e.g. configs/weibo.py:smollm2")
    plan["_path"] = str(path)
    return plan


def row_settings(plan: dict, row: dict) -> dict:
    """The plan's defaults with the row's own settings on top (head kind: HeadConfig fields)."""
    return {**plan["defaults"], **{k: v for k, v in row.items() if k not in _ROW_META}}


def cell_list(plan: dict) -> list[tuple[dict, int, int]]:
    folds = plan["only_folds"] or list(range(plan["folds"]))
    return [(row, f, s) for s in plan["seeds"] for f in folds for row in plan["rows"]]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- contexts

class HeadContext:
    """Design A: the loaded feature set and its folds, shared by every cell."""

    def __init__(self, plan: dict):
        self.fs = FeatureSet(plan["features"], allow_partial=bool(plan.get("allow_partial", False)))
        self.folds = FO.event_folds(self.fs.event_names, plan["folds"], plan["fold_seed"])
        self.fold_of = FO.fold_of(self.folds)
        self.identity = {"features": self.fs.key}
        if self.fs.partial:  # a cell on a partial cache is a different cell from one on the complete cache
            self.identity["events"] = self.fs.event_names

    def run(self, plan: dict, row: dict, fold: int, seed: int) -> dict:
        fs = self.fs
        ev = fs.examples["event"]
        labels = fs.examples["label"]
        held = np.asarray([self.fold_of[n] == fold for n in fs.event_names])  # [E]
        test_events = np.flatnonzero(held)
        test_idx = np.flatnonzero(held[ev])
        train_idx = np.flatnonzero(~held[ev])
        real = fs.real
        counts = np.asarray([e["count"] for e in fs.events], np.float64)
        extra: dict[str, Any] = {}
        if row.get("reference") is not None:
            if row["reference"] == "prior":  # pooled label distribution of the training events' responses
                w = counts * ~held
                p = (real * w[:, None]).sum(0) / w.sum()
            else:
                p = np.full(real.shape[1], 1.0 / real.shape[1])
            probs = np.broadcast_to(p, (test_idx.size, real.shape[1]))
            hard = row["reference"] == "prior"
        else:
            cfg = heads.HeadConfig.from_dict(row_settings(plan, row))
            head, curve = heads.train_head(cfg, fs.features, labels, ev, train_idx, real, seed)
            probs = heads.predict(cfg, head, fs.features[test_idx])
            hard = True
            extra["curve"] = _curve_record(curve)
        remap = {int(e): i for i, e in enumerate(test_events)}
        events = C.event_records([fs.event_names[e] for e in test_events], real[test_events], np.asarray(probs),
                                 labels[test_idx], np.asarray([remap[int(e)] for e in ev[test_idx]]), hard=hard)
        return {"events": events, "metrics": C.cell_metrics(events, fs.classes), **extra}


def _curve_record(curve: np.ndarray, points: int = 100) -> dict:
    """The loss curve (total, L_sent, L_macro per step) averaged over windows of steps/points steps,
    and how much the last 10% of steps still moved against the 10% before them."""
    t = curve.shape[0]
    win = max(1, t // points)
    n = (t // win) * win
    mean = curve[:n].reshape(-1, win, curve.shape[1]).mean(1)
    tenth = max(1, t // 10)
    last, prev = curve[-tenth:, 0].mean(), curve[-2 * tenth:-tenth, 0].mean() if t >= 2 * tenth else math.nan
    return {"every": win, "loss": mean[:, 0].tolist(), "sent": mean[:, 1].tolist(), "macro": mean[:, 2].tolist(),
            "final_loss": float(last), "last_tenth_change": float((prev - last) / abs(prev)) if prev else math.nan}


class CellFailed(UserError):
    """A cell that could not finish; the runner records nothing for it and carries on."""


class TrainContext:
    """Design B: per-fold datasets cut from one dataset of every event, and launch/train.py per cell."""

    def __init__(self, plan: dict, out: Path):
        self.B = B
        self.base = B.open_dataset(plan["data"])
        self.out = out
        names = list(self.base.metadata["events"])
        built = set()
        for s in self.base.sources:
            built |= {names[int(e)] for e in self.base.index(s)["event_id"]}
        self.folds = FO.event_folds(sorted(built), plan["folds"], plan["fold_seed"])
        self.identity = {"data": str(self.base.path), "data_config": self.base.metadata.get("config")}
        self.procs: set = set()

    def stop(self) -> None:
        """Terminate the training processes still running (the runner was interrupted)."""
        for p in list(self.procs):
            p.terminate()

    def fold_data(self, fold: int) -> Path:
        """<out>/data/fold<f>: the base dataset's settings with this fold's events as the test split."""
        import contextlib
        import dataclasses

        d = self.out / "data" / f"fold{fold}"
        if d.exists():
            with contextlib.suppress(Exception):
                self.B.find_dataset_dir(d)
                return d
        rec = dict(self.base.metadata["config"])
        fields = {f.name for f in dataclasses.fields(self.B.SocialConfig)}
        kw = {k: v for k, v in rec.items() if k in fields and k != "name"}
        kw["labels"] = tuple(kw.get("labels") or self.base.metadata.get("classes"))
        kw["test_events"] = tuple(self.folds[fold])
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            self.B.build(d, self.B.SocialConfig(name="default", **kw), overwrite=True)
        return d

    def run(self, plan: dict, row: dict, fold: int, seed: int) -> dict:
        data = self.fold_data(fold)
        wd = self.out / "runs" / row["name"] / f"fold{fold}" / f"seed{seed}"
        preds = wd / "predictions_test.jsonl"
        if not (wd / "eval" / "metrics.json").exists():
            wd.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve().parents[2] / "launch" / "train.py"),
                   "--config", plan["train_config"], *plan.get("common_flags", []), *row.get("flags", []),
                   f"--config.data.data_dir={data}", f"--config.train.seed={seed}", f"--config.data.seed={seed}",
                   f"--config.sample.seed={seed}", "--workdir", str(wd), "--noprogress"]
            with open(wd.with_suffix(".log"), "w", encoding="utf-8") as log:
                log.write(" ".join(cmd) + "\n")
                log.flush()
                env = {**os.environ, **{str(k): str(v) for k, v in plan.get("env", {}).items()}}
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                self.procs.add(proc)
                try:
                    rc = proc.wait(timeout=plan["cell_timeout_s"] or None)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    proc.wait()
                    raise CellFailed(f"{wd}: stopped after cell_timeout_s={plan['cell_timeout_s']}") from None
                finally:
                    self.procs.discard(proc)
            if rc != 0:
                raise CellFailed(f"{wd}: launch/train.py failed (exit {rc}); see {wd.with_suffix('.log')}")
        recs = load_predictions(str(preds))
        ds = self.B.open_dataset(data)
        classes = list(ds.metadata.get("classes"))
        targets = ds.targets("test")
        names = list(ds.metadata["events"])
        test_ids = sorted({int(r["event_id"]) for r in recs})  # held-out events with predictions (all, unless
        # train.eval_max_examples scored a subset)
        pos = {e: i for i, e in enumerate(test_ids)}
        probs = np.asarray([r["probs"] for r in recs], np.float64)
        labels = np.asarray([classes.index(r["label"]) if r.get("label") is not None else -1 for r in recs])
        ev = np.asarray([pos[int(r["event_id"])] for r in recs])
        rouge = C.rouge_l_f([r["reference"] for r in recs], [r["generated"] for r in recs]) if plan["rouge"] else None
        real = np.asarray([targets[e]["dist"] for e in test_ids], np.float64)
        events = C.event_records([names[e] for e in test_ids], real, probs, labels, ev, rouge=rouge)
        return {"events": events, "metrics": C.cell_metrics(events, classes), "workdir": str(wd)}


# ----------------------------------------------------------------------------- running

def _done_cells(path: Path) -> dict[str, dict]:
    done = {}
    if path.exists():
        for line in path.read_text("utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a partial last line (AppendLog drops it when it reopens the file)
            done[rec["key"]] = rec
    return done


def run_plan(plan: dict, out: str | os.PathLike, *, log: Callable[[str], None] = print) -> dict:
    """Run every cell not yet in <out>/cells.jsonl, then write the summary. Returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = HeadContext(plan) if plan["kind"] == "head" else TrainContext(plan, out)
    atomic_io.write_json({k: v for k, v in plan.items() if not k.startswith("_")} | {"folds_events": ctx.folds},
                         out / "plan.json")
    log_path = out / CELLS
    done = _done_cells(log_path)
    todo = []
    for row, fold, seed in cell_list(plan):
        key = _digest({"identity": ctx.identity, "kind": plan["kind"], "row": row_settings(plan, row),
                       "reference": row.get("reference"), "flags": row.get("flags"),
                       "common": plan.get("common_flags"), "config": plan.get("train_config"),
                       "folds": plan["folds"], "fold_seed": plan["fold_seed"], "fold": fold, "seed": seed})
        if key not in done:
            todo.append((row, fold, seed, key))
    log(f"{plan['name']}: {len(cell_list(plan))} cells, {len(cell_list(plan)) - len(todo)} already done, "
        f"{len(todo)} to run -> {log_path}")
    writer = atomic_io.AppendLog(log_path, keep_through_step=None)
    start = time.time()
    finished = [0]

    def one(row, fold, seed, key):
        if plan["kind"] == "train" and plan["deadline_s"] and time.time() - start > plan["deadline_s"]:
            raise CellFailed(f"{row['name']} fold {fold} seed {seed}: not started, deadline_s={plan['deadline_s']} passed")
        t0 = time.time()
        res = ctx.run(plan, row, fold, seed)
        return {"key": key, "row": row["name"], "fold": fold, "seed": seed, "seconds": round(time.time() - t0, 3),
                **res}

    def record(rec):
        writer.append(rec)
        done[rec["key"]] = rec
        finished[0] += 1
        m = rec["metrics"]
        log(f"[{finished[0]}/{len(todo)}] {rec['row']} fold {rec['fold']} seed {rec['seed']}: "
            f"JSD {m.get('jsd_mean', math.nan):.4f} F1 {m.get('macro_f1', math.nan):.4f} "
            f"acc {m.get('accuracy', math.nan):.4f} ({rec['seconds']:.1f}s)")

    failed = []
    try:
        if plan["kind"] == "train":
            for f in sorted({fold for _, fold, _, _ in todo}):  # every fold's dataset before any cell starts
                ctx.fold_data(f)
        if plan["kind"] == "train" and int(plan["parallel"]) > 1:
            from concurrent.futures import ThreadPoolExecutor, as_completed

            with ThreadPoolExecutor(int(plan["parallel"])) as pool:
                futs = {pool.submit(one, *t): t for t in todo}
                try:
                    for fut in as_completed(futs):
                        try:
                            record(fut.result())
                        except CellFailed as e:
                            failed.append(str(e))
                            log(f"cell failed: {e}")
                except BaseException:
                    for fut in futs:
                        fut.cancel()
                    ctx.stop()
                    raise
        else:
            for t in todo:
                try:
                    record(one(*t))
                except CellFailed as e:
                    failed.append(str(e))
                    log(f"cell failed: {e}")
    finally:
        writer.close()
    summ = write_summary(plan, out, list(done.values()))
    summ["failed"] = failed
    summ["finished"] = finished[0]
    return summ


def write_summary(plan: dict, out: Path, records: list[dict]) -> dict:
    """summary.json / summary.md (and curves.png for head rows) from the records of this plan's cells."""
    wanted = {(r["name"], f, s) for r, f, s in cell_list(plan)}
    by_row: dict[str, list[dict]] = {r["name"]: [] for r in plan["rows"]}
    latest: dict[tuple, dict] = {}
    for rec in records:  # a cell rerun after a change keeps only its last record
        k = (rec["row"], rec["fold"], rec["seed"])
        if k in wanted:
            latest[k] = rec
    for (row, _, _), rec in sorted(latest.items()):
        by_row[row].append(rec)
    bs = plan["bootstrap"]
    summ = S.summarise({r: c for r, c in by_row.items() if c}, [(c["a"], c["b"]) for c in plan["compare"]],
                       n_resamples=int(bs.get("n_resamples", 2000)), seed=int(bs.get("seed", 0)),
                       confidence=float(bs.get("confidence", 0.95)))
    summ["plan"] = plan["name"]
    if plan.get("allow_partial"):
        summ["partial_note"] = "the events whose features were computed so far (a random sample of the plan's events)"
    summ["convergence"] = {r: [c["curve"]["last_tenth_change"] for c in cs if "curve" in c] for r, cs in by_row.items()}
    summ["convergence"] = {r: v for r, v in summ["convergence"].items() if v}
    summ["num_events"] = summ.get("num_events", 0)
    labels = {r["name"]: r.get("label", r["name"]) for r in plan["rows"]}
    summ["labels"] = labels
    atomic_io.write_json(summ, out / "summary.json")
    md = S.markdown(summ, labels, plan.get("title", plan["name"]))
    conv = [abs(x) for v in summ["convergence"].values() for x in v if math.isfinite(x)]
    if conv:
        md += (f"\n\nConvergence: over the last 10% of steps the training loss moved by a median "
               f"{100 * float(np.median(conv)):.2f}% (at most {100 * max(conv):.2f}%) of its value over the 10% before "
               f"({len(conv)} trained cells; curves: curves.png beside summary.md).")
    if summ.get("partial_note"):
        md += f"\n\nPartial feature cache: {summ['num_events']} held-out events, {summ['partial_note']}."
    summ["markdown"] = md
    atomic_io.write_text(out / "summary.md", md + "\n")
    curves = {r: [c["curve"] for c in cs if "curve" in c] for r, cs in by_row.items()}
    curves = {r: v for r, v in curves.items() if v}
    if curves:
        plot_curves(curves, labels, out / "curves.png", plan.get("title", plan["name"]))
    return summ


def plot_curves(curves: dict[str, list[dict]], labels: dict[str, str], path: Path, title: str) -> None:
    """Mean training-loss curve per row (thin lines: every cell), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (row, cs) in enumerate(curves.items()):
        color = f"C{i}"
        for part, ax in (("loss", axes[0]), ("macro", axes[1])):
            for c in cs:
                x = np.arange(len(c[part])) * c["every"]
                ax.plot(x, c[part], color=color, alpha=0.15, lw=0.7)
            m = np.mean([c[part] for c in cs], axis=0)
            ax.plot(np.arange(len(m)) * cs[0]["every"], m, color=color, lw=1.8, label=labels.get(row, row))
    axes[0].set_title("training loss (lambda_sent L_sent + lambda_macro L_macro)")
    axes[1].set_title("L_macro on training batches (JSD, nats)")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    plt.close(fig)
