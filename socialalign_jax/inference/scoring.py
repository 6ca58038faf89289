"""Per-token log-likelihood of texts or responses under a checkpoint (perplexity scoring).

Input records are JSON lines, either {"text": ...} (every token after the first is scored)
or {"prompt": ..., "response": ...} (only the response tokens are scored; with chat=True the
prompt becomes a ChatML user turn plus the generation prompt, after the record's "system"
turn or the default system turn given by the caller, and the response is closed with
<|im_end|>, exactly as the SFT data renders it).

PAC-LoRA adapters whose gates read the user and news spans route every token by them, as in
training: the spans are the tokens holding two character offsets of the rendered text,
either given by the record ("user_end_char", "news_end_char": offsets into its "prompt" or
"text") or found from the SocialAlign markers exactly as the dataset builder finds them
(prompt.marker_offsets, prompt.encode_with_spans). A record with neither is an error for
such adapters unless the caller picks a routing mode that reads no spans.

Sequences are right-padded into fixed [batch_size, bucket] shapes so one jitted function
compiles once per length bucket. Log-probabilities are computed from the final hidden
states in sequence chunks, so the [B, S, V] logits tensor (V = 152k for Qwen2.5) never
exists in full.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from socialalign_jax.core.buckets import bucket
from socialalign_jax.core.errors import UserError
from socialalign_jax.core.jsonl import read_jsonl
from socialalign_jax.data.prompt import NEWS_MARKER, USER_MARKER, encode_with_spans, marker_offsets
from socialalign_jax.model import backend
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.decoder import forward, lm_logits
from socialalign_jax.model.nll import token_nll
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.weights.adapters import input_dependent_gates, load_adapters
from socialalign_jax.weights.tokenizer import IM_END, chat_template

BUCKET = 64        # sequence lengths are padded up to a multiple of this (few recompiles)
LOGIT_CHUNK = 64   # positions per log-softmax chunk (bounds the [B, chunk, V] logits)


SPAN_FIELDS = ("user_end_char", "news_end_char")


@dataclasses.dataclass(frozen=True)
class Example:
    """One record, tokenised: ids [n], the index of the first scored token, and its spans."""
    record: dict
    ids: list[int]
    first_scored: int  # tokens ids[first_scored:] are scored, each given everything before it
    spans: tuple[int, int] | None = None  # (user_end, news_end) token indices; None: the text has none


def routes_by_spans(lc: LoraConfig | None) -> bool:
    """Whether these adapters' gates read the user/news spans (a single expert's softmax is constant)."""

    return lc is not None and bool(input_dependent_gates(lc))


def _field(obj: dict, key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _char_spans(obj: dict, scored_text: str, where: str) -> tuple[int, int] | None:
    """Explicit (user_end_char, news_end_char) of a record, checked against its text; None if absent."""
    given = [k for k in SPAN_FIELDS if k in obj]
    if not given:
        return None
    if len(given) == 1:
        raise UserError(f"{where}: field '{given[0]}' needs field '{(set(SPAN_FIELDS) - set(given)).pop()}' too")
    u, n = obj["user_end_char"], obj["news_end_char"]
    for key, v in zip(SPAN_FIELDS, (u, n)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise UserError(f"{where}: field '{key}' must be an integer character offset, got {type(v).__name__}")
    if not 0 <= u <= n < len(scored_text):
        raise UserError(f"{where}: fields 'user_end_char' = {u}, 'news_end_char' = {n}: need "
                        f"0 <= user_end_char <= news_end_char < {len(scored_text)} (the length of the text)")
    return u, n


def encode_record(tokenizer, obj: dict, *, chat: bool, where: str, system: str | None = None) -> Example:
    """Tokenise one input record; `where` ('file: line N') prefixes every error.

    With chat, the record's own "system" wins over `system` (the default system turn, e.g.
    the SocialAlign one). Spans: the record's character offsets if given, else the markers.
    """
    has_text, has_pair = "text" in obj, ("prompt" in obj or "response" in obj)
    if has_text == has_pair:
        raise UserError(f"{where}: expected either field 'text' or fields 'prompt' and 'response'"
                        + (" (not both)" if has_text else ""))
    enc = functools.partial(tokenizer.encode, add_special_tokens=False)
    if has_text:
        text = _field(obj, "text", where)
        if chat:
            raise UserError(f"{where}: --chat needs 'prompt'/'response' records, got field 'text'")
        content, rendered, response = text, text, None
    else:
        for key in ("prompt", "response"):
            if key not in obj:
                raise UserError(f"{where}: missing field '{key}'")
        content, response = _field(obj, "prompt", where), _field(obj, "response", where)
        rendered = content
        if chat:
            system = _field(obj, "system", where) if "system" in obj else system
            turns = ([{"role": "system", "content": system}] if system is not None else [])
            rendered = chat_template(turns + [{"role": "user", "content": content}], add_generation_prompt=True)
            response = response + IM_END
    # Character offsets in `content` (explicit, or the markers' as the dataset builder finds them),
    # then tokens of the whole rendered prompt (the text record: of the whole text).
    chars = _char_spans(obj, content, where)
    if chars is None:
        chars = marker_offsets(content)
    spans = None
    if chars is not None:
        base = rendered.rindex(content + IM_END) if chat else 0  # the user turn: the last one
        p_ids, u, n = encode_with_spans(tokenizer, rendered, base + chars[0], base + chars[1])
        spans = (u, n)
    else:
        p_ids = enc(rendered)
    if has_text:
        ids, first = p_ids, 1
    else:
        if not p_ids:
            raise UserError(f"{where}: field 'prompt' is empty (the first response token needs context)")
        ids, first = p_ids + enc(response), len(p_ids)
    if len(ids) <= first:
        raise UserError(f"{where}: nothing to score (field 'text' has fewer than 2 tokens)" if has_text
                        else f"{where}: nothing to score (field 'response' is empty)")
    return Example(obj, ids, first, spans)


@functools.partial(jax.jit, static_argnames=("cfg", "lora_cfg", "real_vocab"))
def token_logprobs(params, input_ids, attention_mask, adapters=None, spans=None, *, cfg: ModelConfig,
                   lora_cfg=None, real_vocab: int | None = None):
    """log p(ids[t] | ids[<t]) at every t >= 1: [B, S] float32, 0 at t = 0 and on padding.

    input_ids/attention_mask [B, S] with S a multiple of LOGIT_CHUNK; spans = (user_end [B],
    news_end [B]) token indices for PAC-LoRA routing (None: every token is 'other');
    real_vocab masks padded vocabulary rows out of the softmax.
    """

    out = forward(params, input_ids, cfg, attention_mask=attention_mask, adapters=adapters,
                  lora_cfg=lora_cfg, spans=spans, logits_at=None)
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
        return -token_nll(logits, t)                   # [B, c]

    lp = jax.lax.map(chunk_logprobs, (h_chunks, t_chunks))     # [n, B, c]
    lp = lp.swapaxes(0, 1).reshape(b, n * LOGIT_CHUNK)[:, : s - 1]
    lp = jnp.where(attention_mask[:, 1:] > 0, lp, 0.0)
    return jnp.pad(lp, ((0, 0), (1, 0)))


def score_examples(params, cfg: ModelConfig, examples: Sequence[Example], *, batch_size: int = 8,
                   pad_id: int = 0, real_vocab: int | None = None, adapters=None, lora_cfg=None
                   ) -> Iterator[dict]:
    """Yield each example's record plus token_logprobs, sum_logprob, num_tokens, perplexity (in order)."""
    # 'auto' backend choices made here, on the host, for the default devices (model/backend.py).
    cfg, lora_cfg = backend.resolve_for_platform(cfg, lora_cfg)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        s = bucket(max(len(e.ids) for e in chunk), multiple=BUCKET)
        ids = np.full((batch_size, s), pad_id, np.int32)  # fixed batch: dummy rows keep shapes static
        mask = np.zeros((batch_size, s), np.int32)
        spans = np.zeros((2, batch_size), np.int32)  # (user_end, news_end); 0, 0 = no user/news span
        for i, e in enumerate(chunk):
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = 1
            if e.spans is not None:
                spans[:, i] = e.spans
        lp = np.asarray(token_logprobs(params, jnp.asarray(ids), jnp.asarray(mask), adapters,
                                       (jnp.asarray(spans[0]), jnp.asarray(spans[1])), cfg=cfg,
                                       lora_cfg=lora_cfg, real_vocab=real_vocab))
        for i, e in enumerate(chunk):
            tok = lp[i, e.first_scored:len(e.ids)].astype(np.float64)
            total = float(tok.sum())
            yield {**e.record, "token_logprobs": [float(x) for x in tok], "sum_logprob": total,
                   "num_tokens": int(tok.size), "perplexity": math.exp(-total / tok.size)}


def encode_file(tokenizer, path: str | os.PathLike, *, chat: bool, vocab_size: int,
                max_length: int | None, system: str | None = None,
                need_spans: str | None = None) -> list[Example]:
    """Read and tokenise every record first, so a bad line fails before any compute.

    need_spans: the reason spans are required (the adapters route by them), or None.
    """
    examples = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}: line {lineno}"
        e = encode_record(tokenizer, obj, chat=chat, where=where, system=system)
        if need_spans and e.spans is None:
            raise UserError(f"{where}: {need_spans}, but the prompt has neither the markers {USER_MARKER!r} and "
                            f"{NEWS_MARKER!r} (in that order) nor fields 'user_end_char'/'news_end_char'; "
                            "pass --routing uniform to score without spans")
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


def load_adapters_for_scoring(path: str, cfg: ModelConfig, routing: str | None = None) -> tuple[Any, LoraConfig]:
    """(adapters, lora_cfg) in any layout weights.adapters reads; `routing` overrides the file's routing mode."""

    adapters, lc = load_adapters(path, cfg)
    if routing is not None and routing != lc.routing:
        lc = dataclasses.replace(lc, routing=routing)
    return adapters, lc


def span_requirement(lc: LoraConfig | None, adapters_path: str | None) -> str | None:
    """Why records need spans under these adapters (for the one-line error), or None."""
    if not routes_by_spans(lc):
        return None
    return f"adapters {adapters_path} route by the user/news spans (routing {lc.routing!r})"
