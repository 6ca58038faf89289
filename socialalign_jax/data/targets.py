"""Macro targets: each event's real sentiment distribution.

L_macro compares the batch-sampled distribution of an event against the distribution over
*all* of that event's labelled responses in the training split, not just the few that
happen to be in a batch (SPEC section 3). That needs a dataset-wide pass, so it is computed
once at build time and stored with the data (targets.json and `target_dist` per example).

Which responses an example's target comes from:
  * the event has a crowd (`Event.crowd`: label counts over a wide sample of its responders,
    e.g. every CED responder with words of their own, capped) -> the crowd (source 'crowd'),
    in every split: the crowd is what "how did the public respond" means, and the cases (users
    with a history) are a small, selected part of it;
  * else, the event has labelled responses in the train split -> those (source 'train');
    with an event split this is every train event, with a user split it is also the
    test rows of an event seen in training;
  * otherwise (a held-out event) -> the event's own labelled responses in the example's
    split (source 'heldout'): the real distribution the macro metric is scored against;
  * no labelled response at all -> all zeros (source 'none'); a row whose target sums to 0
    carries no macro signal and must be skipped by the loss.

Each entry also records its noise floor (`core.divergence.noise_floor`): the JSD expected
between the event's mix and a sample of `count` responses from it, i.e. how far even a
perfect forecast lands from this target on average. A forecast error near it is noise.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from socialalign_jax.core.divergence import noise_floor
from socialalign_jax.core.labels import DEFAULT_LABELS


def label_id(sentiment, classes: Sequence[str] = DEFAULT_LABELS) -> int:
    """Class id of a sentiment given as a name, an int id, or None (-> -1, unlabelled)."""
    if sentiment is None or sentiment == "":
        return -1
    if isinstance(sentiment, (int, np.integer)) and not isinstance(sentiment, bool):
        if not -1 <= int(sentiment) < len(classes):
            raise ValueError(f"sentiment id {sentiment} out of range [-1, {len(classes)})")
        return int(sentiment)
    name = str(sentiment).strip().lower()
    if name not in classes:
        raise ValueError(f"unknown sentiment {sentiment!r}; expected one of {list(classes)}")
    return classes.index(name)


def label_counts(event_ids: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[int, np.ndarray]:
    """{event_id: counts[K]} over labelled rows (label >= 0)."""
    event_ids = np.asarray(event_ids, np.int64)
    labels = np.asarray(labels, np.int64)
    out: dict[int, np.ndarray] = {}
    for e in np.unique(event_ids):
        lab = labels[(event_ids == e) & (labels >= 0)]
        out[int(e)] = np.bincount(lab, minlength=num_classes)[:num_classes].astype(np.int64)
    return out


def crowd_counts(crowd: Mapping[str, int], classes: Sequence[str]) -> np.ndarray:
    """[K] int64 counts of a crowd {label: count} in class-id order (labels outside `classes` are an error)."""
    unknown = sorted(set(crowd) - set(classes))
    if unknown:
        raise ValueError(f"crowd label {unknown[0]!r} is not one of {list(classes)}")
    return np.asarray([int(crowd.get(c, 0)) for c in classes], np.int64)


def macro_targets(splits: Mapping[str, tuple[np.ndarray, np.ndarray]], num_classes: int = 3,
                  train_split: str = "train", crowds: Mapping[int, np.ndarray] | None = None
                  ) -> dict[str, dict[int, dict]]:
    """Per split and event: {'dist': [K] floats, 'count': responses used, 'source', 'noise_floor'}.

    `splits` maps split name -> (event_ids [N], labels [N]) of that split's examples;
    `crowds` maps an event id -> its crowd's counts [K] (`crowd_counts`), which then is its target.
    """
    counts = {name: label_counts(ev, lab, num_classes) for name, (ev, lab) in splits.items()}
    train = counts.get(train_split, {})
    crowds = crowds or {}
    out: dict[str, dict[int, dict]] = {}
    for name, per_event in counts.items():
        out[name] = {}
        for e, own in per_event.items():
            if e in crowds and np.sum(crowds[e]) > 0:
                c, source = np.asarray(crowds[e], np.int64), "crowd"
            elif e in train and train[e].sum() > 0:
                c, source = train[e], "train"
            elif own.sum() > 0:
                c, source = own, "heldout"
            else:
                c, source = np.zeros(num_classes, np.int64), "none"
            total = int(c.sum())
            dist = (c / total) if total else np.zeros(num_classes)
            floor = noise_floor(dist, total) if total else None
            out[name][e] = {"dist": [float(x) for x in dist], "count": total, "source": source,
                            "noise_floor": floor}
    return out


def to_json(targets: Mapping[str, Mapping[int, dict]], event_names: Sequence[str]) -> dict:
    """JSON-able form (string keys, event names added) for targets.json / dataset metadata."""
    return {split: {str(e): {"event": event_names[e], **t} for e, t in sorted(per.items())}
            for split, per in targets.items()}


def from_json(blob: Mapping) -> dict[str, dict[int, dict]]:
    return {split: {int(e): dict(t) for e, t in per.items()} for split, per in blob.items()}
