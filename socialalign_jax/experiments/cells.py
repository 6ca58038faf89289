"""One cell's metrics (a row, a fold, a seed), kept per held-out event so that a summary can
resample events: per event its real and predicted distributions, JSD, confusion matrix of the
head's argmax against the labels, and (with generation) the summed character ROUGE-L.

The per-cell numbers use the evaluation package's own functions (distributions.jsd,
metrics.accuracy / macro_f1 / rouge_l); `macro_f1_confusion` is the same definition on
confusion matrices, for the bootstrap.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from socialalign_jax.evaluation import distributions, metrics


def event_records(names: Sequence[str], real: np.ndarray, probs: np.ndarray, labels: np.ndarray,
                  event_of: np.ndarray, *, hard: bool = True, rouge: np.ndarray | None = None) -> list[dict]:
    """Per held-out event (in `names` order): n, real, pred (mean head probabilities), jsd, conf, rouge_sum.

    names/real [E, K]: the held-out events; probs [N, K], labels [N] (-1 unlabelled), event_of [N]
    (index into names) for their examples. hard=False (a reference with no classifier, e.g.
    uniform) leaves the confusion matrix out. rouge [N]: per-example ROUGE-L F, or None.
    """
    k = probs.shape[1]
    out = []
    for e, name in enumerate(names):
        sel = np.flatnonzero(event_of == e)
        rec = {"event": name, "n": int(sel.size), "real": [float(x) for x in real[e]]}
        if sel.size:
            pred = probs[sel].mean(axis=0)
            rec["pred"] = [float(x) for x in pred]
            rec["jsd"] = float(distributions.jsd(real[e], pred))
        if hard:
            lab = labels[sel]
            keep = lab >= 0
            conf = np.zeros((k, k), np.int64)
            np.add.at(conf, (lab[keep], probs[sel][keep].argmax(axis=1)), 1)
            rec["conf"] = conf.tolist()
        if rouge is not None:
            rec["rouge_sum"] = float(np.sum(rouge[sel]))
        out.append(rec)
    return out


def cell_metrics(events: list[dict], classes: Sequence[str]) -> dict:
    """The cell's point metrics: mean event JSD, head macro-F1 and accuracy (on labelled cases), ROUGE-L."""
    with_pred = [e for e in events if "jsd" in e]
    out = {"num_events": len(events), "num_cases": int(sum(e["n"] for e in events)),
           "jsd_mean": float(np.mean([e["jsd"] for e in with_pred])) if with_pred else math.nan}
    if events and all("conf" in e for e in events):
        gold, pred = [], []
        for e in events:
            for g, row in enumerate(e["conf"]):
                for p, c in enumerate(row):
                    gold += [classes[g]] * c
                    pred += [classes[p]] * c
        out["macro_f1"] = metrics.macro_f1(gold, pred)[0] if gold else math.nan
        out["accuracy"] = metrics.accuracy(gold, pred) if gold else math.nan
    if events and all("rouge_sum" in e for e in events):
        n = sum(e["n"] for e in events)
        out["rougeL"] = sum(e["rouge_sum"] for e in events) / n if n else math.nan
    return out


def rouge_l_f(references: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
    """Per-pair character ROUGE-L F (metrics.rouge_l)."""
    return np.asarray([metrics.rouge_l(r, h)["f"] for r, h in zip(references, hypotheses)], np.float64)
