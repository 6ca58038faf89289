"""Build a SocialAlign dataset (tfds array_record) and print its summary table.

    python launch/build_dataset.py --source socialweibo --input events/ --out data/
    python launch/build_dataset.py --source zs_csd --input ../shared/data/zs_csd --out data/   # labels favor,against,neutral
    python launch/build_dataset.py --source ced --input /tmp/ced/CED_Dataset --out data/ --max_events 200

Bad input ends in one line naming the file, record and field, and exit status 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from absl import flags  # noqa: E402

from socialalign_jax.core.cli_setup import parse_flags, quiet_startup  # noqa: E402

quiet_startup()  # before jax: no libtpu or TensorFlow start-up noise

from socialalign_jax.core.errors import UserError, cli_main  # noqa: E402
from socialalign_jax.data.labellers import LABELLERS  # noqa: E402
from socialalign_jax.data.tfds_builders import CROWD_CAP, MIN_CROWD, SOURCES  # noqa: E402

# Build settings whose defaults come from the config's `data` section (one place for them: the
# dataset built here is the one `launch/train.py --config` with the same config would build).
CONFIG_DEFAULTS = ("max_length", "mode", "on_overflow", "num_history", "test_fraction", "split_by", "seed",
                   "max_events")

# Its own FlagValues, not absl's global FLAGS: tests call main() in-process (core/cli_setup.parse_flags).
FLAGS = flags.FlagValues()
_FROM_CONFIG = " (default: the --config's data.{})"
flags.DEFINE_string("config", "configs/weibo.py", "Config FILE[:preset] whose `data` section gives the defaults of "
                    "--max_length, --mode, --on_overflow, --num_history, --test_fraction, --split_by, --seed, "
                    "--max_events.", flag_values=FLAGS)
flags.DEFINE_enum("source", None, sorted(SOURCES) + ["lamp"], "The input's format.", flag_values=FLAGS)
flags.DEFINE_string("input", None, "Event dir (socialweibo), Alpaca file or dir, LaMP questions file or dir, "
                    "CED_Dataset dir (ced), ZS-CSD data file or dir (zs_csd), NLPCC 2016 TSV (nlpcc2016).",
                    flag_values=FLAGS)
flags.DEFINE_string("labels", None, "Comma-separated class names in id order (default: the source's own, "
                    "negative,neutral,positive or favor,against,neutral for zs_csd/nlpcc2016).", flag_values=FLAGS)
flags.DEFINE_integer("max_events", None, "Converters: read only the first N events (0 = all)."
                     + _FROM_CONFIG.format("max_events"), flag_values=FLAGS)
flags.DEFINE_string("labeller", "", "Sources that label their own responses (ced): the labeller, one of "
                    f"{', '.join(sorted(LABELLERS))} (default: snownlp, alias lexicon; docs/labellers.md measures them "
                    "on human-labelled Weibo posts: ngram is the better); recorded in the dataset's metadata.",
                    flag_values=FLAGS)
flags.DEFINE_integer("crowd_cap", None, "ced: each event's target is the labelled distribution of at most this many "
                     "of its responders (one response each, seeded sample); 0 = targets from the cases' labels "
                     f"(default {CROWD_CAP}).", flag_values=FLAGS)
flags.DEFINE_integer("min_crowd", None, f"ced: events whose crowd has fewer responses are left out (default {MIN_CROWD}).",
                     flag_values=FLAGS)
flags.DEFINE_string("out", None, "Data dir (the tfds layout is created below it).", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "Tokenizer dir or tokenizer.json (default: bundled Qwen2).", flag_values=FLAGS)
flags.DEFINE_integer("max_length", None, "Longest example, in tokens." + _FROM_CONFIG.format("max_length"),
                     flag_values=FLAGS)
flags.DEFINE_enum("mode", None, ["full", "without_persona", "without_history"],
                  "What the prompt holds." + _FROM_CONFIG.format("mode"), flag_values=FLAGS)
flags.DEFINE_enum("on_overflow", None, ["skip", "raise"], "An example longer than --max_length is skipped or an "
                  "error." + _FROM_CONFIG.format("on_overflow"), flag_values=FLAGS)
flags.DEFINE_integer("num_history", None, "History posts per prompt." + _FROM_CONFIG.format("num_history"),
                     flag_values=FLAGS)
flags.DEFINE_float("test_fraction", None, "Share of the test split." + _FROM_CONFIG.format("test_fraction"),
                   flag_values=FLAGS)
flags.DEFINE_enum("split_by", None, ["event", "user"], "What the train/test split keeps apart."
                  + _FROM_CONFIG.format("split_by"), flag_values=FLAGS)
flags.DEFINE_integer("seed", None, "Seed of the split." + _FROM_CONFIG.format("seed"), flag_values=FLAGS)
flags.DEFINE_string("name", "default", "tfds config name (a subdirectory of --out).", flag_values=FLAGS)
flags.DEFINE_string("lamp_outputs", None, "LaMP outputs file (default: *outputs*.json in --input).", flag_values=FLAGS)
flags.DEFINE_string("lamp_task", None, "LaMP-4 | LaMP-5 | LaMP-7 (default: from the outputs file).",
                    flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace a dataset already in --out.", flag_values=FLAGS)
flags.DEFINE_bool("json", False, "Print the summary as JSON instead of a table.", flag_values=FLAGS)
flags.mark_flags_as_required(["source", "input", "out"], flag_values=FLAGS)


def parse_args(argv):
    """The flags, with each build setting not given on the command line taken from --config's data section."""
    from socialalign_jax.core.cli_setup import load_config_file
    from socialalign_jax.runs.run_config import as_run_config

    args = parse_flags(FLAGS, argv, "build_dataset.py", __doc__)
    data = as_run_config(load_config_file(args.config), source=args.config).data  # typed: a bad key is one line
    for name in CONFIG_DEFAULTS:
        if args[name].value is None:
            setattr(args, name, getattr(data, name))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0 <= args.test_fraction < 1:
        raise UserError(f"--test_fraction: {args.test_fraction} is not in [0, 1)")
    if args.max_length < 8:
        raise UserError(f"--max_length: {args.max_length} is too small")
    if not Path(args.input).exists():
        raise UserError(f"{args.input}: no such file or directory (--input)")
    if args.max_events < 0:
        raise UserError(f"--max_events: {args.max_events} is negative")
    from socialalign_jax.core.atomic_io import output_name, write_error

    output_name(args.name, "--name")  # a subdirectory of --out, never a path out of it
    out = Path(args.out).absolute()
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"--out {args.out}: {blocker} is a file; --out must be a directory (the dataset is built below it)")
    logging.getLogger("absl").setLevel(logging.ERROR)

    from socialalign_jax.data import summary, tfds_builders as B

    from socialalign_jax.runs.run_config import names

    labels = names(args.labels) if args.labels is not None else B.default_labels(args.source)
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise UserError(f"--labels: {args.labels!r} must name at least 2 distinct classes")
    why = B.labels_problem(args.source, labels)
    if why:
        raise UserError(f"--labels {why}")

    crowd = {k: getattr(args, k) for k in ("crowd_cap", "min_crowd") if getattr(args, k) is not None}
    for k, v in crowd.items():
        if v < 0:
            raise UserError(f"--{k}: {v} is negative")
    if args.labeller:
        from socialalign_jax.data.labellers import make_labeller
        try:
            make_labeller(args.labeller)
        except ValueError as e:
            raise UserError(f"--labeller: {e}") from None
    cfg = B.SocialConfig(name=args.name, source=args.source, input=str(Path(args.input).resolve()),
                         labeller=args.labeller, **crowd,
                         tokenizer=args.tokenizer, max_length=args.max_length, mode=args.mode,
                         on_overflow=args.on_overflow, num_history=args.num_history,
                         test_fraction=args.test_fraction, split_by=args.split_by, seed=args.seed,
                         lamp_outputs=args.lamp_outputs, lamp_task=args.lamp_task, labels=labels,
                         max_events=args.max_events)
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # tfds' progress chatter
            path = B.build(args.out, cfg, overwrite=args.overwrite)
    except OSError as e:  # a full disk or an unwritable --out: one line (tfds leaves only its *.incomplete* dir)
        raise write_error(e.filename or args.out, e) from None
    s = summary.summarize(B.open_dataset(path).metadata)
    if args.json:
        print(json.dumps({"path": str(path), **s}, ensure_ascii=False))
    else:
        print(f"dataset: {path}")
        print(summary.format_table(s))
    return 0


if __name__ == "__main__":
    cli_main(main)
