"""Autoregressive sampling with the model's KV cache, as one jitted function.

Prefill and the whole decode loop run inside one `jit` (a `lax.while_loop`), so no token
makes a host round trip and the loop exits as soon as every row has emitted a stop token.
Params and adapters are arguments of the jitted function (never closed over), so one
compilation serves every checkpoint of the same shapes.

Prompts are LEFT-padded: every row's last prompt token sits at column P-1, so the first new
token of every row is read from the same column and new tokens are appended in lockstep.
Positions come from the mask (real tokens count from 0), so `spans` are absolute positions in
the unpadded prompt and routing matches a full forward over the unpadded sequence.

K samples per prompt (`samples=K`) branch from one prefill: the prompts' cache becomes the
shared block of the K rows' cache (`decoder.branch_cache`), so K posts cost one prompt pass and
each decode step reads a prompt's keys once for its K rows.

Logit processing follows Hugging Face's order: repetition penalty, then temperature, top-k
and top-p. Greedy mode applies the repetition penalty too (as HF does) and then argmax.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from socialalign_jax.model import backend, decoder
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig

_NEG_INF = -jnp.inf

# Qwen2 ChatML: <|im_end|> ends an assistant turn, <|endoftext|> ends a document (and pads).
QWEN_IM_END, QWEN_ENDOFTEXT = 151645, 151643

# The paper's generation length (SPEC section 1): its presets (configs/weibo.py:7b) and a
# Predictor that is given no run config generate this many tokens at most.
PAPER_MAX_NEW_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings; the processing defaults are the paper's (SPEC section 1).

    Also a run's `sample` config section (runs/run_config.SampleSection), so each default here is
    the run's too: max_new_tokens is the quickstart's short posts (the paper's generation length
    is PAPER_MAX_NEW_TOKENS). Fields marked `run_config: False` are set by the code that
    generates (the tokenizer's stop tokens and pad id), never by a config file.

    Hashable, so it is a static argument of the jitted `generate`. `pad_id` fills the output
    after a row has stopped; stop tokens outside the vocabulary are simply never emitted.
    `seed` is for callers that build the PRNG key (`generate` itself takes the key).
    """
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.9
    repetition_penalty: float = 1.2
    max_new_tokens: int = 64
    greedy: bool = False
    stop_tokens: tuple[int, ...] = dataclasses.field(default=(QWEN_IM_END, QWEN_ENDOFTEXT),
                                                     metadata={"run_config": False})
    pad_id: int = dataclasses.field(default=QWEN_ENDOFTEXT, metadata={"run_config": False})
    seed: int = 0
    # decode steps: 'scan' | 'unrolled' | 'auto' (unrolled when targeting CPUs); the backend's, not a run setting
    layer_loop: str = dataclasses.field(default="auto", metadata={"run_config": False})

    def __post_init__(self):
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature} (use greedy=True)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.layer_loop not in ("auto", "scan", "unrolled"):
            raise ValueError(f"layer_loop must be 'auto', 'scan' or 'unrolled', got {self.layer_loop!r}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def replace(self, **kw) -> "SamplingConfig":
        return dataclasses.replace(self, **kw)


class GenerateOutput(NamedTuple):
    tokens: Any  # [B*K, max_new] int32; pad_id after a row's stop token (the stop token itself is kept)
    lengths: Any  # [B*K] int32: tokens up to and including the first stop token (max_new if none)
    last_hidden: Any  # [B, D]: final-norm hidden state at the last prompt token (sentiment head input), per prompt
    sentiment: Any = None  # [B, C] float32: the sentiment head's logits there, when the adapters have a head


# ------------------------------------------------------------------ logit processors
# All take logits [B, V] (any float dtype) and return [B, V] float32; removed tokens are -inf.


def apply_repetition_penalty(logits, seen_mask, penalty: float):
    """CTRL / HF penalty on tokens already seen (prompt or generated): positive logits are
    divided by `penalty`, the others multiplied, so a seen token always becomes less likely."""
    logits = logits.astype(jnp.float32)
    if penalty == 1.0:
        return logits
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen_mask, penalised, logits)


def apply_temperature(logits, temperature: float):
    return logits.astype(jnp.float32) / temperature


def top_k_filter(logits, k: int):
    """Keep the k largest logits of each row (ties with the k-th are kept, as in HF); k=0 is off."""
    logits = logits.astype(jnp.float32)
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [B, 1]
    return jnp.where(logits < kth, _NEG_INF, logits)


def top_p_filter(logits, p: float):
    """Nucleus filter: keep the smallest set of most probable tokens whose mass reaches p.

    A token is kept when the mass of the tokens ranked strictly above it is < p, so the token
    that crosses p is kept and at least one token always survives.
    """
    logits = logits.astype(jnp.float32)
    if p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)  # [B, V] descending (stable)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumsum
    keep_sorted = mass_above < p
    inverse = jnp.argsort(order, axis=-1)
    keep = jnp.take_along_axis(keep_sorted, inverse, axis=-1)
    return jnp.where(keep, logits, _NEG_INF)


def process_logits(logits, seen_mask, scfg: SamplingConfig):
    """The full processing chain over the whole vocabulary: [B, V] -> [B, V] float32."""
    x = apply_repetition_penalty(logits, seen_mask, scfg.repetition_penalty)
    if scfg.greedy:
        return x
    x = apply_temperature(x, scfg.temperature)
    x = top_k_filter(x, scfg.top_k)
    return top_p_filter(x, scfg.top_p)


def candidates(logits, seen_mask, scfg: SamplingConfig):
    """Sampling candidates without sorting the vocabulary: (cand_logits [B, C], cand_ids [B, C]).

    With top_k > 0 only the k best tokens can survive, so top-p runs on those k (the softmax
    over them equals the softmax of the top-k-filtered vocabulary). This is `process_logits`
    restricted to its support, except that ties with the k-th logit are cut at exactly k.
    """
    x = apply_repetition_penalty(logits, seen_mask, scfg.repetition_penalty)
    x = apply_temperature(x, scfg.temperature)
    v = x.shape[-1]
    if 0 < scfg.top_k < v:
        vals, ids = jax.lax.top_k(x, scfg.top_k)  # [B, k], descending
    else:
        ids = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), x.shape)
        vals = x
    return top_p_filter(vals, scfg.top_p), ids.astype(jnp.int32)


def per_row_keys(rng) -> bool:
    """Whether `rng` is one key per row ([R] typed keys or [R, 2] raw) rather than one key."""
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    return jnp.ndim(rng) == (1 if typed else 2)


def next_token(logits, seen_mask, scfg: SamplingConfig, key):
    """One token per row: logits [B, V] -> [B] int32.

    key: one key (one categorical draw over the batch: a row's noise depends on its place in
    the batch) or one key per row [B] (row b's draw depends on key[b] alone).
    """
    if scfg.greedy:
        return jnp.argmax(process_logits(logits, seen_mask, scfg), axis=-1).astype(jnp.int32)
    cand_logits, cand_ids = candidates(logits, seen_mask, scfg)
    if per_row_keys(key):
        choice = jax.vmap(jax.random.categorical)(key, cand_logits)  # [B]
    else:
        choice = jax.random.categorical(key, cand_logits, axis=-1)  # [B]
    return jnp.take_along_axis(cand_ids, choice[:, None], axis=-1)[:, 0]


def seen_from_prompt(prompt_ids, prompt_mask, vocab_size: int):
    """[B, V] bool: which tokens occur among the real (unpadded) prompt tokens."""
    b = prompt_ids.shape[0]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], prompt_ids.shape)
    ids = jnp.clip(prompt_ids, 0, vocab_size - 1)
    return jnp.zeros((b, vocab_size), bool).at[rows, ids].max(prompt_mask > 0)


# ------------------------------------------------------------------ the decode loop


def use_layer_loop(scfg: SamplingConfig) -> bool:
    """Whether decode steps run the layers as a Python loop. scfg.layer_loop is resolved on the host
    for the devices generation is built for (`backend.resolve_sampling`: the loop on CPUs, the scan
    on accelerators); an 'auto' that reaches here unresolved takes the choice for the default devices."""
    return backend.layer_loop(scfg) == "unrolled"


class Prefill(NamedTuple):
    """What `prefill` returns: the state the decode loop starts from."""
    cache: Any  # the KV cache of the B prompts, room for `extra` more tokens after them
    last_hidden: Any  # [B, D] final-norm hidden state at each prompt's last token (the head's input)
    logits: Any  # [B, V] float32: the next-token logits there
    seen: Any  # [B, V] bool: the tokens of each prompt (shared prefix included), for the repetition penalty
    gate_stats: Any  # gate-stat sums over the B prompts' tokens (a shared prefix counted once per prompt) | None
    sentiment: Any  # [B, C] float32 sentiment logits at each prompt's last token, or None (no adapters or no head)


def prefill(params, adapters, prompt_ids, prompt_mask, cfg: ModelConfig, lora_cfg: LoraConfig | None, spans,
            extra: int, prefix=None) -> Prefill:
    """Run LEFT-padded prompts [B, P] through the model into a fresh KV cache with `extra` free slots.

    spans = (user_end [B], news_end [B]) absolute positions in each whole prompt.

    prefix: None, or (prefix_ids, prefix_mask) [G, P0] left-padded, a head shared by R = B // G
    consecutive prompts (rows g*R .. g*R+R-1 continue prefix g; one user's prompts under R
    wordings); prompt_ids then hold each prompt's continuation (>= 1 real token). The prefix is
    run once per group, its cache repeated R times (`decoder.repeat_cache`) and each continuation
    run from it at its absolute positions, so the B prompts cost G prefixes + B continuations.
    Exact when routing is causal (`LoraConfig.causal_routing`; pooled routing is refused: its
    gates give the user span the news mean, which a prefix has not seen) and every prefix token
    lies in the user span of every prompt of its group (prefix length <= user_end), so it is
    routed alike in all of them.
    """
    b, p = prompt_ids.shape
    prompt_mask = prompt_mask.astype(jnp.int32)
    spans = tuple(jnp.asarray(x, jnp.int32) for x in spans)
    cache_lc = lora_cfg if adapters is not None else None
    seen = seen_from_prompt(prompt_ids, prompt_mask, cfg.vocab_size)  # [B, V]
    head_stats, r = None, 1
    if prefix is None:
        cache = decoder.init_cache(cfg, b, p + extra, cache_lc)
    else:
        pre_ids, pre_mask = prefix[0], prefix[1].astype(jnp.int32)
        g, p0 = pre_ids.shape
        if cache_lc is not None and not cache_lc.causal_routing:
            raise ValueError(f"a shared prefix needs causal routing; {cache_lc.routing!r} routing gives every "
                             "token the news span's mean, which the prefix has not seen")
        if b % g:
            raise ValueError(f"prefix: {g} prefixes do not divide {b} prompts into equal groups")
        r = b // g
        cache = decoder.init_cache(cfg, g, p0 + p + extra, cache_lc)
        head = decoder.forward(params, pre_ids, cfg, attention_mask=pre_mask, adapters=adapters, lora_cfg=lora_cfg,
                               spans=(spans[0][::r], spans[1][::r]), cache=cache, logits_at=None)
        cache = decoder.repeat_cache(head.cache, r, cfg, cache_lc)  # G prefixes -> B rows (row g*R + i)
        seen = seen | jnp.repeat(seen_from_prompt(pre_ids, pre_mask, cfg.vocab_size), r, axis=0)
        head_stats = head.gate_stats
    # Column P-1 is every row's last prompt token: the next-token logits and the sentiment head read it.
    head = adapters is not None and lora_cfg is not None and lora_cfg.num_classes > 0 and "head" in adapters
    out = decoder.forward(params, prompt_ids, cfg, attention_mask=prompt_mask, adapters=adapters,
                          lora_cfg=lora_cfg, spans=spans, cache=cache, logits_at="last",
                          sentiment_at=jnp.full((b,), p, jnp.int32) if head else None)
    stats = out.gate_stats
    if head_stats is not None and stats is not None:
        stats = jax.tree.map(lambda h, c: h * r + c, head_stats, stats)
    # Spans clipped to each prompt: what is generated after it is in neither span, however far the
    # given spans reach (the prompt's own routing is unchanged: its positions are all below the end).
    # So every generated token's gates are those of `pac_lora.decode_gates_fixed`.
    end = out.cache["next_pos"]
    cache = dict(out.cache, user_end=jnp.minimum(out.cache["user_end"], end),
                 news_end=jnp.minimum(out.cache["news_end"], end))
    return Prefill(cache, out.hidden[:, -1], out.logits[:, 0], seen, stats, out.sentiment)


@functools.partial(jax.jit, static_argnames=("cfg", "lora_cfg", "scfg", "samples"))
def generate(params, adapters, prompt_ids, prompt_mask, cfg: ModelConfig, lora_cfg: LoraConfig | None,
             scfg: SamplingConfig, spans, rng, samples: int = 1, prefix=None) -> GenerateOutput:
    """Sample up to scfg.max_new_tokens tokens after LEFT-padded prompts, `samples` (K) per prompt.

    prompt_ids, prompt_mask [B, P] (left padding; every row needs >= 1 real token);
    spans = (user_end [B], news_end [B]) absolute positions in the unpadded prompt; adapters may
    be None (base model). Returns tokens, lengths [B*K, ...] (row b*K + k is sample k of prompt
    b), last_hidden [B, D] and the sentiment head's logits [B, C] (None without a head).

    The K samples of a prompt branch from ONE prefill: the prompts are run once and their cache
    becomes the shared block of a branched cache (`decoder.branch_cache`: each of the B*K rows
    reads its prompt's slots there and decodes into slots of its own; positions, spans and pooled
    routing's stored gate weights repeated), the first logits and the seen-token mask are repeated
    K times. A row's tokens are therefore those of a run on the prompt repeated K times, with a
    K-th of the prefill's work and of the prompt's cache reads per decode step.

    rng (unused when greedy): one PRNG key, drawn from once per step for the whole batch (so a
    row's samples depend on the batch it is in), or one key per output row [B*K] (typed keys, or
    raw [B*K, 2]): row r's step-t draw uses fold_in(rng[r], t) only, so its sample depends on its
    key and its prompt and on nothing else in the batch.

    prefix: None, or a head of the prompts shared between them (`prefill`); prompt_ids then hold
    each row's continuation.
    """
    b = prompt_ids.shape[0]
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    rows = b * samples
    max_new = scfg.max_new_tokens
    per_row = per_row_keys(rng)
    if per_row and rng.shape[0] != rows:
        raise ValueError(f"per-row keys: expected {rows} (prompts {b} x samples {samples}), got {rng.shape[0]}")
    cache_lc = lora_cfg if adapters is not None else None
    pre = prefill(params, adapters, prompt_ids, prompt_mask, cfg, lora_cfg, spans, 0, prefix)
    # Branch: B prompts -> B*K rows (row b*K + k). The prompts' cache becomes a block every row of
    # its prompt reads (stored and read once per prompt); each row decodes into its own max_new slots.
    cache = decoder.branch_cache(pre.cache, samples, max_new, cfg, cache_lc)
    logits = jnp.repeat(pre.logits, samples, axis=0)  # [B*K, V]
    seen = jnp.repeat(pre.seen, samples, axis=0)
    stops = jnp.asarray(scfg.stop_tokens or (-1,), jnp.int32)

    # Decode steps on the CPU run the layers as a Python loop over weights prepared once here
    # (`decoder.decode_form`: per layer, since a scan would copy every layer's weights out of the
    # stack for every generated token; the adapters merged in where a generated token's gates are
    # fixed; kernels transposed for the weight-major product), and the cache's k/v per layer too.
    unrolled = use_layer_loop(scfg)
    step_params, step_adapters, step_lc = params, adapters, lora_cfg
    if unrolled:
        step_params, step_adapters, step_lc = decoder.decode_form(params, adapters, lora_cfg)
        cache = decoder.unstack_cache(cache)
    state = dict(step=jnp.zeros((), jnp.int32), cache=cache, logits=logits, seen=seen,
                 tokens=jnp.full((rows, max_new), scfg.pad_id, jnp.int32),
                 done=jnp.zeros((rows,), bool), lengths=jnp.zeros((rows,), jnp.int32))

    def step_keys(step):
        if per_row:
            return jax.vmap(lambda k: jax.random.fold_in(k, step))(rng)  # [B*K]
        return jax.random.fold_in(rng, step)

    def cond(s):
        return (s["step"] < max_new) & ~jnp.all(s["done"])

    def body(s):
        tok = next_token(s["logits"], s["seen"], scfg, step_keys(s["step"]))  # [B*K]
        live = ~s["done"]
        tokens = jax.lax.dynamic_update_slice(
            s["tokens"], jnp.where(live, tok, scfg.pad_id)[:, None], (0, s["step"]))
        done = s["done"] | jnp.isin(tok, stops)
        seen = s["seen"].at[jnp.arange(rows), tok].set(True)
        # Finished rows keep decoding (lockstep) but their output is padding.
        step_out = decoder.forward(step_params, tok[:, None], cfg, adapters=step_adapters, lora_cfg=step_lc,
                                   cache=s["cache"], logits_at="last")
        return dict(step=s["step"] + 1, cache=step_out.cache, logits=step_out.logits[:, 0], seen=seen,
                    tokens=tokens, done=done, lengths=s["lengths"] + live.astype(jnp.int32))

    final = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(final["tokens"], final["lengths"], pre.last_hidden, pre.sentiment)


def left_pad(rows, pad_id: int, length: int | None = None, *, allow_empty: bool = False):
    """List of 1-D int sequences -> (ids [B, P], mask [B, P]) numpy, LEFT-padded (host side).

    allow_empty: for shared prefixes (`generate(prefix=...)`), which may be empty; a prompt may not.
    """
    import numpy as np

    n = max(len(r) for r in rows)
    length = n if length is None else length
    if n > length:
        raise ValueError(f"prompt of {n} tokens does not fit the padded length {length}")
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        if len(r) == 0:
            if allow_empty:
                continue
            raise ValueError(f"prompt {i} is empty; generation needs at least one prompt token")
        ids[i, length - len(r):] = np.asarray(r, np.int32)
        mask[i, length - len(r):] = 1
    return ids, mask
