"""Cross-validated experiments over held-out events (docs/experiments.md).

    # run a plan (rows x folds x seeds); resumes where it stopped; writes <out>/summary.md
    python launch/experiment.py --plan experiments/design_a_zs_csd.toml --out /tmp/exp/zs_csd \
        [--set features=/tmp/feat/zs_csd] [--summary_only]

    # design A's inputs: the frozen model's head features for a built dataset, cached (resumable)
    python launch/experiment.py features --data /tmp/data/zs_csd --out /tmp/feat/zs_csd \
        --weights gguf:smollm2 [--max_cases_per_event 24] [--num_events 500 --min_cases 2]

Bad input ends in one line naming the file and field, and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from socialalign_jax.core.errors import UserError, cli_main  # noqa: E402


def features_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="launch/experiment.py features",
                                 description="Cache the frozen model's sentiment-head inputs for a built dataset.")
    ap.add_argument("--data", required=True, help="a built dataset (launch/build_dataset.py, any test_fraction)")
    ap.add_argument("--out", required=True, help="cache directory (resumed when it holds the same key)")
    ap.add_argument("--weights", default="gguf:smollm2", help="weights spec (socialalign_jax/weights/resolve.py)")
    ap.add_argument("--max_cases_per_event", type=int, default=0, help="seeded sample per event (0 = all)")
    ap.add_argument("--num_events", type=int, default=0, help="seeded sample of events (0 = all)")
    ap.add_argument("--min_cases", type=int, default=1, help="events with fewer built examples are left out")
    ap.add_argument("--seed", type=int, default=0, help="seed of the event and case samples")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--chunk_size", type=int, default=64, help="examples per resumable chunk")
    ap.add_argument("--dry_run", action="store_true", help="print the selection's size and stop")
    ap.add_argument("--no_progress", action="store_true")
    a = ap.parse_args(argv)
    if not Path(a.data).exists():
        raise UserError(f"{a.data}: no such directory (--data)")

    import json
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
    from socialalign_jax.data import tfds_builders as B
    from socialalign_jax.experiments import features as F

    ds = B.open_dataset(a.data)
    sel = F.select_examples(ds, max_cases_per_event=a.max_cases_per_event, num_events=a.num_events,
                            min_cases=a.min_cases, seed=a.seed)
    lens = [len(p) for p in sel["prompts"]]
    print(json.dumps({"examples": len(lens), "events": len(sel["events"]), "prompt_tokens": int(sum(lens)),
                      "prompt_len_mean": float(sum(lens) / len(lens)), "prompt_len_max": int(max(lens))}))
    if a.dry_run:
        return 0
    import jax

    from socialalign_jax.weights.resolve import resolve_weights

    w = resolve_weights(a.weights)
    if max(int(p.max()) for p in sel["prompts"] if len(p)) >= w.cfg.vocab_size:
        raise UserError(f"{ds.path}: token ids outside the model's vocabulary; build the dataset with "
                        f"the model's tokenizer")
    params = jax.device_put(w.params)
    info = {"data": str(ds.path), "weights": a.weights, "weights_source": w.source,
            "data_config": ds.metadata.get("config"), "max_cases_per_event": a.max_cases_per_event,
            "num_events": a.num_events, "min_cases": a.min_cases, "seed": a.seed}
    out = F.compute(a.out, sel, params, w.cfg, model_digest=F.params_digest(w.params),
                    tok_digest=F.tokenizer_digest(w.tokenizer) if w.tokenizer is not None else "none",
                    info=info, batch_size=a.batch_size, chunk_size=a.chunk_size, progress=not a.no_progress)
    man = json.loads((out / F.MANIFEST).read_text("utf-8"))
    print(f"features: {out} ({man['num_examples']} examples, {man['seconds']:.0f}s computing, key {man['key'][:12]})")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "features":
        return features_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", required=True, help="a plan file (experiments/*.toml)")
    ap.add_argument("--out", required=True, help="results directory: cells.jsonl, summary.json, summary.md")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a top-level plan key (TOML value), e.g. --set features=/tmp/f --set 'seeds=[0]'")
    ap.add_argument("--summary_only", action="store_true", help="rewrite the summary from cells.jsonl, run nothing")
    ap.add_argument("--eval_md", default=None,
                    help="also write the tables into this markdown file, between the lines "
                         "<!-- EXPERIMENT:<plan name>:BEGIN --> and <!-- EXPERIMENT:<plan name>:END -->")
    a = ap.parse_args(argv)
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
    from socialalign_jax.experiments import runner

    plan = runner.load_plan(a.plan, a.set)
    import signal

    def _stop(signum, frame):  # SIGTERM: unwind (close the log, stop training processes), then exit
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _stop)
    if a.summary_only:
        summ = runner.write_summary(plan, Path(a.out), list(runner._done_cells(Path(a.out) / runner.CELLS).values()))
    else:
        summ = runner.run_plan(plan, a.out)
    print((Path(a.out) / "summary.md").read_text("utf-8") if summ["rows"] else "no finished cells")
    if a.eval_md and summ["rows"]:
        fill_markdown(Path(a.eval_md), plan["name"], summ["markdown"], " ".join(["python launch/experiment.py", *argv]))
    return 0


def fill_markdown(path: Path, name: str, block: str, command: str) -> None:
    """Replace the text between this plan's markers in `path` (atomically); the markers must exist."""
    import re

    from socialalign_jax.core import atomic_io

    begin, end = f"<!-- EXPERIMENT:{name}:BEGIN -->", f"<!-- EXPERIMENT:{name}:END -->"
    try:
        text = path.read_text("utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read (--eval_md): {e.strerror}") from None
    if begin not in text or end not in text:
        raise UserError(f"{path}: no {begin} ... {end} block to fill (--eval_md)")
    body = f"{begin}\n_Written by `{command}`._\n\n{block}\n{end}"
    atomic_io.write_text(path, re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: body, text, flags=re.S))


if __name__ == "__main__":
    cli_main(main)
