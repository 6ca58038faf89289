"""Generate posts (and sentiment-head probabilities) for a split with a trained run's adapters.

    python launch/generate.py --workdir DIR --split test --out preds.jsonl \
        [--max_examples N] [--greedy] [--gates_out gates.json] [--config.sample.temperature=0.7 ...]

Reads the run's saved config (DIR/config.json: nothing given at training time is repeated;
`--config.a.b=v` overrides a value, `--config FILE` replaces the whole config), the base weights
it names, the dataset built in DIR (by launch/train.py) and the latest Orbax checkpoint in
DIR/checkpoints; writes the JSONL that launch/evaluate.py scores.
A bad input stops with one line naming the file, the example and the field (exit status 2).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from socialalign_jax.core.cli_setup import define_run_config_flag, quiet_startup, run_absl  # noqa: E402

quiet_startup()

from absl import flags  # noqa: E402

_CONFIG = define_run_config_flag()
flags.declare_key_flag("config")  # defined in core/cli_setup: --help lists it with this script's own flags
flags.declare_key_flag("config_help")
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory (checkpoints, built dataset).")
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split to generate for.")
_OUT = flags.DEFINE_string("out", None, "Predictions JSONL to write.")
_MAX = flags.DEFINE_integer("max_examples", 0, "Generate for the first N examples only (0 = all).")
_GREEDY = flags.DEFINE_bool("greedy", None, "Greedy decoding (default: config sample.greedy).")
_GATES = flags.DEFINE_string("gates_out", None, "Also write per-layer gate statistics (launch/evaluate.py --gates).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (--noprogress: none, e.g. in a log file).")


def main(argv):
    from socialalign_jax.core.errors import UserError, cli_main
    from socialalign_jax.inference.generation import run_generate

    def go():
        if len(argv) > 1:
            raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
        cfg = _CONFIG.value
        workdir = _WORKDIR.value or os.path.join("runs", f"weibo-{cfg.preset}")
        if not _OUT.value:
            raise UserError("--out FILE.jsonl is required")
        if os.path.isdir(_OUT.value):
            raise UserError(f"--out {_OUT.value}: is a directory; expected a file name (predictions JSONL)")
        if _MAX.value < 0:
            raise UserError(f"--max_examples {_MAX.value}: expected a count >= 0 (0 = all)")
        from socialalign_jax.runs.run_config import as_run_config

        if _GREEDY.value is not None:  # --greedy is a sample.greedy override: applied before the config is checked
            cfg.sample.greedy = bool(_GREEDY.value)
        return run_generate(as_run_config(cfg, source="--config"), workdir, split=_SPLIT.value, out=_OUT.value, max_examples=_MAX.value,
                            greedy=_GREEDY.value, gates_out=_GATES.value, step=_STEP.value,
                            progress=_PROGRESS.value)

    cli_main(go)


if __name__ == "__main__":
    run_absl(main)
