"""Writes evaluation results: metrics.json (machine readable) and a Markdown table (humans, CI logs).

Undefined metrics (no labelled lines, no perplexity fields, ...) are NaN in memory and `null`
in JSON, shown as "n/a" in tables, so strict JSON parsers can read metrics.json.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from socialalign_jax.core import atomic_io

__all__ = ["SECTIONS", "json_clean", "flatten", "format_table", "format_event_table", "write_report"]

SECTIONS = ("micro", "macro")  # the scalar parts of the metrics dict that make up the main table


def json_clean(x: Any) -> Any:
    """Recursively turns NaN/inf into None and numpy scalars into Python numbers."""
    if isinstance(x, Mapping):
        return {str(k): json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def flatten(metrics: Mapping, sections=SECTIONS) -> dict[str, float | None]:
    """Dotted keys -> scalar values for every number under `sections` (lists and strings skipped)."""
    out: dict[str, float | None] = {}

    def walk(prefix: str, node):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif node is None or (isinstance(node, (int, float)) and not isinstance(node, bool)):
            out[prefix] = None if node is None or not math.isfinite(node) else node

    for s in sections:
        if s in metrics:
            walk(s, metrics[s])
    return out


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4f}"


def format_table(metrics: Mapping, baseline: Mapping | None = None) -> str:
    """Markdown table of every scalar metric; with a baseline, adds its value and the difference."""
    cur = flatten(json_clean(metrics))
    base = flatten(json_clean(baseline)) if baseline is not None else None
    if base is None:
        lines = ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in cur.items()]
    else:
        lines = ["| metric | value | baseline | delta |", "|---|---|---|---|"]
        for k, v in cur.items():
            b = base.get(k)
            d = v - b if v is not None and b is not None else None
            lines.append(f"| {k} | {_fmt(v)} | {_fmt(b)} | {_fmt(d) if d is None else f'{d:+.4f}'} |")
    return "\n".join(lines)


def md_text(text) -> str:
    """Text from the data (an event's news, a user name, a generated post) as inert Markdown: '&', '<' and
    '>' become entities, so a '<script>' or '<img onerror=...>' in a post is shown, never run, by a
    viewer that renders HTML in Markdown."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def md_cell(text) -> str:
    """Text as one Markdown table cell (md_text): line breaks (which would end the row) become spaces, '|' is
    escaped."""
    return md_text(" ".join(str(text).split())).replace("|", "\\|")


def format_event_table(per_event: list[Mapping], labels: list[str]) -> str:
    """One row per event: size, real / head / generated distributions and their JSDs."""
    has_gen = any(e.get("generated") is not None for e in per_event)
    head = ["event_id", "event", "n", f"real ({md_cell('/'.join(labels))})", "head", "head JSD"]
    if has_gen:
        head += ["generated", "gen JSD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dist = lambda d: "n/a" if d is None else " / ".join(f"{x:.2f}" for x in d)  # noqa: E731
    for e in per_event:
        row = [md_cell(e["event_id"]), md_cell(e["event"]), str(e["n"]), dist(e.get("real")),
               dist(e["head"]), _fmt(e.get("head_jsd"))]
        if has_gen:
            row += [dist(e.get("generated")), _fmt(e.get("generated_jsd"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(metrics: Mapping, out_dir: str, baseline: Mapping | None = None) -> str:
    """Writes out_dir/metrics.json and out_dir/metrics.md; returns the main table (for stdout)."""
    clean = json_clean(metrics)
    atomic_io.write_text(os.path.join(out_dir, "metrics.json"),
                         json.dumps(clean, ensure_ascii=False, indent=2, allow_nan=False) + "\n")
    table = format_table(clean, baseline)
    md = ["# Evaluation", "", table]
    if clean.get("per_event"):
        md += ["", "## Per event", "", format_event_table(clean["per_event"], clean.get("labels", []))]
    if clean.get("notes"):
        md += ["", "## Notes", ""] + [f"- {n}" for n in clean["notes"]]
    atomic_io.write_text(os.path.join(out_dir, "metrics.md"), "\n".join(md) + "\n")
    return table
