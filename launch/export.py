"""Export a training run's adapters.

    python launch/export.py --workdir DIR --format orbax|safetensors|peft|socialalign|merged --out DIR
        [--step N] [--base_model HF_DIR]

orbax: the adapter tree alone (no optimizer state) as an Orbax checkpoint + adapter_config.json;
safetensors: our layout (launch/score.py --adapters reads it); peft: stock PEFT LoRA
(PeftModel.from_pretrained / AutoPeftModelForCausalLM read it; only for adapters whose gates do
not depend on the input: plain LoRA or routing 'uniform'; its adapter_config.json names the run's
hf: directory or GGUF file as the base, or --base_model); socialalign: the original SocialAlign
layout with experts and gates, for the authors' patched PEFT only (stock PEFT would load it without
an error and compute other outputs: the export says so in one line); merged: a full Hugging Face
checkpoint with the adapters folded into the weights, tokenizer and generation config included
(plain LoRA or routing 'uniform'). A format that cannot hold the run's adapters is refused with
one line saying which one can.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from socialalign_jax.core.cli_setup import quiet_startup, run_absl  # noqa: E402

quiet_startup()

from absl import flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory (config.json, checkpoints/).")
_FORMAT = flags.DEFINE_enum("format", None, ["orbax", "safetensors", "peft", "socialalign", "merged"],
                            "Export format.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BASE = flags.DEFINE_string("base_model", None, "base_model_name_or_path written into a peft export's "
                            "adapter_config.json (default: the run's hf: directory or GGUF file; required for a "
                            "run on random weights).")


def main(argv):
    from socialalign_jax.core.errors import UserError, cli_main

    def go():
        if len(argv) > 1:
            raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
        for name, flag in (("--workdir", _WORKDIR), ("--format", _FORMAT), ("--out", _OUT)):
            if not flag.value:
                raise UserError(f"{name} is required")
        if os.path.exists(_OUT.value) and not os.path.isdir(_OUT.value):
            raise UserError(f"--out {_OUT.value}: is a file; expected a directory (the export writes several files)")
        from socialalign_jax.inference import export
        from socialalign_jax.runs import restore

        cfg = restore.load_run_config(_WORKDIR.value)  # fail fast (before loading weights) on what cannot work
        if _FORMAT.value == "merged":
            why = export.merge_refusal(cfg.lora)
        elif _FORMAT.value == "peft":
            why = export.peft_refusal(cfg.lora) or export.peft_base_refusal(cfg, _BASE.value)
        else:
            why = None
        if why:
            raise export.ExportError(f"--format {_FORMAT.value}: {why}")
        run = restore.restore_run(_WORKDIR.value, _STEP.value)
        files = export.export_run(run, _FORMAT.value, _OUT.value, base_model=_BASE.value)
        carried = export.carry_track_record(_WORKDIR.value, run.step, _OUT.value)
        print(f"exported step {run.step} of {_WORKDIR.value} as {_FORMAT.value}: " + ", ".join(map(str, files + carried)))
        if _FORMAT.value == "socialalign":
            print("note: " + export.SOCIALALIGN_NOTE.format(out=_OUT.value), file=sys.stderr)
        return 0

    cli_main(go)


if __name__ == "__main__":
    run_absl(main)
