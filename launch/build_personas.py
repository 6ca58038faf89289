"""Fill `user_persona` in raw event files with a persona the model writes from each user's posts.

    python launch/build_personas.py --weights SPEC --input EVENTS_DIR --out OUT_DIR
        [--max_new_tokens 96] [--greedy] [--seed 0] [--batch_size 8] [--max_history 10]
        [--overwrite_existing] [--no_progress]

Existing personas are kept unless --overwrite_existing. Bad input stops with one line naming
the file, the record and the field (exit status 2), before any model call.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from socialalign_jax.core.cli_setup import quiet_startup  # noqa: E402

quiet_startup()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="base model: gguf:smollm2, gguf:FILE, hf:DIR, random:PRESET")
    p.add_argument("--input", required=True, help="directory of raw event *.json files")
    p.add_argument("--out", required=True, help="output directory (same file names)")
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (default: T=0.7, top_k=20, top_p=0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_history", type=int, default=10, help="history posts shown to the model per user")
    p.add_argument("--overwrite_existing", action="store_true", help="replace personas already in the input")
    p.add_argument("--dtype", default=None, help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def run(argv=None) -> int:
    from socialalign_jax.core.errors import UserError
    from socialalign_jax.tools import personas
    from socialalign_jax.inference.generation import stop_tokens_for
    from socialalign_jax.model.sampling import SamplingConfig
    from socialalign_jax.weights.resolve import resolve_weights

    args = parse_args(argv)
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.max_history < 1:
        raise UserError("--max_new_tokens, --batch_size and --max_history must be >= 1")
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
                                      progress=not args.no_progress)
    print(summary.line())
    return 0


def main(argv=None):
    from socialalign_jax.core.errors import cli_main

    cli_main(run, argv)


if __name__ == "__main__":
    main()
