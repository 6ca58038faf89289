"""The zero-shot labeller wired to one of our own checkpoints.

`ZeroShotLabeller` only knows `score_fn(prompts, continuations) -> summed log-probs`; this
module supplies that function from a base model (any weights spec), so labelling generated
posts needs no external classifier and no network. Pair scoring goes through
`scoring.score_examples` (the jitted `token_logprobs`, params passed as arguments), i.e. the
same numbers `launch/score.py` would print for the pair. The labeller asks the faster
`score_fn.score_words` instead: the K label words share their prompt, so each prompt is
prefilled into a KV cache once and only the words run K times from it (`word_logprobs`).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from socialalign_jax.core.buckets import bucket
from socialalign_jax.core.errors import UserError
from socialalign_jax.data.labellers import ZeroShotLabeller
from socialalign_jax.inference import scoring
from socialalign_jax.model import backend, decoder, sampling
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.nll import token_nll
from socialalign_jax.weights.resolve import WeightsError, resolve_weights
from socialalign_jax.weights.tokenizer import chat_template

__all__ = ["model_score_fn", "word_logprobs", "zero_shot_labeller"]


def _encode_prompt(tokenizer, prompt: str, *, chat: bool) -> list[int]:
    """The prompt's ids: with chat, a ChatML user turn plus the assistant generation prompt."""
    if chat:
        prompt = chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer.encode(prompt, add_special_tokens=False)


def _check_pair(p_ids: list[int], c_ids: list[int], *, index: int, vocab_size: int) -> None:
    """The one-line errors of a (prompt, continuation) pair: an empty field, an id outside the vocabulary."""
    if not p_ids:
        raise UserError(f"zero-shot scoring: pair {index}: field 'prompt' is empty")
    if not c_ids:
        raise UserError(f"zero-shot scoring: pair {index}: field 'continuation' is empty")
    bad = [t for t in p_ids + c_ids if not 0 <= t < vocab_size]
    if bad:
        raise UserError(f"zero-shot scoring: pair {index}: token id {bad[0]} is outside the model vocabulary "
                        f"({vocab_size}); tokenizer and checkpoint do not match")


def _encode_pair(tokenizer, prompt: str, continuation: str, *, chat: bool, index: int,
                 vocab_size: int) -> scoring.Example:
    """Prompt and continuation are tokenised separately, so the scored tokens are exactly the
    continuation's own (a joint encoding could merge the last prompt character into them)."""
    p_ids = _encode_prompt(tokenizer, prompt, chat=chat)
    c_ids = tokenizer.encode(continuation, add_special_tokens=False)
    _check_pair(p_ids, c_ids, index=index, vocab_size=vocab_size)
    return scoring.Example({}, p_ids + c_ids, len(p_ids))


@functools.partial(jax.jit, static_argnames=("cfg", "lora_cfg"))
def word_logprobs(params, adapters, prompt_ids, prompt_mask, word_ids, word_mask, *, cfg: ModelConfig,
                  lora_cfg=None):
    """[B, K] float32: sum of log p(word k's tokens | prompt b), each prompt run once.

    prompt_ids/prompt_mask [B, P] LEFT-padded (every row's last token in column P-1);
    word_ids/word_mask [K, C] RIGHT-padded, each word >= 1 token. The B prompts are prefilled
    into a KV cache once (`sampling.prefill`): the logits at their last token give every word's
    first token. The cache then branches into K rows per prompt (`decoder.branch_cache`, row
    b*K + k, the prompt's slots stored and read once) and the K words' tokens but their last run
    through it at their absolute positions; the logits
    there give the words' later tokens. So a prompt costs one pass and each word C-1 tokens,
    where a full forward per pair costs K passes over the prompt. Routing reads no spans (as
    `model_score_fn`'s full forward: every token is 'other'). Full-vocabulary softmax.
    """
    b = prompt_ids.shape[0]
    k, c = word_ids.shape
    none = jnp.zeros((b,), jnp.int32)
    pre = sampling.prefill(params, adapters, prompt_ids, prompt_mask, cfg, lora_cfg, (none, none), 0)
    first = jax.nn.log_softmax(pre.logits.astype(jnp.float32), axis=-1)[:, word_ids[:, 0]]   # [B, K]
    if c == 1:
        return first
    cache = decoder.branch_cache(pre.cache, k, c - 1, cfg, lora_cfg if adapters is not None else None)
    ids, mask = jnp.tile(word_ids, (b, 1)), jnp.tile(word_mask, (b, 1))                     # [B*K, C]
    out = decoder.forward(params, ids[:, :-1], cfg, attention_mask=mask[:, :-1], adapters=adapters,
                          lora_cfg=lora_cfg, cache=cache)
    logits = out.logits                                                                     # [B*K, C-1, V]
    rest = jnp.where(mask[:, 1:] > 0, -token_nll(logits, ids[:, 1:]), 0.0).sum(-1)          # [B*K]
    return first + rest.reshape(b, k)


def model_score_fn(params, cfg: ModelConfig, tokenizer, *, batch_size: int = 16, chat: bool = True,
                   adapters=None, lora_cfg=None, cached: bool = True
                   ) -> Callable[[Sequence[str], Sequence[str]], np.ndarray]:
    """score_fn(prompts, continuations) -> [N] float64: sum of log p(continuation tokens | prompt).

    chat=True renders each prompt as a ChatML user turn plus the assistant generation prompt
    (no system turn), which is how instruction-tuned checkpoints expect to be asked; the
    continuation is scored as the first tokens of the reply, without a closing <|im_end|>.
    The softmax runs over the model's full vocabulary, as in sampling.

    With cached=True (the default) the function also has `score_fn.score_words(prompts, words)
    -> [N, K]`, the same numbers for every (prompt, word) pair from one prefill per prompt
    (`word_logprobs`), which `ZeroShotLabeller` prefers; cached=False leaves it out, so the
    labeller scores N*K pairs by full forwards (the reference path, and the benchmark's baseline).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # 'auto' backend choices made here, on the host, for the default devices (model/backend.py).
    cfg, lora_cfg = backend.resolve_for_platform(cfg, lora_cfg)

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

    def score_words(prompts: Sequence[str], words: Sequence[str]) -> np.ndarray:
        """[N, K] float64: score_fn's number for pair (prompts[n], words[k]), each prompt run once.

        Prompts go in batches of `batch_size` (fewer rows for a short last batch: a power of two),
        left-padded to a multiple of scoring.BUCKET tokens, in order of length so that a batch
        holds prompts of similar lengths. The words are right-padded to the longest one, not to a
        bucket: a labelling job has one set of words, hence one word length, and every padded
        column would run B*K more tokens (SmolLM2 splits 消极 / 中性 / 积极 into 5 / 3 / 4 tokens).
        """
        k = len(words)
        p_ids = [_encode_prompt(tokenizer, p, chat=chat) for p in prompts]
        w_ids = [tokenizer.encode(w, add_special_tokens=False) for w in words]
        for i, p in enumerate(p_ids):  # the errors of the pair path, for the same pair index
            for j, w in enumerate(w_ids):
                _check_pair(p, w, index=i * k + j, vocab_size=cfg.vocab_size)
        out = np.zeros((len(prompts), k), np.float64)
        if not len(prompts) or not k:
            return out
        c = max(len(w) for w in w_ids)
        wid = np.full((k, c), pad_id, np.int32)
        wmask = np.zeros((k, c), np.int32)
        for j, w in enumerate(w_ids):
            wid[j, :len(w)], wmask[j, :len(w)] = w, 1
        order = sorted(range(len(p_ids)), key=lambda i: len(p_ids[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = min(bucket(len(idx), pow2=True), batch_size)
            p = bucket(max(len(p_ids[i]) for i in idx), multiple=scoring.BUCKET)
            # Filler rows hold one token, so that no row of the prefill attends to nothing.
            ids, mask = sampling.left_pad([p_ids[i] for i in idx] + [[pad_id]] * (rows - len(idx)), pad_id, p)
            lp = word_logprobs(params, adapters, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(wid),
                               jnp.asarray(wmask), cfg=cfg, lora_cfg=lora_cfg)
            out[idx] = np.asarray(lp, np.float64)[:len(idx)]
        return out

    if cached:
        score_fn.score_words = score_words
    return score_fn


def zero_shot_labeller(weights_spec: str, *, batch_size: int = 16, chat: bool = True,
                       dtype: str | None = None, cached: bool = True, **labeller_kw) -> ZeroShotLabeller:
    """A ZeroShotLabeller scored by the base model `weights_spec` names (resolve.resolve_weights).

    Params are moved to the device once here, not per call. cached: see `model_score_fn`.
    """

    w = resolve_weights(weights_spec, dtype=dtype)
    if w.tokenizer is None:
        raise WeightsError(f"weights {weights_spec!r}: no tokenizer for this model (random non-Qwen presets have "
                           "none); the zero-shot labeller needs text in, so use gguf:, hf: or a qwen2 preset")
    params = jax.device_put(w.params)
    return ZeroShotLabeller(model_score_fn(params, w.cfg, w.tokenizer, batch_size=batch_size, chat=chat,
                                           cached=cached),
                            **labeller_kw)
