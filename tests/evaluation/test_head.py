"""evaluation/head.py: the sentiment head's metrics, one implementation for the trainer's held-out
evaluation and launch/evaluate.py.

References: a plain numpy re-derivation of accuracy, macro-F1, cross-entropy and the majority
baseline, scipy's jensenshannon (base e, squared) for each event's JSD, and the predictions-file
path (`evaluation.predictions.evaluate`) fed the same examples.
"""

from __future__ import annotations

import numpy as np
import pytest

from socialalign_jax.core.labels import DEFAULT_LABELS
from socialalign_jax.evaluation.head import head_metrics
from socialalign_jax.evaluation.predictions import evaluate


def _data(seed=0, n=40, k=3, events=5):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(k), n)
    labels = rng.integers(0, k, n)
    labels[rng.random(n) < 0.2] = -1  # unlabelled rows still count in their event's distribution
    ev = rng.integers(0, events, n)
    targets = {e: rng.dirichlet(np.ones(k)) for e in range(events)}
    return probs, labels, ev, targets


def test_against_a_numpy_and_scipy_rederivation():
    spatial = pytest.importorskip("scipy.spatial")
    probs, labels, ev, targets = _data()
    got = head_metrics(probs, labels, ev, targets)
    lab = labels >= 0
    pred = probs.argmax(1)
    assert got["sentiment_accuracy"] == pytest.approx((pred[lab] == labels[lab]).mean(), abs=1e-12)
    f1 = []
    for c in sorted(set(labels[lab]) | set(pred[lab])):
        tp = np.sum((labels[lab] == c) & (pred[lab] == c))
        fp = np.sum((labels[lab] != c) & (pred[lab] == c))
        fn = np.sum((labels[lab] == c) & (pred[lab] != c))
        f1.append(2 * tp / (2 * tp + fp + fn))
    assert got["sentiment_macro_f1"] == pytest.approx(np.mean(f1), abs=1e-12)
    assert got["sentiment_ce"] == pytest.approx(-np.mean(np.log(probs[lab, labels[lab]])), abs=1e-12)
    assert got["majority_baseline_accuracy"] == pytest.approx(np.bincount(labels[lab]).max() / lab.sum())
    want = [spatial.distance.jensenshannon(probs[ev == e].mean(0), targets[e], base=np.e) ** 2
            for e in sorted(set(ev))]
    assert got["macro_jsd"] == pytest.approx(np.mean(want), abs=1e-12)
    assert got["num_events"] == len(want) and got["sentiment_num_labelled"] == lab.sum()


def test_events_without_a_target_are_left_out_of_the_macro_metric():
    probs, labels, ev, targets = _data(1)
    some = {e: t for e, t in targets.items() if e != 2}
    got = head_metrics(probs, labels, ev, some)
    assert got["num_events"] == len(set(ev) - {2}) and 2 in got["per_event"]
    assert np.isnan(head_metrics(probs, labels, ev, {})["macro_jsd"])
    with pytest.raises(ValueError, match="must be"):
        head_metrics(probs, labels[:-1], ev, targets)


def test_launch_evaluate_reports_the_trainers_numbers_for_the_same_examples():
    """What the trainer computes (head_metrics over the split's arrays) == what evaluate.py computes
    from a predictions file holding the same examples."""
    probs, labels, ev, targets = _data(2, k=len(DEFAULT_LABELS))
    trainer = head_metrics(probs, labels, ev, targets)
    records = [{"event": f"e{e}", "event_id": int(e), "user": "u", "prompt_id": i, "generated": "好", "reference": "好",
                "labels": list(DEFAULT_LABELS), "label": DEFAULT_LABELS[lab] if lab >= 0 else None,
                "probs": p.tolist(), "target_dist": targets[int(e)].tolist()}
               for i, (p, lab, e) in enumerate(zip(probs, labels, ev))]
    got = evaluate(records)
    assert got["micro"]["sentiment_accuracy"] == trainer["sentiment_accuracy"]
    assert got["micro"]["sentiment_macro_f1"] == trainer["sentiment_macro_f1"]
    assert got["macro"]["head"]["jsd_mean"] == pytest.approx(trainer["macro_jsd"], abs=1e-15)
    assert got["sentiment_f1_classes"] == [DEFAULT_LABELS[c] for c in trainer["sentiment_f1_classes"]]
