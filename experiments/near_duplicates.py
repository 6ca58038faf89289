"""Does a row's score on a crowd benchmark lean on near-duplicate events?

    python experiments/near_duplicates.py --features /tmp/socialalign_crowd/features/ced \
        --cells /tmp/socialalign_crowd/runs/ced/cells.jsonl [--threshold 0.5] [--rows ngram_news,head]

Folds split by event, not by story: CED holds some rumours twice (the same news posted again, or
reworded), and a model that reads the news text could score on a held-out event by remembering
its twin among the training events. This check needs no rerun: for every event it takes the
largest char-trigram Jaccard similarity between its news and any other featurised event's news,
keeps the held-out events whose largest similarity is below --threshold (no twin anywhere, so
none in any training fold), and recomputes each row's mean event JSD and skill against the prior
on those events alone, from the per-event results the runner stored in cells.jsonl (same cells,
same folds and seeds). Intervals: 95% percentile bootstrap over the kept events (their JSD
averaged over seeds first; the same resamples for every row).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def trigrams(text: str) -> frozenset[str]:
    """The set of a text's character trigrams (a text under 3 characters: itself)."""
    return frozenset(text[i:i + 3] for i in range(len(text) - 2)) or frozenset([text])


def max_similarity(texts: list[str]) -> np.ndarray:
    """[N] for each text, the largest Jaccard similarity of its trigram set to any other text's."""
    sets = [trigrams(t) for t in texts]
    best = np.zeros(len(sets))
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            union = len(sets[i] | sets[j])
            sim = len(sets[i] & sets[j]) / union if union else 0.0
            best[i], best[j] = max(best[i], sim), max(best[j], sim)
    return best


def event_news(features: Path) -> dict[str, str]:
    """Event name -> its news text, from a feature cache (events.json, examples.npz, texts.json)."""
    events = json.loads((features / "events.json").read_text(encoding="utf-8"))["events"]
    texts = json.loads((features / "texts.json").read_text(encoding="utf-8"))
    index = np.load(features / "examples.npz")["event"]
    return {events[int(e)]["name"]: t["news"] for e, t in zip(index, texts)}


def per_event_jsd(cells_file: Path, rows: set[str]) -> dict[str, dict[str, float]]:
    """row -> {event: its JSD averaged over the cells (seeds) that held it out}. A cell rerun under
    other settings is appended to the file after the one it replaces: the last (row, fold, seed) counts."""
    latest = {}
    for line in cells_file.read_text(encoding="utf-8").splitlines():
        cell = json.loads(line)
        if cell["row"] in rows:
            latest[cell["row"], cell["fold"], cell["seed"]] = cell
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cell in latest.values():
        for ev in cell["events"]:
            acc[cell["row"]][ev["event"]].append(ev["jsd"])
    return {r: {e: float(np.mean(v)) for e, v in evs.items()} for r, evs in acc.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--features", required=True, type=Path)
    p.add_argument("--cells", required=True, type=Path)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--rows", default="ngram_news,ngram_news_shrunk,ngram_user_shrunk,head_macro_only_shrunk")
    p.add_argument("--baseline", default="prior")
    p.add_argument("--n_resamples", type=int, default=2000)
    a = p.parse_args(argv)
    rows = [r for r in a.rows.split(",") if r]
    try:
        news = event_news(a.features)
        jsd = per_event_jsd(a.cells, set(rows) | {a.baseline})
    except (OSError, KeyError, ValueError) as e:  # a missing or foreign file: one line, not a traceback
        sys.exit(f"error: {a.features} / {a.cells}: cannot read the feature cache or the cells ({e})")
    names = sorted(news)
    sim = dict(zip(names, max_similarity([news[n] for n in names])))
    missing = [r for r in rows + [a.baseline] if r not in jsd]
    if missing:
        sys.exit(f"error: {a.cells}: no cells of row {missing[0]!r}")
    held = sorted(set.intersection(*(set(jsd[r]) for r in rows + [a.baseline])))
    kept = [e for e in held if sim[e] < a.threshold]
    print(f"{len(held)} held-out events; {len(held) - len(kept)} have a near-duplicate (char-trigram Jaccard >= "
          f"{a.threshold}) among the {len(names)} featurised events; {len(kept)} kept\n")
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(kept), size=(a.n_resamples, len(kept)))
    base = np.array([jsd[a.baseline][e] for e in kept])
    print(f"| row | mean event JSD, all {len(held)} | mean event JSD, {len(kept)} without a twin [95% CI] | "
          f"skill vs {a.baseline}, without a twin [95% CI] |")
    print("|---|---|---|---|")
    for r in [a.baseline] + rows:
        x = np.array([jsd[r][e] for e in kept])
        full = np.mean([jsd[r][e] for e in held])
        lo, hi = np.percentile(x[idx].mean(1), [2.5, 97.5])
        cell = f"{x.mean():.4f} [{lo:.4f}, {hi:.4f}]"
        if r == a.baseline:
            print(f"| {r} | {full:.4f} | {cell} | |")
            continue
        skill = 1 - x.mean() / base.mean()
        s_lo, s_hi = np.percentile(1 - x[idx].mean(1) / base[idx].mean(1), [2.5, 97.5])
        print(f"| {r} | {full:.4f} | {cell} | {skill:+.1%} [{s_lo:+.1%}, {s_hi:+.1%}] |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
