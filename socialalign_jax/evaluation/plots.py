"""PNG figures for the evaluation report: per-event distributions and PAC-LoRA gate heatmaps.

Matplotlib runs on the Agg backend so plotting works on headless training hosts.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from socialalign_jax.core import atomic_io  # noqa: E402

__all__ = ["EVENTS_PER_PAGE", "plot_event_distributions", "gate_statistic", "plot_gate_heatmaps"]

EVENTS_PER_PAGE = 24
_CJK_FONT_HINTS = ("CJK", "WenQuanYi", "SimHei", "Hei", "Noto Sans SC", "Source Han", "Droid Sans Fallback")


def _cjk_font() -> str | None:
    """A installed font with Chinese glyphs, if any: event titles are usually Chinese."""
    from matplotlib import font_manager

    for f in font_manager.fontManager.ttflist:
        if any(h in f.name for h in _CJK_FONT_HINTS):
            return f.name
    return None


def _title(ev: Mapping, cjk: str | None) -> str:
    # Without a CJK font the glyphs would render as boxes (and warn): keep only the id and size then.
    name = str(ev["event"])[:16]
    base = f"#{ev.get('event_id', '')} (n={ev['n']})"
    return f"{base} {name}" if cjk or name.isascii() else base


def plot_event_distributions(events: Sequence[Mapping], labels: Sequence[str], out_dir: str,
                             prefix: str = "distributions") -> list[str]:
    """Grouped bars per event: real vs head-predicted (vs labelled generations when present).

    `events`: dicts with 'event' (title), 'n', 'real', 'head' and optionally 'generated'
    (each a length-K list). Up to EVENTS_PER_PAGE events share one PNG grid; more events
    spill onto further pages. Returns the written paths.
    """
    paths = []
    cjk = _cjk_font()
    k = len(labels)
    x = np.arange(k)
    for page, start in enumerate(range(0, len(events), EVENTS_PER_PAGE)):
        chunk = events[start:start + EVENTS_PER_PAGE]
        cols = min(4, len(chunk))
        rows = math.ceil(len(chunk) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
        for ax in axes.flat[len(chunk):]:
            ax.set_visible(False)
        for ax, ev in zip(axes.flat, chunk):
            series = [("real", ev["real"]), ("head", ev["head"])]
            if ev.get("generated") is not None:
                series.append(("generated", ev["generated"]))
            width = 0.8 / len(series)
            for i, (name, dist) in enumerate(series):
                ax.bar(x + (i - (len(series) - 1) / 2) * width, dist, width, label=name)
            ax.set_xticks(x, labels, fontsize=7)
            ax.set_ylim(0, 1)
            ax.set_title(_title(ev, cjk), fontsize=8, fontfamily=cjk or "sans-serif")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        name = f"{prefix}.png" if len(events) <= EVENTS_PER_PAGE else f"{prefix}_{page + 1:02d}.png"
        path = os.path.join(out_dir, name)
        atomic_io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
        plt.close(fig)
        paths.append(path)
    return paths


def gate_statistic(weights, stat: str) -> np.ndarray:
    """Reduces mean expert weights [..., E] to one number per cell.

    'max': the weight of the expert used most (1/E = no preference, 1 = always one expert);
    'entropy': entropy in nats of the mean routing distribution (0 .. ln E). Both read the
    token-averaged weights, so they measure preference on average, not per-token sharpness.
    Rows are rescaled to sum 1; all-zero rows (a segment with no tokens) become NaN.
    """
    if stat not in ("max", "entropy"):
        raise ValueError(f"unknown gate statistic {stat!r} (use 'max' or 'entropy')")
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum(-1)                                                        # [...]
    p = w / np.where(total > 0, total, 1.0)[..., None]
    if stat == "max":
        out = p.max(-1)
    else:
        out = -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)
    return np.where(total > 0, out, np.nan)


def plot_gate_heatmaps(gates: Mapping, out_dir: str, stat: str = "max") -> list[str]:
    """One PNG per gate (gate_a, gate_b): a layer x module heatmap per segment.

    `gates`: {'modules': [...], 'segments': [...], 'layers': L, 'gate_a': [L, M, S, Ea],
    'gate_b': [L, M, S, Eb]} (already validated by the caller).
    """
    paths = []
    modules, segments = list(gates["modules"]), list(gates["segments"])
    for key in ("gate_a", "gate_b"):
        w = np.asarray(gates[key], dtype=np.float64)
        e = w.shape[-1]
        v = gate_statistic(w, stat)                                          # [L, M, S]
        vmin, vmax = (1 / e, 1.0) if stat == "max" else (0.0, math.log(e) if e > 1 else 1.0)
        n_layers = w.shape[0]
        size = (2.5 + 0.7 * len(modules) * len(segments), 2.5 + 0.2 * n_layers)
        fig, axes = plt.subplots(1, len(segments), figsize=size, squeeze=False, layout="constrained")
        im = None
        for s, (ax, seg) in enumerate(zip(axes[0], segments)):
            im = ax.imshow(np.ma.masked_invalid(v[:, :, s]), aspect="auto", origin="lower",
                           vmin=vmin, vmax=vmax, cmap="viridis", interpolation="nearest")
            ax.set_xticks(range(len(modules)), modules, fontsize=7)
            ax.set_yticks(range(0, n_layers, max(1, n_layers // 14)))
            ax.set_title(f"{key} / {seg}", fontsize=9)
            ax.set_xlabel("module", fontsize=8)
            if s == 0:
                ax.set_ylabel("layer", fontsize=8)
        fig.colorbar(im, ax=list(axes[0]), label="max expert weight" if stat == "max" else "entropy (nats)")
        path = os.path.join(out_dir, f"{key}_{stat}.png")
        atomic_io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
        plt.close(fig)
        paths.append(path)
    return paths
