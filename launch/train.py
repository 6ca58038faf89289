"""Train PAC-LoRA (and the sentiment head) with the dual-level loss.

    python launch/train.py --config configs/weibo.py [--workdir DIR] [--config.train.num_steps=100 ...]

Re-running with the same --workdir resumes from its latest checkpoint. The default preset
also generates posts for the held-out events and evaluates them at the end (the quickstart).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from socialalign_jax.core.cli_setup import define_config_flag, quiet_startup, run_absl, usage_error  # noqa: E402

quiet_startup()

from absl import flags  # noqa: E402

_CONFIG = define_config_flag("config", "configs/weibo.py", "Training config (file[:preset]).")
flags.declare_key_flag("config")  # defined in core/cli_setup: --help lists it with this script's own flags
flags.declare_key_flag("config_help")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the built dataset go "
                               "(default: runs/<config name>-<preset>).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (--noprogress: none, e.g. in a log file).")
_ACCEPT = flags.DEFINE_bool("accept_config_change", False,
                            "Resume even though the config differs from the run's config.json in keys that change "
                            "the training (lr, loss weights, data, ...); config.json is updated to the new values.")


def main(argv):
    if len(argv) > 1:
        usage_error(f"unexpected arguments: {' '.join(argv[1:])}", argv)
    from socialalign_jax.core.errors import cli_main
    from socialalign_jax.train.run import run_training

    cfg = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", f"weibo-{cfg.preset}")
    from socialalign_jax.runs.run_config import as_run_config

    # The boundary: the ConfigDict of --config becomes the typed run config here, once.
    cli_main(lambda: run_training(as_run_config(cfg, source="--config"), workdir, progress=_PROGRESS.value,
                                  accept_config_change=_ACCEPT.value))


if __name__ == "__main__":
    run_absl(main)
