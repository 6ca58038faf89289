"""Reading a predictions JSONL, validating every line, and computing the micro/macro metrics.

Shared by `launch/evaluate.py` and the post-training evaluation of `launch/train.py`, so the
quickstart's table and a standalone evaluation are the same computation.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np

from socialalign_jax.core.errors import UserError
from socialalign_jax.core.jsonl import iter_jsonl, read_jsonl_text
from socialalign_jax.evaluation import distributions, metrics, report
from socialalign_jax.evaluation.head import head_metrics

SUM_TOLERANCE = 1e-3  # probability vectors written as float32 text need not sum to exactly 1


class InputError(UserError):
    """A problem with a user-supplied file; its message is the one line the CLI prints."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_dist(where: str, field: str, value, k: int) -> list[float]:
    if (not isinstance(value, list) or len(value) != k or not all(_is_num(v) for v in value)
            or any(v < 0 for v in value) or abs(sum(value) - 1.0) > SUM_TOLERANCE):
        raise InputError(f"{where}: field '{field}': expected a list of {k} non-negative numbers summing to 1, "
                         f"got {json.dumps(value, ensure_ascii=False)[:80]}")
    return [float(v) for v in value]


def load_predictions(path: str) -> list[dict]:
    """Reads and validates every line; blank lines are allowed and carry no record."""
    lines = read_jsonl_text(path, InputError, "predictions").split("\n")
    records: list[dict] = []
    labels: list[str] | None = None
    event_names: dict[int, tuple[str, int]] = {}
    targets: dict[int, tuple[list[float], int]] = {}
    seen_records: dict[str, int] = {}
    for lineno, rec in iter_jsonl(lines, str(path), InputError):
        where = f"{path}: line {lineno}"
        key = json.dumps(rec, sort_keys=True, ensure_ascii=False)
        if key in seen_records:  # the same record twice would weigh twice in every metric
            raise InputError(f"{where}: duplicate record (the same as line {seen_records[key]}; prompt_id "
                             f"{json.dumps(rec.get('prompt_id'), ensure_ascii=False)}): remove one copy")
        seen_records[key] = lineno

        def need(field, ok, what):
            if field not in rec:
                raise InputError(f"{where}: field '{field}': missing")
            if not ok(rec[field]):
                raise InputError(f"{where}: field '{field}': expected {what}, "
                                 f"got {json.dumps(rec[field], ensure_ascii=False)[:80]}")
            return rec[field]

        for field in ("event", "user", "generated", "reference"):
            need(field, lambda v: isinstance(v, str), "a string")
        need("event_id", _is_int, "an integer")
        need("prompt_id", lambda v: isinstance(v, str) or _is_int(v), "a string or an integer")
        lab = need("labels", lambda v: isinstance(v, list) and len(v) >= 2 and len(set(v)) == len(v)
                   and all(isinstance(x, str) and x for x in v), "a list of at least 2 distinct label names")
        if labels is None:
            labels = lab
        elif lab != labels:
            raise InputError(f"{where}: field 'labels': {lab} differs from the first record's {labels}")
        need("label", lambda v: v is None or v in labels, f"null or one of {labels}")
        rec["probs"] = _check_dist(where, "probs", need("probs", lambda v: True, ""), len(labels))

        has_lp, has_nt = rec.get("ref_logprob_sum") is not None, rec.get("ref_num_tokens") is not None
        if has_lp != has_nt:
            missing = "ref_num_tokens" if has_lp else "ref_logprob_sum"
            raise InputError(f"{where}: field '{missing}': missing (ref_logprob_sum and ref_num_tokens go together)")
        if has_lp:
            need("ref_logprob_sum", lambda v: _is_num(v) and v <= 1e-6, "a finite log-probability sum <= 0")
            need("ref_num_tokens", lambda v: _is_int(v) and v >= 1, "an integer >= 1")

        eid = rec["event_id"]
        if eid in event_names and event_names[eid][0] != rec["event"]:
            raise InputError(f"{where}: field 'event': {rec['event']!r} but line {event_names[eid][1]} "
                             f"names event_id {eid} {event_names[eid][0]!r}")
        event_names.setdefault(eid, (rec["event"], lineno))
        if rec.get("target_dist") is not None:
            td = rec["target_dist"] = _check_dist(where, "target_dist", rec["target_dist"], len(labels))
            if eid in targets and not np.allclose(td, targets[eid][0], atol=1e-6):
                raise InputError(f"{where}: field 'target_dist': differs from line {targets[eid][1]} "
                                 f"of the same event_id {eid}")
            targets.setdefault(eid, (td, lineno))
        rec["_line"] = lineno
        records.append(rec)
    if not records:
        raise InputError(f"{path}: no records")
    # A line without target_dist in an event whose other lines have one still belongs to that event.
    for rec in records:
        if rec["event_id"] in targets:
            rec["target_dist"] = targets[rec["event_id"]][0]
    return records


def load_gates(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            g = json.load(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read gates: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(g, dict):
        raise InputError(f"{path}: expected a JSON object")
    for field in ("modules", "segments"):
        v = g.get(field)
        if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
            raise InputError(f"{path}: field '{field}': expected a non-empty list of names")
    if not _is_int(g.get("layers")) or g["layers"] < 1:
        raise InputError(f"{path}: field 'layers': expected an integer >= 1")
    want = (g["layers"], len(g["modules"]), len(g["segments"]))
    for field in ("gate_a", "gate_b"):
        try:
            w = np.asarray(g.get(field), dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{path}: field '{field}': expected a nested list of numbers "
                             f"[layers, modules, segments, experts]") from None
        if w.ndim != 4 or w.shape[:3] != want or w.shape[3] < 1:
            raise InputError(f"{path}: field '{field}': expected shape [{want[0]}, {want[1]}, {want[2]}, E], "
                             f"got {list(w.shape)}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise InputError(f"{path}: field '{field}': weights must be finite and non-negative")
        g[field] = w
    return g


def load_baseline(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            b = json.load(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read baseline: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(b, dict) or not any(isinstance(b.get(s), dict) for s in report.SECTIONS):
        raise InputError(f"{path}: field 'micro': missing (expected a metrics.json written by this tool)")
    return b


def _label_dist(names: list[str], labels: list[str]) -> list[float]:
    c = Counter(names)
    return [c[l] / len(names) for l in labels]


def _label_with_progress(labeller, texts: list[str], chunk: int = 64) -> list[str]:
    """labeller.label in chunks, with a progress bar on an interactive terminal (labelling is the slow part)."""
    import sys

    from tqdm import tqdm

    out: list[str] = []
    with tqdm(total=len(texts), desc=f"labelling ({getattr(labeller, 'name', 'labeller')})", unit="post",
              disable=None, file=sys.stderr, leave=False) as bar:
        for i in range(0, len(texts), chunk):
            out += labeller.label(texts[i:i + chunk])
            bar.update(len(texts[i:i + chunk]))
    return out


def evaluate(records: list[dict], labeller=None, eps: float = distributions.KL_EPSILON) -> dict:
    """All metrics for validated records (see docs/evaluation.md for the definitions)."""
    labels = records[0]["labels"]
    refs = [r["reference"] for r in records]
    hyps = [r["generated"] for r in records]
    # The head's metrics from the same code as the trainer's evaluation (evaluation.head).
    head = head_metrics([r["probs"] for r in records],
                        [labels.index(r["label"]) if r["label"] is not None else -1 for r in records],
                        [r["event_id"] for r in records], {})
    ppl_recs = [r for r in records if r.get("ref_logprob_sum") is not None]
    micro = {
        **metrics.corpus_rouge(refs, hyps),
        "bleu": metrics.corpus_bleu(refs, hyps),
        "distinct1": metrics.distinct_n(hyps, 1),
        "distinct2": metrics.distinct_n(hyps, 2),
        "sentiment_accuracy": head.get("sentiment_accuracy", math.nan),
        "sentiment_macro_f1": head.get("sentiment_macro_f1", math.nan),
        "sentiment_num_labelled": head["sentiment_num_labelled"],
        "perplexity": metrics.perplexity([r["ref_logprob_sum"] for r in ppl_recs],
                                         [r["ref_num_tokens"] for r in ppl_recs]),
        "perplexity_num_records": len(ppl_recs),
    }
    notes = []
    gen_labels = None
    if labeller is not None:
        if set(labeller.labels) != set(labels):
            raise InputError(f"labeller '{labeller.name}' uses labels {list(labeller.labels)} but the predictions "
                             f"use {labels}: pass --labeller none")
        gen_labels = _label_with_progress(labeller, hyps)

    by_event: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        by_event.setdefault(r["event_id"], []).append(i)
    per_event, head_cmp, gen_cmp, counts, no_real = [], [], [], [], []
    for eid, idx in by_event.items():
        recs = [records[i] for i in idx]
        ev_gold = [r["label"] for r in recs if r["label"] is not None]
        if recs[0].get("target_dist") is not None:
            real, source = recs[0]["target_dist"], "target_dist"
        elif ev_gold:
            real, source = _label_dist(ev_gold, labels), "labels"
        else:
            real, source = None, None
        ev = {"event_id": eid, "event": recs[0]["event"], "n": len(recs), "n_labelled": len(ev_gold),
              "real_source": source, "real": real,
              "head": head["per_event"][eid],
              "generated": _label_dist([gen_labels[i] for i in idx], labels) if gen_labels is not None else None}
        if real is None:
            no_real.append(eid)
        else:
            c = distributions.compare(real, ev["head"], eps)
            ev.update({f"head_{k}": v for k, v in c.items()})
            head_cmp.append(c)
            counts.append(len(recs))
            if gen_labels is not None:
                g = distributions.compare(real, ev["generated"], eps)
                ev.update({f"generated_{k}": v for k, v in g.items()})
                gen_cmp.append(g)
        per_event.append(ev)
    if no_real:
        notes.append(f"{len(no_real)} event(s) have neither target_dist nor labelled lines and are left out of "
                     f"the macro metrics: event_id {no_real}")
    if len(ppl_recs) < len(records):
        notes.append(f"perplexity uses the {len(ppl_recs)} of {len(records)} records that carry ref_logprob_sum")
    macro = {"head": distributions.summarise(head_cmp, counts)}
    if gen_labels is not None:
        macro["generated"] = distributions.summarise(gen_cmp, counts)
    return {
        "num_records": len(records), "num_events": len(by_event), "labels": labels,
        "labeller": getattr(labeller, "name", "none"), "kl_epsilon": eps, "sentiment_f1_classes": [labels[c] for c in head.get("sentiment_f1_classes", [])],
        "micro": micro, "macro": macro, "per_event": per_event, "notes": notes,
    }
