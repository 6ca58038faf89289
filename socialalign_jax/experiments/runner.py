"""Plans of rows x folds x seeds: run each cell once, append its metrics, resume, summarise.

A plan (TOML, experiments/*.toml; docs/experiments.md) names a kind of cell:

* ``kind = "head"`` (design A, the crowd benchmark): the sentiment head trained on a cached
  feature set (features.py) with settings `heads.HeadConfig`; ``model = "ngram"`` with
  ``text = "news" | "news_user" | "response"`` is the classical char n-gram baseline
  (forecast.py) on those texts; ``shrink = true`` on a model row mixes its forecast with the
  training prior, ``w`` chosen inside the training events; a row with ``reference =`` is
  model-free: ``"prior"`` (the training events' pooled label mix for every held-out case),
  ``"uniform"``, ``"cases"`` (each held-out case's own label: a per-case model that is always
  right, the ceiling of averaging cases) or ``"floor"`` (no forecast: each event's noise floor,
  what a forecast of its true mix scores on average);
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
from socialalign_jax.core.divergence import jensen_shannon
from socialalign_jax.core.errors import UserError
from socialalign_jax.data import tfds_builders as B
from socialalign_jax.evaluation import skill as SK
from socialalign_jax.evaluation.predictions import load_predictions
from socialalign_jax.experiments import cells as C, features as FE, folds as FO, forecast as FC, heads, summary as S
from socialalign_jax.experiments.features import FeatureSet
from socialalign_jax.experiments.heads import HeadConfig

CELLS = "cells.jsonl"
KINDS = ("head", "train")
REFERENCES = ("prior", "uniform", "cases", "floor")
MODELS = ("head", "ngram")
TEXTS = ("news", "news_user", "response")
# Row keys that choose the method rather than the head's settings (all of them enter the cell key).
_ROW_META = ("name", "label", "reference", "flags", "model", "text", "shrink")


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
        if r.get("model", "head") not in MODELS:
            raise UserError(f"{where}: field 'model': expected one of {MODELS}, got {r['model']!r}")
        if r.get("model") == "ngram" and r.get("text") not in TEXTS:
            raise UserError(f"{where}: field 'text': expected one of {TEXTS} for an ngram row, got {r.get('text')!r}")
        if not isinstance(r.get("shrink", False), bool):
            raise UserError(f"{where}: field 'shrink': expected true or false, got {r['shrink']!r}")
        if plan["kind"] != "head" and any(k in r for k in ("model", "text", "shrink")):
            raise UserError(f"{where}: fields model/text/shrink are for plans of kind 'head'")
        if plan["kind"] != "head" and r.get("reference") == "cases":
            raise UserError(f"{where}: field 'reference': 'cases' needs the cases' labels of a head plan")
        if plan["kind"] == "head" and r.get("reference") is None and r.get("model", "head") == "head":
            try:
                HeadConfig.from_dict(row_settings(plan, r))
            except (TypeError, ValueError) as e:
                raise UserError(f"{where}: {e}") from None
    for i, c in enumerate(plan["compare"]):
        if not isinstance(c, dict) or c.get("a") not in seen or c.get("b") not in seen:
            raise UserError(f"{path}: compare[{i}]: expected {{a = ROW, b = ROW}} naming rows of this plan, got {c!r}")
    if plan.get("baseline") is not None and plan["baseline"] not in seen:
        raise UserError(f"{path}: field 'baseline': {plan['baseline']!r} is not a row of this plan")
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
        self._memo: dict[str, tuple[np.ndarray, dict]] = {}
        self._doc_cache: dict[str, list] = {}
        self._matrices: dict[tuple, tuple] = {}
        if self.fs.partial:  # a cell on a partial cache is a different cell from one on the complete cache
            self.identity["events"] = self.fs.event_names

    def run(self, plan: dict, row: dict, fold: int, seed: int) -> dict:
        fs = self.fs
        ev = fs.examples["event"]
        labels = fs.examples["label"]
        held = np.asarray([self.fold_of[n] == fold for n in fs.event_names])  # [E]
        test_events, train_events = np.flatnonzero(held), np.flatnonzero(~held)
        test_idx = np.flatnonzero(held[ev])
        real, k = fs.real, fs.real.shape[1]
        prior = SK.prior(real, fs.counts, train_events)
        extra: dict[str, Any] = {}
        hard = True
        if row.get("reference") == "floor":  # no forecast: each held-out event's noise floor stands as its JSD
            floors = fs.noise_floor
            events = [{"event": fs.event_names[e], "n": int((ev == e).sum()), "real": real[e].tolist(),
                       "jsd": float(floors[e])} for e in test_events]
            if not np.all(np.isfinite(floors[test_events])):
                raise CellFailed(f"{fs.path}: the cache's events carry no noise floor; rerun the features command")
            return {"events": events, "metrics": C.cell_metrics(events, fs.classes)}
        if row.get("reference") == "prior":
            probs = np.broadcast_to(prior, (test_idx.size, k))
        elif row.get("reference") == "uniform":
            probs, hard = np.full((test_idx.size, k), 1.0 / k), False
        elif row.get("reference") == "cases":  # each case's own label (unlabelled: the prior)
            lab = labels[test_idx]
            probs = np.where((lab >= 0)[:, None], np.eye(k)[np.maximum(lab, 0)], prior)
        else:
            probs, info = self._forecast(plan, row, train_events, test_events, fold, seed)
            extra.update(info)
            if row.get("shrink"):
                w = self._shrink_weight(plan, row, train_events, fold, seed, info)
                probs = SK.shrink(probs, prior, w)
                extra["shrink_w"] = w
        remap = {int(e): i for i, e in enumerate(test_events)}
        events = C.event_records([fs.event_names[e] for e in test_events], real[test_events], np.asarray(probs),
                                 labels[test_idx], np.asarray([remap[int(e)] for e in ev[test_idx]]), hard=hard)
        return {"events": events, "metrics": C.cell_metrics(events, fs.classes), **extra}

    # -- model rows: a forecast for the examples of `target` events from a fit on `train` events

    def _forecast(self, plan: dict, row: dict, train: np.ndarray, target: np.ndarray, fold: int, seed: int,
                  fixed: dict | None = None) -> tuple[np.ndarray, dict]:
        """[examples of `target` events, K] probabilities (in example order) and what the fit chose.
        Memoised per (method, events, seed): a shrunk row reuses its unshrunk twin's forecasts."""
        memo_key = _digest({"row": row_settings(plan, row), **{k: row.get(k) for k in ("model", "text")},
                            "train": train.tolist(), "target": target.tolist(), "seed": seed, "fixed": fixed})
        if memo_key not in self._memo:
            if row.get("model", "head") == "head":
                self._memo[memo_key] = self._head_forecast(plan, row, train, target, seed)
            else:
                self._memo[memo_key] = self._ngram_forecast(row, train, target, fold, seed, fixed)
        probs, info = self._memo[memo_key]
        return probs, dict(info)

    def _head_forecast(self, plan, row, train, target, seed):
        fs, ev = self.fs, self.fs.examples["event"]
        cfg = heads.HeadConfig.from_dict(row_settings(plan, row))
        train_idx = np.flatnonzero(np.isin(ev, train))
        head, curve = heads.train_head(cfg, fs.features, fs.examples["label"], ev, train_idx, fs.real, seed)
        return heads.predict(cfg, head, fs.features[np.flatnonzero(np.isin(ev, target))]), {"curve": _curve_record(curve)}

    def _docs(self, text: str) -> list:
        """Per example, the char n-gram counts of its `text` ('news', 'news_user' or 'response'), computed once."""
        if text not in self._doc_cache:
            if self.fs.texts is None:
                raise CellFailed(f"{self.fs.path}: no {FE.TEXTS} (a cache from before the n-gram rows); "
                                 "rerun `launch/experiment.py features` on it (the features are kept)")
            parts = {"news": ("news",), "news_user": ("news", "user"), "response": ("response",)}[text]
            self._doc_cache[text] = [FC.char_ngrams("\n".join(t[p] for p in parts)) for t in self.fs.texts]
        return self._doc_cache[text]

    def _ngram_forecast(self, row, train, target, fold, seed, fixed):
        """news: one document per event, fitted to the events' target mixes (soft labels); news_user and
        response: one per case, fitted to the cases' labels, an event's forecast the mean over its cases.
        C is chosen by inner cross-validation over the training events (or `fixed`)."""
        fs, ev, text = self.fs, self.fs.examples["event"], row["text"]
        docs = self._docs(text)
        first = {}
        for i, e in enumerate(ev):
            first.setdefault(int(e), i)

        def matrices(tr_events, tg_events):
            """(X_train, y_train, X_target rows per target example): the vectoriser is fitted on the
            training documents only, and reused for every C tried on the same split."""
            key = (text, tuple(map(int, tr_events)), tuple(map(int, tg_events)))
            if key not in self._matrices:
                if text == "news":  # one document and one soft target per event
                    tr_rows = [first[int(e)] for e in tr_events]
                    y = fs.real[tr_events]
                else:
                    tr_rows = [i for i in np.flatnonzero(np.isin(ev, tr_events)) if fs.examples["label"][i] >= 0]
                    y = np.eye(fs.real.shape[1])[fs.examples["label"][tr_rows]]
                vec = FC.Tfidf.fit([docs[i] for i in tr_rows])
                tg_rows = np.flatnonzero(np.isin(ev, tg_events))
                if text == "news":  # the event's document for each of its cases
                    x_tg = vec.transform([docs[first[int(ev[i])]] for i in tg_rows])
                else:
                    x_tg = vec.transform([docs[i] for i in tg_rows])
                if len(self._matrices) >= 8:
                    self._matrices.pop(next(iter(self._matrices)))
                self._matrices[key] = (vec.transform([docs[i] for i in tr_rows]), y, x_tg)
            return self._matrices[key]

        def fit_predict(tr_events, tg_events, c):
            x_tr, y, x_tg = matrices(tr_events, tg_events)
            return FC.Softmax.fit(x_tr, y, c).predict(x_tg)

        if fixed is not None:
            c = fixed["c"]
        else:  # inner CV over the training events: the C whose out-of-fold event forecasts are closest
            names = [fs.event_names[e] for e in train]
            inner = FC.inner_folds(names, seed=_inner_seed(fold, seed))
            pos = {n: e for n, e in zip(names, train)}
            scores = {}
            for c_try in FC.C_GRID:
                jsds = []
                for members in inner:
                    tg = np.asarray(sorted(pos[n] for n in members))
                    tr = np.setdiff1d(train, tg)
                    pred = _event_means(fit_predict(tr, tg, c_try), ev[np.isin(ev, tg)], tg)
                    jsds.append(jensen_shannon(fs.real[tg], pred))
                scores[c_try] = float(np.mean(np.concatenate(jsds)))
            c = min(FC.C_GRID, key=lambda x: (round(scores[x], 12), x))
        return fit_predict(train, target, c), {"c": c}

    def _shrink_weight(self, plan, row, train, fold, seed, info) -> float:
        """w for `row`'s forecast, from out-of-fold forecasts of the TRAINING events (inner folds), each
        against the prior of its own inner training events; held-out events never enter."""
        fs, ev = self.fs, self.fs.examples["event"]
        names = [fs.event_names[e] for e in train]
        pos = {n: e for n, e in zip(names, train)}
        fixed = {"c": info["c"]} if "c" in info else None
        fc, pr, rl = [], [], []
        for members in FC.inner_folds(names, seed=_inner_seed(fold, seed)):
            tg = np.asarray(sorted(pos[n] for n in members))
            tr = np.setdiff1d(train, tg)
            probs, _ = self._forecast(plan, row, tr, tg, fold, seed, fixed=fixed)
            fc.append(_event_means(probs, ev[np.isin(ev, tg)], tg))
            pr.append(np.broadcast_to(SK.prior(fs.real, fs.counts, tr), (tg.size, fs.real.shape[1])))
            rl.append(fs.real[tg])
        return SK.choose_weight(np.concatenate(fc), np.concatenate(pr), np.concatenate(rl))


def _inner_seed(fold: int, seed: int) -> int:
    return 7919 * (fold + 1) + seed


def _event_means(probs: np.ndarray, event_of: np.ndarray, events: np.ndarray) -> np.ndarray:
    """[len(events), K] the mean of `probs` rows per event (rows in example order, `event_of` their events)."""
    return np.stack([probs[event_of == e].mean(axis=0) for e in events])


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
        if row.get("reference") is not None:
            return self._reference(row["reference"], data)
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

    def _reference(self, kind: str, data: Path) -> dict:
        """A model-free row on the fold's held-out events: the training prior, uniform, or each event's noise floor."""
        ds = self.B.open_dataset(data)
        classes = list(ds.metadata.get("classes"))
        names = list(ds.metadata["events"])
        train = {e: t for e, t in ds.targets("train").items() if t["count"] > 0}
        test = {e: t for e, t in ds.targets("test").items() if t["count"] > 0}
        test_ids = sorted(test)
        real = np.asarray([test[e]["dist"] for e in test_ids], np.float64)
        if kind == "floor":
            events = [{"event": names[e], "n": 0, "real": test[e]["dist"], "jsd": float(test[e]["noise_floor"])}
                      for e in test_ids]
            return {"events": events, "metrics": C.cell_metrics(events, classes)}
        if kind == "prior":
            es = sorted(train)
            p = SK.prior(np.asarray([train[e]["dist"] for e in es]), np.asarray([train[e]["count"] for e in es]))
        elif kind == "uniform":
            p = np.full(len(classes), 1.0 / len(classes))
        else:
            raise CellFailed(f"reference {kind!r} is for head plans (it needs the cases' features or labels)")
        events = C.event_records([names[e] for e in test_ids], real, np.broadcast_to(p, real.shape),
                                 np.full(len(test_ids), -1), np.arange(len(test_ids)), hard=False)
        return {"events": events, "metrics": C.cell_metrics(events, classes)}


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
                       **{k: row[k] for k in ("model", "text", "shrink") if k in row},
                       # the grids the inner cross-validation chooses from: a wider grid is another cell
                       **({"c_grid": FC.C_GRID, "inner_folds": FC.INNER_FOLDS} if row.get("model") == "ngram" else {}),
                       **({"weights": SK.WEIGHTS, "inner_folds": FC.INNER_FOLDS} if row.get("shrink") else {}),
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
                       confidence=float(bs.get("confidence", 0.95)), baseline=plan.get("baseline"))
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
    if summ.get("baseline"):
        md += (f"\n\nSkill vs {labels.get(summ['baseline'], summ['baseline'])}: 1 - the row's mean event JSD / "
               "the baseline's, on the same held-out events, folds and seeds (+12% = 12% closer to the real "
               "crowd; an interval containing 0: not shown to be better).")
    ws = {r: [c["shrink_w"] for c in cs if "shrink_w" in c] for r, cs in by_row.items()}
    ws = {r: v for r, v in ws.items() if v}
    if ws:
        md += ("\n\nShrink weights w (chosen per cell by inner cross-validation on the training events; "
               "0 = the prior): " + "; ".join(f"{labels.get(r, r)}: median {np.median(v):.2f} "
                                             f"(range {min(v):.2f}-{max(v):.2f})" for r, v in ws.items()) + ".")
    cs_ = {r: [c["c"] for c in cs if "c" in c] for r, cs in by_row.items()}
    cs_ = {r: v for r, v in cs_.items() if v}
    if cs_:
        md += ("\n\nn-gram L2 settings C (chosen per cell by inner cross-validation on the training events): "
               + "; ".join(f"{labels.get(r, r)}: {', '.join(f'{c:g} x{v.count(c)}' for c in sorted(set(v)))}"
                           for r, v in cs_.items()) + ".")
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
