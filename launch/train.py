"""Train PAC-LoRA (and the sentiment head) with the dual-level loss.

    python launch/train.py --config configs/weibo.py [--workdir DIR] [--config.train.num_steps=100 ...]

Re-running with the same --workdir resumes from its latest checkpoint. The default preset
also generates posts for the held-out events and evaluates them at the end (the quickstart).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from socialalign_jax.cli_setup import quiet_startup  # noqa: E402

quiet_startup()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/weibo.py", "Training config (file[:preset]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the built dataset go "
                               "(default: runs/<config name>-<preset>).")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "Disable the progress bar.")


def main(argv):
    del argv
    from socialalign_jax.errors import cli_main
    from socialalign_jax.train.run import run_training

    cfg = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", f"weibo-{cfg.preset}")
    cli_main(lambda: run_training(cfg, workdir, progress=not _NO_PROGRESS.value))


if __name__ == "__main__":
    app.run(main)
