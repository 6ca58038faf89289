"""The sentiment head's metrics over a set of examples: one implementation for the trainer's
held-out evaluation (`train.evaluate.evaluate_split`) and for `launch/evaluate.py`
(`evaluation.predictions.evaluate`), so the two report the same numbers for the same examples.

Micro: accuracy, macro-F1, cross-entropy and the majority-class baseline over the labelled
examples. Macro: per event, the mean of the head's distributions over all of the event's
examples (labelled or not), and its JSD to the event's target distribution; `macro_jsd` is the
unweighted mean over the events that have a target. Everything in float64 numpy.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from socialalign_jax.evaluation import distributions, metrics


def head_metrics(probs, labels, event_ids, targets: Mapping[int, object]) -> dict:
    """probs [N, K] (rows sum to 1), labels [N] class ids (-1 = unlabelled), event_ids [N],
    targets {event_id: [K]} (events without one are left out of the macro metric).

    Returns sentiment_accuracy, sentiment_macro_f1 (with sentiment_f1_classes, the class ids
    averaged over), sentiment_ce, majority_baseline_accuracy, sentiment_num_labelled,
    macro_jsd, num_events, and per_event {event_id: mean distribution [K] as a list}.
    """
    p = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    events = np.asarray(event_ids, np.int64)
    if p.ndim != 2 or labels.shape != (len(p),) or events.shape != (len(p),):
        raise ValueError(f"head_metrics: probs {p.shape}, labels {labels.shape}, event_ids {events.shape} "
                         "must be [N, K], [N], [N]")
    out: dict = {}
    lab = labels >= 0
    n_lab = int(lab.sum())
    out["sentiment_num_labelled"] = n_lab
    if n_lab:
        gold, pred = labels[lab].tolist(), p[lab].argmax(-1).tolist()
        out["sentiment_accuracy"] = metrics.accuracy(gold, pred)
        out["sentiment_macro_f1"], out["sentiment_f1_classes"] = metrics.macro_f1(gold, pred)
        out["sentiment_ce"] = float(-np.log(np.clip(p[lab, labels[lab]], 1e-30, None)).mean())
        counts = np.bincount(labels[lab], minlength=p.shape[1])
        out["majority_baseline_accuracy"] = float(counts.max() / counts.sum())
    per_event = {int(e): p[events == e].mean(0).tolist() for e in sorted(set(events.tolist()))}
    jsds = [float(distributions.jsd(targets[e], mean)) for e, mean in per_event.items() if targets.get(e) is not None]
    out["macro_jsd"] = float(np.mean(jsds)) if jsds else math.nan
    out["num_events"] = len(jsds)
    out["per_event"] = per_event
    return out
