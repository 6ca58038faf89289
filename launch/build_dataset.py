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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from socialalign_jax.core.cli_setup import argument_parser  # noqa: E402
from socialalign_jax.core.errors import UserError, cli_main  # noqa: E402


# Build settings whose defaults come from the config's `data` section (one place for them: the
# dataset built here is the one `launch/train.py --config` with the same config would build).
CONFIG_DEFAULTS = ("max_length", "mode", "on_overflow", "num_history", "test_fraction", "split_by", "seed",
                   "max_events")


def parse_args(argv):
    from socialalign_jax.core.cli_setup import load_config_file
    from socialalign_jax.data.tfds_builders import SOURCES

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argument_parser(add_help=False)
    pre.add_argument("--config", default="configs/weibo.py")
    spec = pre.parse_known_args(argv)[0].config
    from socialalign_jax.runs.run_config import as_run_config

    data = as_run_config(load_config_file(spec), source=spec).data  # typed: a bad key is one line
    ap = argument_parser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/weibo.py",
                    help="config FILE[:preset] whose `data` section gives the defaults of --max_length, --mode, "
                         "--on_overflow, --num_history, --test_fraction, --split_by, --seed, --max_events")
    ap.add_argument("--source", required=True, choices=sorted(SOURCES) + ["lamp"])
    ap.add_argument("--input", required=True,
                    help="event dir (socialweibo), Alpaca file or dir, LaMP questions file or dir, "
                         "CED_Dataset dir (ced), ZS-CSD data file or dir (zs_csd), NLPCC 2016 TSV (nlpcc2016)")
    ap.add_argument("--labels", default=None,
                    help="comma-separated class names in id order (default: the source's own, "
                         "negative,neutral,positive or favor,against,neutral for zs_csd/nlpcc2016)")
    ap.add_argument("--max_events", type=int, default=int(data.max_events),
                    help="converters: read only the first N events (0 = all)")
    ap.add_argument("--out", required=True, help="data dir (tfds layout is created below it)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir or tokenizer.json (default: bundled Qwen2)")
    ap.add_argument("--max_length", type=int, default=int(data.max_length))
    ap.add_argument("--mode", default=str(data.mode), choices=["full", "without_persona", "without_history"])
    ap.add_argument("--on_overflow", default=str(data.on_overflow), choices=["skip", "raise"])
    ap.add_argument("--num_history", type=int, default=int(data.num_history))
    ap.add_argument("--test_fraction", type=float, default=float(data.test_fraction))
    ap.add_argument("--split_by", default=str(data.split_by), choices=["event", "user"])
    ap.add_argument("--seed", type=int, default=int(data.seed))
    ap.add_argument("--name", default="default", help="tfds config name (a subdirectory of --out)")
    ap.add_argument("--lamp_outputs", default=None, help="LaMP outputs file (default: *outputs*.json in --input)")
    ap.add_argument("--lamp_task", default=None, help="LaMP-4 | LaMP-5 | LaMP-7 (default: from the outputs file)")
    ap.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    return ap.parse_args(argv)


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
    out = Path(args.out).absolute()
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"--out {args.out}: {blocker} is a file; --out must be a directory (the dataset is built below it)")
    logging.getLogger("absl").setLevel(logging.ERROR)

    from socialalign_jax.data import summary, tfds_builders as B

    labels = (tuple(x.strip() for x in args.labels.split(",")) if args.labels is not None
              else B.default_labels(args.source))
    if len(labels) < 2 or len(set(labels)) != len(labels) or not all(labels):
        raise UserError(f"--labels: {args.labels!r} must name at least 2 distinct classes")

    cfg = B.SocialConfig(name=args.name, source=args.source, input=str(Path(args.input).resolve()),
                         tokenizer=args.tokenizer, max_length=args.max_length, mode=args.mode,
                         on_overflow=args.on_overflow, num_history=args.num_history,
                         test_fraction=args.test_fraction, split_by=args.split_by, seed=args.seed,
                         lamp_outputs=args.lamp_outputs, lamp_task=args.lamp_task, labels=labels,
                         max_events=args.max_events)
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # tfds' progress chatter
            path = B.build(args.out, cfg, overwrite=args.overwrite)
    except OSError as e:  # a full disk or an unwritable --out: one line (tfds leaves only its *.incomplete* dir)
        from socialalign_jax.core.atomic_io import write_error
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
