"""Export a training run's adapters.

    python launch/export.py --workdir DIR --format orbax|safetensors|peft|merged --out DIR [--step N]

orbax: the adapter tree alone (no optimizer state) as an Orbax checkpoint + adapter_config.json;
safetensors: our layout (launch/score.py --adapters reads it); peft: the original SocialAlign
PEFT layout; merged: a full Hugging Face checkpoint with the adapters folded into the weights
(only for plain LoRA or routing 'uniform'; refused otherwise, with the reason).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from socialalign_jax.cli_setup import quiet_startup, run_absl  # noqa: E402

quiet_startup()

from absl import flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory (config.json, checkpoints/).")
_FORMAT = flags.DEFINE_enum("format", None, ["orbax", "safetensors", "peft", "merged"], "Export format.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
    from socialalign_jax.errors import UserError, cli_main

    def go():
        if len(argv) > 1:
            raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
        for name, flag in (("--workdir", _WORKDIR), ("--format", _FORMAT), ("--out", _OUT)):
            if not flag.value:
                raise UserError(f"{name} is required")
        from socialalign_jax import export

        cfg = export.load_run_config(_WORKDIR.value)  # fail fast (before loading weights) on what cannot work
        if _FORMAT.value == "merged":
            from socialalign_jax.train.loop import lora_config
            why = export.merge_refusal(lora_config(cfg))
            if why:
                raise export.ExportError(f"--format merged: {why}")
        run = export.restore_run(_WORKDIR.value, _STEP.value)
        files = export.export_run(run, _FORMAT.value, _OUT.value)
        print(f"exported step {run.step} of {_WORKDIR.value} as {_FORMAT.value}: " + ", ".join(map(str, files)))
        return 0

    cli_main(go)


if __name__ == "__main__":
    run_absl(main)
