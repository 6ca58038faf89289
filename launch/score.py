"""Score texts or responses with a local HF checkpoint: per-token log-probs and perplexity.

    python launch/score.py --weights hf:DIR --input in.jsonl --out out.jsonl
        [--chat | --socialalign] [--batch_size 8] [--max_length N] [--dtype bfloat16]
        [--tokenizer DIR|builtin] [--adapters PATH [--routing MODE]]

Each input line is {"text": ...} or {"prompt": ..., "response": ...} (optional "system" with
--chat); each output line is the input plus "token_logprobs", "sum_logprob", "num_tokens"
and "perplexity". Bad input stops with one line naming the file and line (exit status 2).

PAC-LoRA adapters (ours, or the original's layout) route by the user/news spans as in
training: a record may give them as character offsets into its "prompt" (or "text"),
"user_end_char" and "news_end_char"; otherwise they are found from the SocialAlign markers
(现在你看到了一则新闻 / ，请发一条关于hashtag) exactly as the dataset builder finds them.
--socialalign = --chat with the SocialAlign system turn 你是一个微博用户。 for records without
"system", i.e. the prompt is a user turn as the authors' Alpaca records hold it. Records
without spans are an error for adapters whose gates read them, unless --routing uniform.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from socialalign_jax.core.cli_setup import parse_flags, quiet_startup, usage_error  # noqa: E402

quiet_startup()  # before jax: no libtpu or TensorFlow start-up noise

from socialalign_jax.core.errors import UserError, cli_main  # noqa: E402


def _is_hf(spec: str) -> bool:
    """hf:DIR or a bare DIR; another kind of weights spec (gguf:, random:) is not a checkpoint to score."""
    return spec.startswith(("hf:", "/")) or ":" not in spec.split("/")[0]


# Its own FlagValues, not absl's global FLAGS: tests load this script and call main() in-process
# many times (core/cli_setup.parse_flags).
FLAGS = flags.FlagValues()
flags.DEFINE_string("weights", None, "Local Hugging Face checkpoint: hf:DIR (config.json + safetensors); a bare "
                    "DIR also works.", flag_values=FLAGS)
flags.DEFINE_string("input", None, "JSONL of {'text'} or {'prompt','response'} records.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output JSONL (written atomically).", flag_values=FLAGS)
flags.DEFINE_bool("chat", False, "Wrap prompts in ChatML, close responses with <|im_end|>.", flag_values=FLAGS)
flags.DEFINE_bool("socialalign", False, "--chat with the SocialAlign system turn (你是一个微博用户。) for records "
                  "without 'system'.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "Records per forward pass.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("max_length", None, "Reject (never truncate) records longer than this many tokens "
                     "(default: the checkpoint's max_position_embeddings).", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                  "Param/compute dtype (default: the checkpoint's config.json dtype).", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "Tokenizer dir or tokenizer.json (default: the checkpoint dir); "
                    "'builtin' = offline Qwen2.", flag_values=FLAGS)
flags.DEFINE_string("adapters", None, "PAC-LoRA adapter file/dir to apply.", flag_values=FLAGS)
flags.DEFINE_enum("routing", None, ["token", "pooled", "uniform_a", "uniform_b", "uniform"],
                  "With --adapters: override their routing mode (uniform: gates read no spans).", flag_values=FLAGS)
flags.mark_flags_as_required(["weights", "input", "out"], flag_values=FLAGS)
flags.register_validator("weights", lambda spec: spec is None or _is_hf(spec),
                         "score.py reads Hugging Face checkpoints, give hf:DIR", flag_values=FLAGS)


def parse_args(argv=None):
    args = parse_flags(FLAGS, argv, "score.py", __doc__)
    if args.routing and not args.adapters:
        usage_error("--routing needs --adapters", ["score.py"])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import os

    checkpoint = args.weights[3:] if args.weights.startswith("hf:") else args.weights

    if os.path.exists(args.out) and os.path.exists(args.input) and os.path.samefile(args.out, args.input):
        raise UserError(f"--out {args.out} is the --input file; choose another output (the input would be replaced)")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out}: is a directory; expected a file name")
    from socialalign_jax.core.atomic_io import write_jsonl
    from socialalign_jax.data.prompt import SYSTEM_PROMPT
    from socialalign_jax.inference import scoring
    from socialalign_jax.weights.hf import check_hf_checkpoint, load_hf_checkpoint
    from socialalign_jax.weights.tokenizer import load_tokenizer

    real_cfg = check_hf_checkpoint(checkpoint)  # headers only: fails fast before tokenizer/weights
    try:
        tokenizer = load_tokenizer(None if args.tokenizer == "builtin" else (args.tokenizer or checkpoint))
    except ValueError as e:  # TokenizerFileError: already names the file
        raise UserError(str(e)) from None
    adapters = lora_cfg = None
    if args.adapters:  # read (and checked against the checkpoint's shapes) before any weights load
        adapters, lora_cfg = scoring.load_adapters_for_scoring(args.adapters, real_cfg, args.routing)
    examples = scoring.encode_file(tokenizer, args.input, chat=args.chat or args.socialalign,
                                   vocab_size=real_cfg.vocab_size,
                                   max_length=args.max_length or real_cfg.max_position_embeddings,
                                   system=SYSTEM_PROMPT if args.socialalign else None,
                                   need_spans=scoring.span_requirement(lora_cfg, args.adapters))
    cfg, params = load_hf_checkpoint(checkpoint, dtype=args.dtype)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    records = scoring.score_examples(params, cfg, examples, batch_size=args.batch_size, pad_id=pad_id,
                                     real_vocab=real_cfg.vocab_size, adapters=adapters, lora_cfg=lora_cfg)
    from tqdm import tqdm

    # A bar on an interactive terminal (disable=None: off when stderr is not a TTY, as in logs).
    records = tqdm(records, total=len(examples), desc="scoring", unit="record", dynamic_ncols=True, disable=None)
    n = write_jsonl(records, args.out)
    print(f"scored {n} records -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli_main(main)
