"""The zero-shot labeller wired to one of our own checkpoints.

`ZeroShotLabeller` only knows `score_fn(prompts, continuations) -> summed log-probs`; this
module supplies that function from a base model (any weights spec), so labelling generated
posts needs no external classifier and no network. Scoring goes through
`scoring.score_examples` (the jitted `token_logprobs`, params passed as arguments), i.e. the
same numbers `launch/score.py` would print for the pair.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import numpy as np

from socialalign_jax.core.errors import UserError
from socialalign_jax.data.labellers import ZeroShotLabeller
from socialalign_jax.inference import scoring
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.weights.resolve import WeightsError, resolve_weights
from socialalign_jax.weights.tokenizer import chat_template

__all__ = ["model_score_fn", "zero_shot_labeller"]


def _encode_pair(tokenizer, prompt: str, continuation: str, *, chat: bool, index: int,
                 vocab_size: int) -> scoring.Example:
    """Prompt and continuation are tokenised separately, so the scored tokens are exactly the
    continuation's own (a joint encoding could merge the last prompt character into them)."""
    enc = functools.partial(tokenizer.encode, add_special_tokens=False)
    if chat:
        prompt = chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    p_ids, c_ids = enc(prompt), enc(continuation)
    if not p_ids:
        raise UserError(f"zero-shot scoring: pair {index}: field 'prompt' is empty")
    if not c_ids:
        raise UserError(f"zero-shot scoring: pair {index}: field 'continuation' is empty")
    ids = p_ids + c_ids
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise UserError(f"zero-shot scoring: pair {index}: token id {bad[0]} is outside the model vocabulary "
                        f"({vocab_size}); tokenizer and checkpoint do not match")
    return scoring.Example({}, ids, len(p_ids))


def model_score_fn(params, cfg: ModelConfig, tokenizer, *, batch_size: int = 16, chat: bool = True,
                   adapters=None, lora_cfg=None) -> Callable[[Sequence[str], Sequence[str]], np.ndarray]:
    """score_fn(prompts, continuations) -> [N] float64: sum of log p(continuation tokens | prompt).

    chat=True renders each prompt as a ChatML user turn plus the assistant generation prompt
    (no system turn), which is how instruction-tuned checkpoints expect to be asked; the
    continuation is scored as the first tokens of the reply, without a closing <|im_end|>.
    The softmax runs over the model's full vocabulary, as in sampling.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def score_fn(prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        examples = [_encode_pair(tokenizer, p, c, chat=chat, index=i, vocab_size=cfg.vocab_size)
                    for i, (p, c) in enumerate(zip(prompts, continuations))]
        if not examples:
            return np.zeros((0,), np.float64)
        rows = scoring.score_examples(params, cfg, examples, batch_size=batch_size, pad_id=pad_id,
                                      adapters=adapters, lora_cfg=lora_cfg)
        return np.asarray([r["sum_logprob"] for r in rows], np.float64)

    return score_fn


def zero_shot_labeller(weights_spec: str, *, batch_size: int = 16, chat: bool = True,
                       dtype: str | None = None, **labeller_kw) -> ZeroShotLabeller:
    """A ZeroShotLabeller scored by the base model `weights_spec` names (resolve.resolve_weights).

    Params are moved to the device once here, not per call.
    """

    w = resolve_weights(weights_spec, dtype=dtype)
    if w.tokenizer is None:
        raise WeightsError(f"weights {weights_spec!r}: no tokenizer for this model (random non-Qwen presets have "
                           "none); the zero-shot labeller needs text in, so use gguf:, hf: or a qwen2 preset")
    params = jax.device_put(w.params)
    return ZeroShotLabeller(model_score_fn(params, w.cfg, w.tokenizer, batch_size=batch_size, chat=chat),
                            **labeller_kw)
