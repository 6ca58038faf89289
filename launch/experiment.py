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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from absl import flags  # noqa: E402

from socialalign_jax.core.cli_setup import parse_flags, quiet_startup  # noqa: E402

quiet_startup()  # before jax: no libtpu or TensorFlow start-up noise

from socialalign_jax.core.errors import UserError, cli_main  # noqa: E402

# Two commands, two FlagValues of their own (not absl's global FLAGS, so that main() can be called
# in-process, see core/cli_setup.parse_flags): the plan runner, and `features` (its first word).
FLAGS = flags.FlagValues()
flags.DEFINE_string("plan", None, "A plan file (experiments/*.toml).", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Results directory: cells.jsonl, summary.json, summary.md.", flag_values=FLAGS)
flags.DEFINE_multi_string("set", [], "KEY=VALUE: override a plan key (TOML value); a dotted KEY reaches into a table, e.g. "
                          "--set features=/tmp/f --set 'seeds=[0]' --set defaults.steps=2000", flag_values=FLAGS)
flags.DEFINE_bool("summary_only", False, "Rewrite the summary from cells.jsonl, run nothing.", flag_values=FLAGS)
flags.DEFINE_string("eval_md", None, "Also write the tables into this markdown file, between the lines "
                    "<!-- EXPERIMENT:<plan name>:BEGIN --> and <!-- EXPERIMENT:<plan name>:END -->.", flag_values=FLAGS)
flags.mark_flags_as_required(["plan", "out"], flag_values=FLAGS)

FEATURES = flags.FlagValues()
flags.DEFINE_string("data", None, "A built dataset (launch/build_dataset.py, any test_fraction).", flag_values=FEATURES)
flags.DEFINE_string("out", None, "Cache directory (resumed when it holds the same key).", flag_values=FEATURES)
flags.DEFINE_string("weights", "gguf:smollm2", "Weights spec (socialalign_jax/weights/resolve.py).",
                    flag_values=FEATURES)
flags.DEFINE_integer("max_cases_per_event", 0, "Seeded sample per event (0 = all).", flag_values=FEATURES)
flags.DEFINE_integer("num_events", 0, "Seeded sample of events (0 = all).", flag_values=FEATURES)
flags.DEFINE_integer("min_cases", 1, "Events with fewer built examples are left out.", flag_values=FEATURES)
flags.DEFINE_integer("seed", 0, "Seed of the event and case samples.", flag_values=FEATURES)
flags.DEFINE_integer("batch_size", 8, "Examples per forward pass.", flag_values=FEATURES)
flags.DEFINE_integer("chunk_size", 64, "Examples per resumable chunk.", flag_values=FEATURES)
flags.DEFINE_bool("dry_run", False, "Print the selection's size and stop.", flag_values=FEATURES)
flags.DEFINE_bool("progress", True, "Show a progress bar (--noprogress: none, e.g. in a log file).", flag_values=FEATURES)
flags.mark_flags_as_required(["data", "out"], flag_values=FEATURES)

_FEATURES_DOC = """Cache the frozen model's sentiment-head inputs for a built dataset (design A's inputs).

    python launch/experiment.py features --data DATA_DIR --out CACHE_DIR [--weights gguf:smollm2] ...
"""


def features_main(argv) -> int:
    a = parse_flags(FEATURES, argv, "experiment.py features", _FEATURES_DOC)
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
    if w.tokenizer is not None:  # the spans as text, for the classical baselines (experiments/forecast.py)
        sel["texts"] = F.example_texts(ds, sel, w.tokenizer)
    params = jax.device_put(w.params)
    info = {"data": str(ds.path), "weights": a.weights, "weights_source": w.source,
            "data_config": ds.metadata.get("config"), "max_cases_per_event": a.max_cases_per_event,
            "num_events": a.num_events, "min_cases": a.min_cases, "seed": a.seed}
    out = F.compute(a.out, sel, params, w.cfg, model_digest=F.params_digest(w.params),
                    tok_digest=F.tokenizer_digest(w.tokenizer) if w.tokenizer is not None else "none",
                    info=info, batch_size=a.batch_size, chunk_size=a.chunk_size, progress=a.progress)
    man = json.loads((out / F.MANIFEST).read_text("utf-8"))
    print(f"features: {out} ({man['num_examples']} examples, {man['seconds']:.0f}s computing, key {man['key'][:12]})")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "features":
        return features_main(argv[1:])
    a = parse_flags(FLAGS, argv, "experiment.py", __doc__)
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
    failed = summ.get("failed") or []
    if failed and not summ.get("finished"):  # nothing this run tried worked: not a success for a script either
        print(f"error: all {len(failed)} cells that ran failed (first: {failed[0]}); fix that and rerun "
              "(finished cells are kept)", file=sys.stderr)
        return 1
    if failed:
        print(f"warning: {len(failed)} cells failed (first: {failed[0]}); a rerun retries them", file=sys.stderr)
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
