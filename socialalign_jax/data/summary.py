"""The table build_dataset prints: what went in, what came out, and what was cut.

Computed from the dataset metadata alone (index, targets, build stats), so it can be
re-printed for any built dataset without reading its records.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def percentiles(lengths) -> dict[str, int]:
    x = np.asarray(lengths, np.int64)
    if x.size == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    p = np.percentile(x, [50, 90, 99], method="inverted_cdf")  # always an observed length
    return {"p50": int(p[0]), "p90": int(p[1]), "p99": int(p[2]), "max": int(x.max())}


def summarize(meta: Mapping) -> dict:
    """Per split: events, cases, label counts and token-length percentiles; plus cut counts."""
    classes = list(meta["classes"])
    out: dict = {"splits": {}, "stats": dict(meta["stats"])}
    for split, ix in meta["index"].items():
        ev = np.asarray(ix["event_id"], np.int64)
        out["splits"][split] = {"events": int(np.unique(ev).size), "cases": int(ev.size),
                                **percentiles(ix["length"])}
    for split, per_event in meta.get("targets", {}).items():
        if split not in out["splits"]:
            continue
        built = set(int(e) for e in meta["index"][split]["event_id"])
        ts = [t for e, t in per_event.items() if int(e) in built and t.get("count")]
        floors = [t["noise_floor"] for t in ts if t.get("noise_floor") is not None]
        sources: dict[str, int] = {}
        for t in ts:
            sources[t["source"]] = sources.get(t["source"], 0) + 1
        out["splits"][split]["targets"] = {
            "events": len(ts), "sources": sources,
            "responses_median": float(np.median([t["count"] for t in ts])) if ts else 0.0,
            "responses_min": int(min((t["count"] for t in ts), default=0)),
            "noise_floor_mean": float(np.mean(floors)) if floors else None}
    info = meta.get("source_info") or {}
    out["labeller"] = info.get("label_source") if info.get("silver_labels") else None
    for split, labels in meta.get("labels", {}).items():
        counts = np.bincount(np.asarray(labels, np.int64) + 1, minlength=len(classes) + 1)
        out["splits"][split]["labels"] = {"unlabelled": int(counts[0]),
                                          **{c: int(n) for c, n in zip(classes, counts[1:])}}
    return out


def format_table(summary: Mapping) -> str:
    splits = summary["splits"]
    label_names = next((list(s["labels"]) for s in splits.values() if "labels" in s), [])
    cols = ["split", "events", "cases", *label_names, "p50", "p90", "p99", "max"]
    rows = []
    for name, s in splits.items():
        rows.append([name, s["events"], s["cases"], *[s.get("labels", {}).get(c, "") for c in label_names],
                     s["p50"], s["p90"], s["p99"], s["max"]])
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(str(v).rjust(w) for v, w in zip(r, widths))  # noqa: E731
    st = summary["stats"]
    lines = [line(cols), line(["-" * w for w in widths]), *map(line, rows), "",
             f"read {st['units']} cases, built {st['built']}",
             f"rejected: too long (on_overflow=skip) {st['skipped_too_long']}",
             f"truncated: history in {st['history_truncated']} ({st['history_chars_cut']} chars), "
             f"persona in {st['persona_truncated']} ({st['persona_chars_cut']} chars)"]
    for name, s in splits.items():
        t = s.get("targets")
        if not t or not t["events"]:
            continue
        src = ", ".join(f"{n} from {k}" for k, n in sorted(t["sources"].items()))
        floor = "" if t["noise_floor_mean"] is None else (
            f"; noise floor (mean JSD of a perfect forecast to its target) {t['noise_floor_mean']:.4f}")
        lines.append(f"targets ({name}): {t['events']} events ({src}), {t['responses_min']}+ responses each "
                     f"(median {t['responses_median']:g}){floor}")
    if summary.get("labeller"):
        lines.append(f"silver labels: {summary['labeller']}")
    return "\n".join(lines)
