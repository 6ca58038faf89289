"""Score texts or responses with a local HF checkpoint: per-token log-probs and perplexity.

    python launch/score.py --checkpoint DIR --input in.jsonl --out out.jsonl
        [--chat] [--batch_size 8] [--max_length N] [--dtype bfloat16] [--tokenizer DIR|builtin]
        [--adapters PATH]

Each input line is {"text": ...} or {"prompt": ..., "response": ...} (optional "system" with
--chat); each output line is the input plus "token_logprobs", "sum_logprob", "num_tokens"
and "perplexity". Bad input stops with one line naming the file and line (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from socialalign_jax.errors import UserError, cli_main  # noqa: E402


def _positive(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="local HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--input", required=True, help="JSONL of {'text'} or {'prompt','response'} records")
    p.add_argument("--out", required=True, help="output JSONL (written atomically)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in ChatML, close responses with <|im_end|>")
    p.add_argument("--batch_size", type=_positive, default=8)
    p.add_argument("--max_length", type=_positive, default=None,
                   help="reject (never truncate) records longer than this many tokens")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="param/compute dtype (default: the checkpoint's torch_dtype)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir or tokenizer.json (default: the checkpoint dir); 'builtin' = offline Qwen2")
    p.add_argument("--adapters", default=None, help="PAC-LoRA adapter file/dir to apply")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from socialalign_jax import scoring
    from socialalign_jax.atomic_io import write_jsonl
    from socialalign_jax.hf_import import check_hf_checkpoint, load_hf_checkpoint
    from socialalign_jax.tokenizer import load_tokenizer

    real_cfg = check_hf_checkpoint(args.checkpoint)  # headers only: fails fast before tokenizer/weights
    try:
        tokenizer = load_tokenizer(None if args.tokenizer == "builtin" else (args.tokenizer or args.checkpoint))
    except ValueError as e:  # TokenizerFileError: already names the file
        raise UserError(str(e)) from None
    examples = scoring.encode_file(tokenizer, args.input, chat=args.chat, vocab_size=real_cfg.vocab_size,
                                   max_length=args.max_length or real_cfg.max_position_embeddings)
    cfg, params = load_hf_checkpoint(args.checkpoint, dtype=args.dtype)
    adapters = lora_cfg = None
    if args.adapters:
        adapters, lora_cfg = scoring.load_adapters_for_scoring(args.adapters, cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    records = scoring.score_examples(params, cfg, examples, batch_size=args.batch_size, pad_id=pad_id,
                                     real_vocab=real_cfg.vocab_size, adapters=adapters, lora_cfg=lora_cfg)
    n = write_jsonl(records, args.out)
    print(f"scored {n} records -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli_main(main)
