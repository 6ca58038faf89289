"""Fill `user_persona` in raw event files with a persona the model writes from each user's posts.

    python launch/build_personas.py --weights SPEC --input EVENTS_DIR --out OUT_DIR
        [--max_new_tokens 96] [--greedy] [--seed 0] [--batch_size 8] [--max_history 10]
        [--overwrite_existing] [--noprogress]

Existing personas are kept unless --overwrite_existing. Bad input stops with one line naming
the file, the record and the field (exit status 2), before any model call.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from socialalign_jax.core.cli_setup import quiet_startup  # noqa: E402

quiet_startup()


from absl import flags  # noqa: E402

# Its own FlagValues, not absl's global FLAGS: tests load this script and call main() in-process
# (core/cli_setup.parse_flags).
FLAGS = flags.FlagValues()
flags.DEFINE_string("weights", None, "Base model: gguf:smollm2, gguf:FILE, hf:DIR, random:PRESET.", flag_values=FLAGS)
flags.DEFINE_string("input", None, "Directory of raw event *.json files.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output directory (same file names).", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 96, "Longest persona, in tokens.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_bool("greedy", False, "Argmax decoding (default: T=0.7, top_k=20, top_p=0.9).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "Users per generation batch.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("max_history", 10, "History posts shown to the model per user.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_bool("overwrite_existing", False, "Replace personas already in the input.", flag_values=FLAGS)
flags.DEFINE_string("dtype", None, "Parameter dtype (default: the checkpoint's).", flag_values=FLAGS)
flags.DEFINE_bool("progress", True, "Show a progress bar (--noprogress: none, e.g. in a log file).", flag_values=FLAGS)
flags.mark_flags_as_required(["weights", "input", "out"], flag_values=FLAGS)


def parse_args(argv):
    from socialalign_jax.core.cli_setup import parse_flags

    return parse_flags(FLAGS, argv, "build_personas.py", __doc__)


def run(argv=None) -> int:
    from socialalign_jax.core.errors import UserError
    from socialalign_jax.tools import personas
    from socialalign_jax.inference.generation import stop_tokens_for
    from socialalign_jax.model.sampling import SamplingConfig
    from socialalign_jax.weights.resolve import resolve_weights

    args = parse_args(argv)
    if not os.path.isdir(args.input):  # before the weights load (seconds to minutes)
        raise UserError(f"--input {args.input}: not a directory (raw event *.json files)")
    w = resolve_weights(args.weights, dtype=args.dtype)
    if w.tokenizer is None:
        raise UserError(f"weights {args.weights!r}: no tokenizer for this model; use gguf:, hf: or a qwen2 preset")
    pad = w.tokenizer.pad_token_id if w.tokenizer.pad_token_id is not None else w.tokenizer.eos_token_id
    scfg = SamplingConfig(max_new_tokens=args.max_new_tokens, greedy=args.greedy, seed=args.seed,
                          stop_tokens=stop_tokens_for(w.tokenizer), pad_id=int(pad))
    import jax

    summary = personas.build_personas(jax.device_put(w.params), w.cfg, w.tokenizer, args.input, args.out, scfg=scfg,
                                      batch_size=args.batch_size, seed=args.seed,
                                      overwrite_existing=args.overwrite_existing, max_history=args.max_history,
                                      progress=args.progress)
    print(summary.line())
    return 0


def main(argv=None):
    from socialalign_jax.core.errors import cli_main

    cli_main(run, argv)


if __name__ == "__main__":
    main()
