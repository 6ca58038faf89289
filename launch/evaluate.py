"""Scores a predictions JSONL (from the generation CLI): micro and macro metrics, tables and figures.

    python launch/evaluate.py --predictions preds.jsonl --out eval/ [--gates gates.json]
        [--labeller lexicon|zeroshot|none] [--weights SPEC] [--baseline old/metrics.json]
        [--gate_stat max|entropy]

Writes DIR/metrics.json, DIR/metrics.md and PNGs, prints the metrics table. Bad input stops
with one line naming the file, the line and the field (exit status 2), never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from socialalign_jax.core.cli_setup import parse_flags, quiet_startup  # noqa: E402

quiet_startup()  # before jax: no libtpu or TensorFlow start-up noise

from socialalign_jax.core.errors import EXIT_USER_ERROR, UserError, one_line  # noqa: E402
from socialalign_jax.evaluation import report  # noqa: E402
from socialalign_jax.evaluation.predictions import (  # noqa: E402,F401
    InputError, evaluate, load_baseline, load_gates, load_predictions)

# Its own FlagValues, not absl's global FLAGS: tests load this script under several names and call
# main() in-process many times (core/cli_setup.parse_flags).
FLAGS = flags.FlagValues()
flags.DEFINE_string("predictions", None, "Predictions JSONL from the generation CLI.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output directory (metrics.json, metrics.md, figures).", flag_values=FLAGS)
flags.DEFINE_string("gates", None, "Gate statistics JSON for heatmaps (launch/generate.py --gates_out).",
                    flag_values=FLAGS)
flags.DEFINE_enum("labeller", "lexicon", ["lexicon", "zeroshot", "none"],
                  "Labels generated posts for the generated-vs-real macro metric.", flag_values=FLAGS)
flags.DEFINE_string("weights", None, "Base model for --labeller zeroshot (gguf:smollm2, gguf:FILE, hf:DIR, "
                    "random:PRESET).", flag_values=FLAGS)
flags.DEFINE_string("baseline", None, "An earlier metrics.json to compare against.", flag_values=FLAGS)
flags.DEFINE_enum("gate_stat", "max", ["max", "entropy"],
                  "Per-cell gate summary: weight of the top expert, or routing entropy.", flag_values=FLAGS)
flags.mark_flags_as_required(["predictions", "out"], flag_values=FLAGS)


def parse_args(argv):
    return parse_flags(FLAGS, argv, "evaluate.py", __doc__)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UserError(f"--out {args.out}: is a file; expected a directory (metrics.json, metrics.md and "
                            "figures are written into it)")
        records = load_predictions(args.predictions)
        gates = load_gates(args.gates) if args.gates else None
        baseline = load_baseline(args.baseline) if args.baseline else None
        labeller = None
        if args.labeller == "lexicon":
            from socialalign_jax.data.labellers import LexiconLabeller
            labeller = LexiconLabeller()
        elif args.labeller == "zeroshot":
            if not args.weights:
                raise UserError("--labeller zeroshot needs --weights SPEC (e.g. gguf:smollm2)")
            from socialalign_jax.evaluation.model_labeller import zero_shot_labeller
            labeller = zero_shot_labeller(args.weights)
        result = evaluate(records, labeller)
    except (InputError, RuntimeError, UserError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    from socialalign_jax.evaluation import plots  # matplotlib only after the input is known good

    try:
        os.makedirs(args.out, exist_ok=True)
        with_real = [e for e in result["per_event"] if e["real"] is not None]
        figures = plots.plot_event_distributions(with_real, result["labels"], args.out) if with_real else []
        if gates is not None:
            figures += plots.plot_gate_heatmaps(gates, args.out, args.gate_stat)
        result["figures"] = [os.path.basename(f) for f in figures]
        table = report.write_report(result, args.out, baseline)
    except OSError as e:
        print(f"error: {args.out}: cannot write output: {one_line(e.strerror or e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except UserError as e:  # atomic_io: a full disk names the file and the space it needed
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(table)
    for n in result["notes"]:
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
