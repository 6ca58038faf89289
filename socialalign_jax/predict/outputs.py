"""What launch/predict.py writes: predictions.jsonl, crowd.json, report.md and crowd.png, all or nothing.

The files are written into a staging directory beside --out (each with atomic_io's writers)
and the directory is renamed into place at the end, so a failure at any point leaves
nothing under --out, and a reader never sees crowd.json from one run beside
predictions.jsonl from another. An --out holding a previous prediction (only these files)
is replaced whole; any other non-empty directory, or a file, is refused before the model
is even loaded.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping, Sequence

from socialalign_jax.core.atomic_io import write_json, write_jsonl
from socialalign_jax.core.errors import UserError
from socialalign_jax.evaluation.report import md_cell, md_text
from socialalign_jax.predict.predictor import Prediction, uses_random_weights

PREDICTIONS, CROWD, REPORT, CHART = "predictions.jsonl", "crowd.json", "report.md", "crowd.png"
OUR_FILES = frozenset({PREDICTIONS, CROWD, REPORT, CHART})


def check_out_dir(out: str) -> None:
    """Refuse an --out we would not replace (a file, or a directory with other things in it)."""
    if not out:
        raise UserError("--out DIR is required (the directory predictions.jsonl, crowd.json, report.md go to)")
    if os.path.isfile(out) or (os.path.exists(out) and not os.path.isdir(out)):
        raise UserError(f"--out {out}: is a file, expected a directory (it would hold {', '.join(sorted(OUR_FILES))})")
    if os.path.isdir(out):
        other = sorted(set(os.listdir(out)) - OUR_FILES)
        if other:
            raise UserError(f"--out {out}: not empty and not a previous prediction (has {other[0]!r}); "
                            "choose a new or empty directory")
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise UserError(f"--out {out}: its parent {parent} is a file")


def _fmt(p: float) -> str:
    return f"{p:.3f}"


def _iv(iv: Sequence[float]) -> str:
    return f"[{iv[0]:.3f}, {iv[1]:.3f}]"


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def skill_lines(pred: Prediction) -> list[str]:
    """How far to trust the shares: the run's track record on held-out events, and the shrink applied."""
    lines = [f"forecast skill: {pred.skill_sentence}"]
    w = float((pred.skill or {}).get("w_applied", 1.0))
    if w < 1.0:
        lines.append(f"the shares below lean toward the average mix of the training events (w = {w:.2f}: "
                     f"{100 * w:.0f}% the model's forecast, {100 * (1 - w):.0f}% the average mix, the weight "
                     "that did best on the held-out events); the head's own mean is raw_distribution in crowd.json")
    return lines


def random_weights_warning(run: Mapping[str, Any]) -> str | None:
    """The line every output of a prediction (CLI, report.md, crowd.json, the page) opens with when the
    run's base model is random (None otherwise): such a model's posts are not text and its head read no
    language, whatever the tables look like."""
    if not uses_random_weights(run):
        return None
    return (f"WARNING: random weights ({run.get('weights')}): this model was never pretrained, so its posts "
            "are not text and its distribution says nothing about real users; it only shows the mechanics "
            "(train on pretrained weights, e.g. --config configs/weibo.py:smollm2)")


def topic_line(pred: Prediction) -> str:
    """The hashtag the prompts carry: one for every wording, given or derived once from the first."""
    several = len(pred.variants) > 1
    how = "given" if pred.topic_given else f"derived from {'wording 1' if several else 'the news'}; --topic sets it"
    return f"hashtag #{pred.crowd.topic}#{' for every wording' if several else ''} ({how})"


def summary_table(pred: Prediction, *, for_markdown: bool = False) -> str:
    """What launch/predict.py prints (and the heart of report.md): the random-weights warning first, the
    hashtag, a table per wording, and per pair of wordings the paired difference with its verdict.
    `for_markdown`: report.md's version (the warning is above it; the news and hashtag escaped)."""
    pct = int(round(pred.level * 100))
    text = md_text if for_markdown else str
    warning = None if for_markdown else random_weights_warning(pred.run)
    lines = [warning, ""] if warning else []
    lines += [*map(text, skill_lines(pred)), "", text(topic_line(pred)), ""]
    for v, c in enumerate(pred.variants):
        head = f"wording {v + 1}: {text(_short(c.news))}  ({pred.num_users} users)"
        lines += [head, "", f"| label | predicted share | {pct}% interval |"
                  + (f" generated posts ({pred.labeller}) | {pct}% interval |" if c.generated_distribution else ""),
                  "|---|---|---|" + ("---|---|" if c.generated_distribution else "")]
        for name in pred.labels:
            row = f"| {md_cell(name)} | {_fmt(c.distribution[name])} | {_iv(c.interval[name])} |"
            if c.generated_distribution:
                row += f" {_fmt(c.generated_distribution[name])} | {_iv(c.generated_interval[name])} |"
            lines.append(row)
        lines.append("")
    for d in pred.differences:
        lines += [f"framing: wording {d.a + 1} minus wording {d.b + 1} (paired over the same {d.num_users} users, "
                  "the same hashtag)", "",
                  f"| label | difference | {pct}% interval | reading |", "|---|---|---|---|"]
        for name in pred.labels:
            lines.append(f"| {md_cell(name)} | {d.difference[name]:+.3f} | {_iv(d.interval[name])} | {d.reading(name)} |")
        lines += ["", f"verdict: {d.verdict}", ""]
    return "\n".join(lines).rstrip() + "\n"


def report_markdown(pred: Prediction, chart: str | None = CHART, max_posts: int = 10,
                    show_posts: bool | None = None) -> str:
    """report.md. `show_posts`: list a sample of the generated posts (default: only when the weights are
    pretrained; a random model's posts are not text, and shown beside the tables they read as predictions)."""
    show_posts = (not pred.random_weights) if show_posts is None else show_posts
    run = pred.run
    src = ", ".join(f"{k} `{md_text(v)}`" for k, v in run.items())
    out = ["# Predicted crowd response", ""]
    warning = random_weights_warning(pred.run)
    if warning:
        out += [f"> **{md_text(warning)}**", ""]
    out += [f"{pred.num_users} users, {pred.samples} post(s) each, seed {pred.seed}; {src}.", "",
            f"The crowd's distribution is the mean of the sentiment head's probabilities over the users; the "
            f"{int(round(pred.level * 100))}% intervals are percentile bootstraps over users "
            f"({pred.num_resamples} resamples), paired across wordings (docs/prediction.md).", ""]
    out += [f"**Forecast skill**: {md_text(pred.skill_sentence)}.", "",
            *[f"{md_text(line)}.\n" for line in skill_lines(pred)[1:]]]
    for v, c in enumerate(pred.variants):
        out += [f"**Wording {v + 1}** (#{md_cell(c.topic)}#): {md_cell(c.news)}", ""]
    out += ["## Distribution", "", summary_table(pred, for_markdown=True)]
    if chart:
        out += [f"![predicted distribution with intervals]({chart})", ""]
    out += ["## Sample of generated posts", ""]
    if not show_posts:
        why = "a random-weight model writes no text, so its posts are no prediction" if pred.random_weights else "asked"
        out += [f"Not shown ({why}); {PREDICTIONS} holds them, and launch/predict.py --show_posts lists some here.", ""]
        return "\n".join(out)
    out += ["| wording | user | head's label | post |", "|---|---|---|---|"]
    for v, c in enumerate(pred.variants):
        for u in c.users[:max_posts]:
            top = max(u.sentiment, key=u.sentiment.get)
            post = md_cell(_short(u.posts[0], 80)) if u.posts else ""
            out.append(f"| {v + 1} | {md_cell(u.user_name)} | {md_cell(top)} ({u.sentiment[top]:.2f}) | {post} |")
    out.append("")
    return "\n".join(out)


def plot_crowd(pred: Prediction, path: str) -> str:
    """Grouped bars: each wording's predicted share per label with its interval as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(pred.labels)
    x = np.arange(len(labels))
    series = []
    for v, c in enumerate(pred.variants):
        series.append((f"wording {v + 1}: head", c.distribution, c.interval, None))
        if c.generated_distribution:
            series.append((f"wording {v + 1}: posts ({pred.labeller})", c.generated_distribution,
                           c.generated_interval, "//"))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(labels) * max(1, len(series) / 2)), 3.4))
    for i, (name, dist, iv, hatch) in enumerate(series):
        mean = np.array([dist[k] for k in labels])
        lo = np.array([iv[k][0] for k in labels])
        hi = np.array([iv[k][1] for k in labels])
        err = np.stack([np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)])
        ax.bar(x + (i - (len(series) - 1) / 2) * width, mean, width, yerr=err, capsize=3, label=name, hatch=hatch)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of the crowd")
    ax.set_title(f"{pred.num_users} users, {int(round(pred.level * 100))}% bootstrap intervals", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(pred: Prediction, out: str, *, show_posts: bool | None = None) -> list[str]:
    """All four files into `out`, published at once (see the module docstring); returns their paths.
    `show_posts`: report_markdown's."""
    check_out_dir(out)
    out = os.path.abspath(out)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    stage = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    old = os.path.join(parent, f".{name}.old-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        os.makedirs(stage)
        write_jsonl(pred.records(), os.path.join(stage, PREDICTIONS))
        write_json(pred.to_json(), os.path.join(stage, CROWD))
        plot_crowd(pred, os.path.join(stage, CHART))
        with open(os.path.join(stage, REPORT), "w", encoding="utf-8") as f:
            f.write(report_markdown(pred, show_posts=show_posts))
        if os.path.isdir(out):  # empty, or a previous prediction (check_out_dir): swap it out whole
            os.rename(out, old)
        os.rename(stage, out)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write ({e.strerror or e})") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return [os.path.join(out, f) for f in (PREDICTIONS, CROWD, REPORT, CHART)]
