"""Per-token log-likelihood of texts or responses under a checkpoint (perplexity scoring).

Input records are JSON lines, either {"text": ...} (every token after the first is scored)
or {"prompt": ..., "response": ...} (only the response tokens are scored; with chat=True the
prompt becomes a ChatML user turn plus the generation prompt, and the response is closed
with <|im_end|>, exactly as the SFT data renders it).

Sequences are right-padded into fixed [batch_size, bucket] shapes so one jitted function
compiles once per length bucket. Log-probabilities are computed from the final hidden
states in sequence chunks, so the [B, S, V] logits tensor (V = 152k for Qwen2.5) never
exists in full.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from socialalign_jax.config import ModelConfig
from socialalign_jax.errors import UserError
from socialalign_jax.tokenizer import IM_END, chat_template

BUCKET = 64        # sequence lengths are padded up to a multiple of this (few recompiles)
LOGIT_CHUNK = 64   # positions per log-softmax chunk (bounds the [B, chunk, V] logits)


@dataclasses.dataclass(frozen=True)
class Example:
    """One record, tokenised: ids [n] and the index of the first scored token."""
    record: dict
    ids: list[int]
    first_scored: int  # tokens ids[first_scored:] are scored, each given everything before it


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line; a malformed line is a one-line UserError."""
    path = Path(path)
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot open input ({e.strerror or e})") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not valid UTF-8 (byte {e.start} of a read block)") from None


def _field(obj: dict, key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def encode_record(tokenizer, obj: dict, *, chat: bool, where: str) -> Example:
    """Tokenise one input record; `where` ('file: line N') prefixes every error."""
    has_text, has_pair = "text" in obj, ("prompt" in obj or "response" in obj)
    if has_text == has_pair:
        raise UserError(f"{where}: expected either field 'text' or fields 'prompt' and 'response'"
                        + (" (not both)" if has_text else ""))
    enc = functools.partial(tokenizer.encode, add_special_tokens=False)
    if has_text:
        text = _field(obj, "text", where)
        if chat:
            raise UserError(f"{where}: --chat needs 'prompt'/'response' records, got field 'text'")
        ids, first = enc(text), 1
    else:
        for key in ("prompt", "response"):
            if key not in obj:
                raise UserError(f"{where}: missing field '{key}'")
        prompt, response = _field(obj, "prompt", where), _field(obj, "response", where)
        if chat:
            system = _field(obj, "system", where) if "system" in obj else None
            turns = ([{"role": "system", "content": system}] if system is not None else [])
            prompt = chat_template(turns + [{"role": "user", "content": prompt}], add_generation_prompt=True)
            response = response + IM_END
        p_ids = enc(prompt)
        if not p_ids:
            raise UserError(f"{where}: field 'prompt' is empty (the first response token needs context)")
        ids, first = p_ids + enc(response), len(p_ids)
    if len(ids) <= first:
        raise UserError(f"{where}: nothing to score (field 'text' has fewer than 2 tokens)" if has_text
                        else f"{where}: nothing to score (field 'response' is empty)")
    return Example(obj, ids, first)


@functools.partial(jax.jit, static_argnames=("cfg", "lora_cfg", "real_vocab"))
def token_logprobs(params, input_ids, attention_mask, adapters=None, *, cfg: ModelConfig,
                   lora_cfg=None, real_vocab: int | None = None):
    """log p(ids[t] | ids[<t]) at every t >= 1: [B, S] float32, 0 at t = 0 and on padding.

    input_ids/attention_mask [B, S] with S a multiple of LOGIT_CHUNK; real_vocab masks
    padded vocabulary rows out of the softmax.
    """
    from socialalign_jax.model import forward, lm_logits

    out = forward(params, input_ids, cfg, attention_mask=attention_mask, adapters=adapters,
                  lora_cfg=lora_cfg, compute_logits=False)
    b, s = input_ids.shape
    hidden = out.hidden[:, :-1]                               # [B, S-1, D] predicts ids[:, 1:]
    targets = input_ids[:, 1:]                                # [B, S-1]
    pad = (-hidden.shape[1]) % LOGIT_CHUNK
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = hidden.shape[1] // LOGIT_CHUNK
    h_chunks = hidden.reshape(b, n, LOGIT_CHUNK, -1).swapaxes(0, 1)    # [n, B, c, D]
    t_chunks = targets.reshape(b, n, LOGIT_CHUNK).swapaxes(0, 1)       # [n, B, c]

    def chunk_logprobs(args):
        h, t = args
        logits = lm_logits(params, h, cfg)                     # [B, c, V] float32
        if real_vocab is not None and real_vocab < logits.shape[-1]:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < real_vocab, logits, -jnp.inf)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)      # [B, c]

    lp = jax.lax.map(chunk_logprobs, (h_chunks, t_chunks))     # [n, B, c]
    lp = lp.swapaxes(0, 1).reshape(b, n * LOGIT_CHUNK)[:, : s - 1]
    lp = jnp.where(attention_mask[:, 1:] > 0, lp, 0.0)
    return jnp.pad(lp, ((0, 0), (1, 0)))


def _bucket(n: int) -> int:
    return max(BUCKET, -(-n // BUCKET) * BUCKET)


def score_examples(params, cfg: ModelConfig, examples: Sequence[Example], *, batch_size: int = 8,
                   pad_id: int = 0, real_vocab: int | None = None, adapters=None, lora_cfg=None
                   ) -> Iterator[dict]:
    """Yield each example's record plus token_logprobs, sum_logprob, num_tokens, perplexity (in order)."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        s = _bucket(max(len(e.ids) for e in chunk))
        ids = np.full((batch_size, s), pad_id, np.int32)  # fixed batch: dummy rows keep shapes static
        mask = np.zeros((batch_size, s), np.int32)
        for i, e in enumerate(chunk):
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = 1
        lp = np.asarray(token_logprobs(params, jnp.asarray(ids), jnp.asarray(mask), adapters, cfg=cfg,
                                       lora_cfg=lora_cfg, real_vocab=real_vocab))
        for i, e in enumerate(chunk):
            tok = lp[i, e.first_scored:len(e.ids)].astype(np.float64)
            total = float(tok.sum())
            yield {**e.record, "token_logprobs": [float(x) for x in tok], "sum_logprob": total,
                   "num_tokens": int(tok.size), "perplexity": math.exp(-total / tok.size)}


def encode_file(tokenizer, path: str | os.PathLike, *, chat: bool, vocab_size: int,
                max_length: int | None) -> list[Example]:
    """Read and tokenise every record first, so a bad line fails before any compute."""
    examples = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}: line {lineno}"
        e = encode_record(tokenizer, obj, chat=chat, where=where)
        if max_length is not None and len(e.ids) > max_length:
            raise UserError(f"{where}: {len(e.ids)} tokens exceed max_length {max_length} "
                            "(--max_length, default max_position_embeddings; records are never truncated)")
        bad = [t for t in e.ids if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"{where}: token id {bad[0]} is outside the model vocabulary ({vocab_size}); "
                            "tokenizer and checkpoint do not match")
        examples.append(e)
    if not examples:
        raise UserError(f"{path}: no records")
    return examples


def load_adapters_for_scoring(path: str, cfg: ModelConfig) -> tuple[Any, Any]:
    """(adapters, lora_cfg) from socialalign_jax.adapter_io, once that module exists."""
    try:
        from socialalign_jax.adapter_io import load_adapters
    except ImportError:
        raise UserError(f"{path}: --adapters is not supported yet (socialalign_jax.adapter_io is missing)") from None
    out = load_adapters(path, cfg)
    return out if isinstance(out, tuple) else (out, None)
