"""Summaries of finished cells: per row the mean over folds and seeds of each metric with a 95%
bootstrap interval over held-out events, and paired differences between named rows.

The resampling unit is the held-out event. Events are resampled within their fold (a
stratified bootstrap, `bootstrap.resample_weights(strata=fold)`), and one weight row
applies to every seed and every row: a metric is recomputed per cell from the weighted
per-event quantities, then averaged over the cells exactly as the point estimate is. A
paired difference A - B uses the same weight rows for A and B over the cells both have
(same fold, same seed, hence the same events), so the event-to-event variation that both
rows share cancels.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from socialalign_jax.evaluation import bootstrap, metrics

METRICS = ("jsd_mean", "macro_f1", "accuracy", "rougeL")


def _event_table(cells: Sequence[dict]) -> tuple[list[str], np.ndarray]:
    """Every held-out event of these cells, sorted, and its fold (the bootstrap stratum)."""
    fold = {}
    for c in cells:
        for e in c["events"]:
            if fold.setdefault(e["event"], c["fold"]) != c["fold"]:
                raise ValueError(f"event {e['event']!r} is held out in folds {fold[e['event']]} and {c['fold']}")
    names = sorted(fold)
    return names, np.asarray([fold[n] for n in names], np.int64)


def _cell_stat(cell: dict, metric: str, pos: dict[str, int], w: np.ndarray) -> np.ndarray:
    """The cell's metric under event weights w [R, E_all] -> [R] (nan when the cell lacks it)."""
    evs = cell["events"]
    cols = np.asarray([pos[e["event"]] for e in evs], np.int64)
    ww = w[:, cols].astype(np.float64)  # [R, e]
    if metric == "jsd_mean":
        if not all("jsd" in e for e in evs):
            return np.full(w.shape[0], np.nan)
        v = np.asarray([e["jsd"] for e in evs])
        return ww @ v / ww.sum(1)
    if metric in ("macro_f1", "accuracy"):
        if not all("conf" in e for e in evs):
            return np.full(w.shape[0], np.nan)
        conf = np.einsum("re,ekl->rkl", ww, np.asarray([e["conf"] for e in evs], np.float64))
        if metric == "macro_f1":
            return metrics.macro_f1_confusion(conf)
        total = conf.sum((1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.trace(conf, axis1=1, axis2=2) / total
    if metric == "rougeL":
        if not all("rouge_sum" in e for e in evs):
            return np.full(w.shape[0], np.nan)
        s = np.asarray([e["rouge_sum"] for e in evs])
        n = np.asarray([e["n"] for e in evs], np.float64)
        return (ww @ s) / (ww @ n)
    raise ValueError(f"unknown metric {metric!r}")


def _row_stat(cells: Sequence[dict], metric: str, pos: dict[str, int]):
    def stat(w):
        return np.mean(np.stack([_cell_stat(c, metric, pos, w) for c in cells]), axis=0)
    return stat


def summarise(cells_by_row: dict[str, list[dict]], compare: Sequence[tuple[str, str]], *,
              n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95, baseline: str | None = None) -> dict:
    """{'rows': {row: {metric: {point, low, high, ...}, 'cells': n}}, 'differences': [...]}.

    `baseline` (a row, e.g. the training prior): each row also gets 'skill' = 1 - its mean event JSD /
    the baseline's over the cells both have (same folds, seeds and events), with its interval: the
    share of the baseline's error the row removes (0: no better; negative: worse).
    """
    every = [c for cs in cells_by_row.values() for c in cs]
    if not every:
        return {"rows": {}, "differences": []}
    names, strata = _event_table(every)
    pos = {n: i for i, n in enumerate(names)}
    kw = dict(n_resamples=n_resamples, seed=seed, confidence=confidence, strata=strata)
    out: dict = {"rows": {}, "differences": [], "num_events": len(names), "n_resamples": n_resamples,
                 "confidence": confidence}
    for row, cells in cells_by_row.items():
        res = {"cells": len(cells), "folds": len({c["fold"] for c in cells}), "seeds": len({c["seed"] for c in cells})}
        for m in METRICS:
            if not cells or all(math.isnan(_cell_stat(c, m, pos, np.ones((1, len(names))))[0]) for c in cells):
                continue
            res[m] = bootstrap.bootstrap(_row_stat(cells, m, pos), len(names), **kw)
        out["rows"][row] = res
    base = {(c["fold"], c["seed"]): c for c in cells_by_row.get(baseline, [])} if baseline else {}
    for row, cells in cells_by_row.items():
        mine = {(c["fold"], c["seed"]): c for c in cells}
        common = sorted(set(mine) & set(base))
        if row == baseline or not common or "jsd_mean" not in out["rows"][row]:
            continue
        sa = _row_stat([mine[k] for k in common], "jsd_mean", pos)
        sb = _row_stat([base[k] for k in common], "jsd_mean", pos)
        out["rows"][row]["skill"] = bootstrap.bootstrap(lambda w, sa=sa, sb=sb: 1.0 - sa(w) / sb(w), len(names), **kw)
    out["baseline"] = baseline if base else None
    for a, b in compare:
        ca = {(c["fold"], c["seed"]): c for c in cells_by_row.get(a, [])}
        cb = {(c["fold"], c["seed"]): c for c in cells_by_row.get(b, [])}
        common = sorted(set(ca) & set(cb))
        diff: dict = {"a": a, "b": b, "cells": len(common)}
        if common:
            for m in METRICS:
                sa, sb = _row_stat([ca[k] for k in common], m, pos), _row_stat([cb[k] for k in common], m, pos)
                if math.isnan(sa(np.ones((1, len(names))))[0]) or math.isnan(sb(np.ones((1, len(names))))[0]):
                    continue
                r = bootstrap.bootstrap(lambda w, sa=sa, sb=sb: sa(w) - sb(w), len(names), **kw)
                r["excludes_zero"] = bool(r["low"] > 0 or r["high"] < 0)
                diff[m] = r
        out["differences"].append(diff)
    return out


def _ci(r: dict | None, nd: int = 4) -> str:
    if r is None:
        return ""
    return f"{r['point']:.{nd}f} [{r['low']:.{nd}f}, {r['high']:.{nd}f}]"


def _pct(r: dict | None) -> str:
    if r is None:
        return ""
    return f"{100 * r['point']:+.1f}% [{100 * r['low']:+.1f}%, {100 * r['high']:+.1f}%]"


def markdown(summary: dict, labels: dict[str, str] | None = None, title: str = "") -> str:
    """The rows table and the paired-differences table, intervals in brackets."""
    labels = labels or {}
    lines = [f"**{title}**", ""] if title else []
    has_rouge = any("rougeL" in r for r in summary["rows"].values())
    base = summary.get("baseline")
    head = "| row | cells (folds x seeds) | mean event JSD [95% CI] |"
    sep = "|---|---|---|"
    if base:
        head, sep = head + f" skill vs {labels.get(base, base)} [95% CI] |", sep + "---|"
    head, sep = head + " case macro-F1 [95% CI] | case accuracy [95% CI] |", sep + "---|---|"
    if has_rouge:
        head, sep = head + " ROUGE-L [95% CI] |", sep + "---|"
    lines += [head, sep]
    for row, r in summary["rows"].items():
        line = f"| {labels.get(row, row)} | {r['cells']} ({r['folds']} x {r['seeds']}) | {_ci(r.get('jsd_mean'))} |"
        if base:
            line += f" {_pct(r.get('skill'))} |"
        line += f" {_ci(r.get('macro_f1'))} | {_ci(r.get('accuracy'))} |"
        if has_rouge:
            line += f" {_ci(r.get('rougeL'))} |"
        lines.append(line)
    if summary["differences"]:
        lines += ["", "| paired difference (A - B) | cells | d mean event JSD [95% CI] | d macro-F1 [95% CI] | "
                  "d accuracy [95% CI] |", "|---|---|---|---|---|"]
        for d in summary["differences"]:
            def cell(m):
                r = d.get(m)
                return "" if r is None else _ci(r) + (" *" if r["excludes_zero"] else "")
            lines.append(f"| {labels.get(d['a'], d['a'])} - {labels.get(d['b'], d['b'])} | {d['cells']} | "
                         f"{cell('jsd_mean')} | {cell('macro_f1')} | {cell('accuracy')} |")
        lines += ["", f"Intervals: {int(summary['confidence'] * 100)}% percentile bootstrap over the "
                  f"{summary['num_events']} held-out events ({summary['n_resamples']} resamples, events resampled "
                  "within their fold, the same resamples for every row); * = the interval of a difference "
                  "excludes 0. Lower JSD is better."]
    return "\n".join(lines)
