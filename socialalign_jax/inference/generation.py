"""Batch generation over a dataset split: the predictions JSONL that launch/evaluate.py scores.

Also the one batched sampling API, `sample_rows` (prompt rows in; K posts per row, their
lengths and the sentiment head's probabilities out), which the Predictor uses too.

Per batch, two jitted passes:

1. `sample_rows` (`sampling.generate` on the LEFT-padded prompts): the sampled post and, from
   the same prefill, the sentiment head's probabilities at the last prompt token (so the head
   and the generated text describe one and the same forward pass);
2. a teacher-forced forward over prompt + real response (right padding, as in training): the
   log-probability of the real response (for perplexity) and the PAC-LoRA gate statistics.

Batch and length are bucketed (fixed batch, lengths rounded up) so a split compiles a few
times, not once per batch. Every example is validated first: a bad one stops the run with
one line naming the source, the example index and the field; nothing is skipped or truncated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from socialalign_jax.core.atomic_io import write_json, write_jsonl  # noqa: F401 (part of this module's API)
from socialalign_jax.core.buckets import bucket
from socialalign_jax.core.errors import UserError
from socialalign_jax.core.labels import DEFAULT_LABELS
from socialalign_jax.data import setup
from socialalign_jax.data.pipeline import Subset
from socialalign_jax.model import backend, decoder, pac_lora, sampling
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.nll import response_ce_chunked
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.model.sampling import SamplingConfig
from socialalign_jax.runs.restore import load_base, restore_adapters
from socialalign_jax.runs.run_config import RunConfig

LENGTH_BUCKET = 32  # prompt and sequence lengths are rounded up to a multiple of this


class GenerationError(UserError, ValueError):
    """A malformed example handed to generation (message names source, index and field)."""


# ----------------------------------------------------------------------------- validation


def _text(x) -> str:
    if isinstance(x, (bytes, np.bytes_)):
        return bytes(x).decode("utf-8")
    if isinstance(x, np.ndarray) and x.ndim == 0:
        return _text(x.item())
    return str(x)


def check_example(ex: Mapping[str, Any], where: str, vocab_size: int) -> dict:
    """Validate one example and return it as plain numpy/python fields."""
    def bad(field, what):
        return GenerationError(f"{where}: field '{field}': {what}")

    for field in ("input_ids", "prompt_len", "user_end", "news_end"):
        if field not in ex:
            raise bad(field, "missing")
    ids = np.asarray(ex["input_ids"])
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise bad("input_ids", f"expected a non-empty 1-D integer array, got shape {list(ids.shape)} {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise bad("input_ids", f"token ids must be in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    n = ids.size
    p, ue, ne = (int(np.asarray(ex[k])) for k in ("prompt_len", "user_end", "news_end"))
    if not 1 <= p <= n:
        raise bad("prompt_len", f"{p} is outside [1, {n}] (the example has {n} tokens)")
    if not 0 <= ue <= ne <= p:
        raise bad("user_end" if ue > ne or ue < 0 else "news_end",
                  f"spans must satisfy 0 <= user_end ({ue}) <= news_end ({ne}) <= prompt_len ({p})")
    # Without a loss_mask, every token after the prompt is the response.
    loss_mask = np.asarray(ex["loss_mask"]) if "loss_mask" in ex else (np.arange(n) >= p).astype(np.int32)
    if loss_mask.shape != (n,):
        raise bad("loss_mask", f"shape {list(loss_mask.shape)} differs from input_ids [{n}]")
    if loss_mask[:p].any():
        raise bad("loss_mask", f"marks prompt tokens (before prompt_len {p})")
    return {"input_ids": ids.astype(np.int32), "loss_mask": loss_mask.astype(np.int32), "prompt_len": p,
            "user_end": ue, "news_end": ne}


# ----------------------------------------------------------------------------- jitted passes


@functools.partial(jax.jit, static_argnames=("cfg", "lora_cfg", "scfg", "samples"))
def _sample_batch(params, adapters, prompt_ids, prompt_mask, user_end, news_end, key, row_ids, prefix=None, *,
                  cfg: ModelConfig, lora_cfg: LoraConfig | None, scfg: SamplingConfig, samples: int):
    """`sample_rows`' jitted call: K samples per prompt from one prefill each, the head read off that prefill.

    prompt_ids, prompt_mask [B, P] left-padded; user_end, news_end, row_ids [B]; key one PRNG key;
    prefix None or (ids, mask) [G, P0], the head shared by each run of B // G rows (`sampling.generate`).
    Sample k of the prompt with id r draws from fold_in(fold_in(key, r), k) (`sample_keys`).
    Returns tokens [B, K, T], lengths [B, K], probs [B, C] | None.
    """
    b = prompt_ids.shape[0]
    out = sampling.generate(params, adapters, prompt_ids, prompt_mask, cfg, lora_cfg, scfg,
                            (user_end, news_end), sample_keys(key, row_ids, samples), samples=samples, prefix=prefix)
    probs = None if out.sentiment is None else jax.nn.softmax(out.sentiment, axis=-1)
    return out.tokens.reshape(b, samples, -1), out.lengths.reshape(b, samples), probs


def sample_keys(key, row_ids, samples: int):
    """The PRNG stream of each sample: row_ids [B] -> keys [B*K] (row b*K + k = sample k of prompt b).

    Sample k of the prompt with id r draws from fold_in(fold_in(key, r), k), so what a sample is
    depends on the seed, its row's id and k, never on which other rows share its batch, how the
    rows were sorted or padded, or the batch size.
    """
    def per_row(r):
        rk = jax.random.fold_in(key, r)
        return jax.vmap(lambda k: jax.random.fold_in(rk, k))(jnp.arange(samples, dtype=jnp.uint32))

    keys = jax.vmap(per_row)(jnp.asarray(row_ids, jnp.uint32))  # [B, K, ...]
    return keys.reshape((-1,) + keys.shape[2:])


# ----------------------------------------------------------------------------- the batched sampling API


class SampledRows(NamedTuple):
    """What `sample_rows` returns, indexed like the rows it was given."""
    texts: list[list[str]] | None  # [N][K] decoded samples (stop token dropped) when a tokenizer was given
    tokens: np.ndarray  # [N, K, max_new] int32; pad_id after a sample's stop token (which is kept)
    lengths: np.ndarray  # [N, K] int32: generated tokens, up to and including the first stop token
    probs: np.ndarray | None  # [N, C] float32: the head at the last prompt token (None without a head)
    # (prompts, samples, shared prefix length (0: none), prompt length) of each jitted call
    shapes: tuple[tuple[int, int, int, int], ...]


def sample_rows(params, adapters, model_cfg: ModelConfig, lora_cfg: LoraConfig | None, scfg: SamplingConfig,
                rows: Sequence[Mapping[str, Any]], *, samples: int = 1, seed: int, row_ids: Sequence[int] | None = None,
                batch_size: int, tokenizer=None, fixed_batch: bool = False, group_size: int = 1,
                on_batch=None) -> SampledRows:
    """Sample `samples` (K) continuations of each prompt row and read the sentiment head: the one batched
    sampling API (launch/generate.py's `generate_predictions` and the Predictor both call it).

    rows: mappings with input_ids (at least the prompt), prompt_len, user_end, news_end (absolute
    token positions, as the prompt builder makes them). The K samples of a row branch from one
    prefill (`sampling.generate(samples=K)`), which the head is read off too, so the head and the
    posts describe the same forward pass and K costs one prompt pass, not K.

    group_size R > 1: rows[g*R:(g+1)*R] are prompts that may share their head (one user under R
    wordings of the news). Their longest common token prefix inside every one's user span
    (`shared_head`), or as much of it as `plan_prefix` finds cheapest for the call, is prefilled
    once and each prompt continues from it (`sampling.generate(prefix=...)`). Only with
    causal routing (`LoraConfig.causal_routing`): pooled gates give the user span the news mean,
    so pooled rows are prefilled whole. Sharing changes no result beyond rounding.

    Randomness: sample k of row i draws from fold_in(fold_in(PRNGKey(seed), row_ids[i]), k)
    (row_ids default to 0..N-1), so a sample is fixed by (seed, row id, k) whatever the batching.

    Batching: groups of rows are sorted by prompt length and run max(1, batch_size // R) groups
    (so about batch_size prompts; more when R > batch_size) per jitted call. batch_size counts
    prompts, as Hugging Face's `generate(num_return_sequences=K)` does: a call decodes K rows per
    prompt, which share the prompt's cache (`sampling.generate`) and add only their own slots
    (max_new_tokens each), so more rows per decode step cost little memory and, on every
    backend, raise the step's arithmetic intensity.
    Shapes are bucketed so a process compiles a few programs: prompt and prefix lengths up to a
    multiple of LENGTH_BUCKET, groups per call up to a power of two (exactly that many with
    fixed_batch), filler rows discarded. on_batch(n) is called after each call with the number of
    samples it made.
    """
    n_rows = len(rows)
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if group_size < 1 or n_rows % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {n_rows} rows into whole groups")
    row_ids = np.arange(n_rows) if row_ids is None else np.asarray(row_ids, np.int64)
    if row_ids.shape != (n_rows,):
        raise ValueError(f"row_ids: {row_ids.shape[0] if row_ids.ndim else 0} ids for {n_rows} rows")
    if n_rows and not 0 <= row_ids.min() <= row_ids.max() < 2**32:
        raise ValueError(f"row_ids must be in [0, 2**32) (they seed the PRNG streams), got [{row_ids.min()}, "
                         f"{row_ids.max()}]")
    # 'auto' backend choices made here, on the host, for the default devices (model/backend.py).
    model_cfg, lora_cfg = backend.resolve_for_platform(model_cfg, lora_cfg)
    scfg = backend.resolve_sampling(scfg)
    samples, pad_id = int(samples), int(scfg.pad_id)
    causal = adapters is None or lora_cfg is None or "layers" not in adapters or lora_cfg.causal_routing
    r = group_size if causal else 1
    key = jax.random.PRNGKey(int(seed))
    tokens = np.full((n_rows, samples, scfg.max_new_tokens), pad_id, np.int32)
    lengths = np.zeros((n_rows, samples), np.int32)
    probs = None
    shapes = []
    prompt = [np.asarray(row["input_ids"])[:int(row["prompt_len"])] for row in rows]
    groups = [list(range(g * r, (g + 1) * r)) for g in range(n_rows // r)]
    per_call = max(1, batch_size // r)
    order = sorted(range(len(groups)), key=lambda g: (max(len(prompt[i]) for i in groups[g]), g))
    for start in range(0, len(groups), per_call):
        chunk = order[start:start + per_call]
        n = per_call if fixed_batch else min(per_call, bucket(len(chunk), pow2=True))
        call = [groups[g] for g in chunk + [chunk[0]] * (n - len(chunk))]  # filler groups keep the shape; discarded
        heads = [shared_head(prompt, rows, grp) if r > 1 else 0 for grp in call]
        flat = [i for grp in call for i in grp]
        p0, p_len, shared = plan_prefix(heads, [[len(prompt[i]) for i in grp] for grp in call])  # tokens per group
        prefix = None
        if p0 > 0:  # else the call runs whole prompts: the program of unshared rows
            prefix = sampling.left_pad([prompt[grp[0]][:c] for grp, c in zip(call, shared)], pad_id, p0,
                                       allow_empty=True)
        rest = [prompt[i][c:] for i, c in zip(flat, (c for c in shared for _ in range(r)))]
        ids, mask = sampling.left_pad(rest, pad_id, p_len)
        ue = np.array([int(rows[i]["user_end"]) for i in flat], np.int32)
        ne = np.array([int(rows[i]["news_end"]) for i in flat], np.int32)
        t, ln, pr = jax.device_get(_sample_batch(
            params, adapters, ids, mask, ue, ne, key, row_ids[flat].astype(np.uint32), prefix,
            cfg=model_cfg, lora_cfg=lora_cfg, scfg=scfg, samples=samples))
        shapes.append((len(flat), samples, p0, p_len))
        m = len(chunk) * r
        real = flat[:m]
        tokens[real], lengths[real] = t[:m], ln[:m]
        if pr is not None:
            if probs is None:
                probs = np.zeros((n_rows, pr.shape[-1]), np.float32)
            probs[real] = pr[:m]
        if on_batch is not None:
            on_batch(m * samples)
    texts = None
    if tokenizer is not None:
        texts = [[_decode(tokenizer, tokens[i, k], int(lengths[i, k]), scfg.stop_tokens) for k in range(samples)]
                 for i in range(n_rows)]
    return SampledRows(texts, tokens, lengths, probs, tuple(shapes))


def plan_prefix(heads: Sequence[int], lengths: Sequence[Sequence[int]],
                multiple: int = LENGTH_BUCKET) -> tuple[int, int, list[int]]:
    """How one call of G groups (R prompts each) splits its prompts into a shared prefix and continuations.

    heads[g]: the leading tokens group g's prompts have in common (`shared_head`); lengths[g]: its
    prompts' lengths. Returns (p0, p_len, cut per group): group g shares its first cut[g] =
    min(heads[g], p0) tokens, prefilled once into p0 left-padded slots (p0 = 0: no prefix, whole
    prompts), and each prompt prefills the rest into p_len slots; both are multiples of `multiple`.

    p0 is the multiple of `multiple` (or 0) up to the bucket of the longest head that prefills the
    fewest slots, G * p0 + G * R * p_len (the linear maps, ~85% of a prefill, cost per slot); ties
    go to the larger p0. Sharing each group's whole head (p0 = bucket(max(heads))) is not always
    that: the prefix pads every group to the longest head rounded up, and a cut on a multiple of
    `multiple` below the shortest head can leave the continuations in the same bucket while the
    prefix loses its padding (the authors' template at 1024 tokens: heads of 275-295 of 580-600
    tokens, 8 users x 2 wordings, prefill 8 x 320 + 16 x 352 = 8192 slots when sharing each whole
    head, 8 x 256 + 16 x 352 = 7680 when cutting every prompt at 256).
    """
    if len(heads) != len(lengths) or not heads:
        raise ValueError(f"plan_prefix: {len(heads)} heads for {len(lengths)} groups")
    rows = sum(len(x) for x in lengths)
    best = None
    for p0 in range(0, bucket(max(heads), multiple=multiple) + 1, multiple):  # no heads: 0 is cheapest
        cut = [min(h, p0) for h in heads]
        p_len = bucket(max(n - c for c, ns in zip(cut, lengths) for n in ns), multiple=multiple)
        slots = len(heads) * p0 + rows * p_len
        if best is None or slots <= best[0]:
            best = (slots, p0, p_len, cut)
    return best[1], best[2], best[3]


def shared_head(prompt: Sequence[np.ndarray], rows: Sequence[Mapping[str, Any]], group: Sequence[int]) -> int:
    """How many leading tokens a group's prompts can share: their common prefix, cut at the first
    user_end (so every shared token is in every prompt's user span and routed alike) and one token
    short of the shortest prompt (each prompt continues with at least its last token)."""
    first = prompt[group[0]]
    n = min(min(len(prompt[i]) - 1 for i in group), min(int(rows[i]["user_end"]) for i in group))
    for i in group[1:]:
        other = prompt[i]
        diff = np.flatnonzero(first[:n] != other[:n])
        if diff.size:
            n = int(diff[0])
    return max(n, 0)


@functools.partial(jax.jit, static_argnames=("cfg", "lora_cfg"))
def _score_batch(params, adapters, input_ids, attention_mask, loss_mask, user_end, news_end, *,
                 cfg: ModelConfig, lora_cfg: LoraConfig | None):
    """Teacher-forced pass: per-row response NLL sum and token count [B], and gate-stat sums."""
    out = decoder.forward(params, input_ids, cfg, attention_mask=attention_mask, adapters=adapters,
                          lora_cfg=lora_cfg, spans=(user_end, news_end), logits_at=None)
    logits_fn = functools.partial(decoder.lm_logits, params, cfg=cfg)

    def row(h, ids, m):  # one sequence at a time: per-example sums without [B, S, V] logits
        return response_ce_chunked(h[None], logits_fn, ids[None], m[None])

    nll, count = jax.vmap(row)(out.hidden, input_ids, loss_mask)
    return nll, count, out.gate_stats


# ----------------------------------------------------------------------------- host side


def _right_pad(rows: Sequence[np.ndarray], length: int, fill: int) -> np.ndarray:
    out = np.full((len(rows), length), fill, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _decode(tokenizer, tokens: np.ndarray, n: int, stop_tokens: Sequence[int]) -> str:
    ids = [int(t) for t in tokens[:n]]
    if ids and ids[-1] in stop_tokens:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _reference_text(tokenizer, ex: Mapping[str, Any], clean: dict) -> str:
    if "response" in ex:
        return _text(ex["response"])
    resp = clean["input_ids"][clean["loss_mask"] > 0]
    return tokenizer.decode([int(t) for t in resp], skip_special_tokens=True)


class GateAccumulator:
    """Sums of per-segment gate weights over a split; `summary()` is launch/evaluate.py's --gates JSON."""

    def __init__(self):
        self.sums: dict | None = None

    def add(self, stats) -> None:
        if stats is None:
            return
        stats = jax.tree.map(np.asarray, stats)
        self.sums = stats if self.sums is None else jax.tree.map(np.add, self.sums, stats)

    def summary(self) -> dict | None:
        if not self.sums:
            return None
        mean = jax.tree.map(np.asarray, pac_lora.summarize_gate_stats(self.sums))
        modules = [m for m in pac_lora.ALL_TARGETS if m in mean]
        return {"layers": int(mean[modules[0]]["a"].shape[0]), "modules": modules,
                "segments": list(pac_lora.SEGMENTS),
                "gate_a": np.stack([mean[m]["a"] for m in modules], axis=1).tolist(),  # [L, M, 3, Ea]
                "gate_b": np.stack([mean[m]["b"] for m in modules], axis=1).tolist(),  # [L, M, 3, Eb]
                "tokens": np.stack([mean[m]["count"] for m in modules], axis=1).tolist()}  # [L, M, 3]


def generate_predictions(params, adapters, model_cfg: ModelConfig, lora_cfg: LoraConfig | None,
                         scfg: SamplingConfig, examples: Iterable[Mapping[str, Any]], tokenizer, batch_size: int,
                         *, labels: Sequence[str] = DEFAULT_LABELS, source_name: str = "examples",
                         total: int | None = None, progress: bool = True, score_reference: bool = True,
                         gates: GateAccumulator | None = None) -> Iterator[dict]:
    """Yield one prediction dict per example, in input order.

    examples: dicts with input_ids (prompt + response, unpadded), loss_mask, prompt_len, user_end,
    news_end, and optionally label (class id, -1 = none), event, event_id, user, response,
    case_index, target_dist. Example i's post draws from fold_in(fold_in(PRNGKey(scfg.seed), i), 0)
    (`sample_rows`), so a run is reproducible and a post's random stream does not depend on the batch.
    `gates`, when given, accumulates the teacher-forced pass's gate statistics.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # 'auto' backend choices made here, on the host, for the default devices (model/backend.py).
    model_cfg, lora_cfg = backend.resolve_for_platform(model_cfg, lora_cfg)
    scfg = backend.resolve_sampling(scfg)
    pad_id = int(scfg.pad_id)
    labels = list(labels)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="generate", unit="ex", dynamic_ncols=True)

    def run(batch: list[tuple[int, Mapping[str, Any], dict]]) -> list[dict]:
        n_real = len(batch)
        sampled = sample_rows(params, adapters, model_cfg, lora_cfg, scfg, [c for _, _, c in batch], samples=1,
                              seed=int(scfg.seed), row_ids=[index for index, _, _ in batch], batch_size=batch_size,
                              tokenizer=tokenizer, fixed_batch=True)
        nll = count = None
        if score_reference:
            rows = [c for _, _, c in batch] + [batch[0][2]] * (batch_size - n_real)  # fixed batch shape
            ue = np.array([c["user_end"] for c in rows], np.int32)
            ne = np.array([c["news_end"] for c in rows], np.int32)
            s_len = bucket(max(len(c["input_ids"]) for c in rows), multiple=LENGTH_BUCKET)
            full = _right_pad([c["input_ids"] for c in rows], s_len, pad_id)
            att = _right_pad([np.ones(len(c["input_ids"]), np.int32) for c in rows], s_len, 0)
            lm = _right_pad([c["loss_mask"] for c in rows], s_len, 0)
            att[n_real:] = 0  # filler rows: no valid token, so no loss and no gate statistics
            lm[n_real:] = 0
            nll, count, stats = _score_batch(params, adapters, full, att, lm, ue, ne, cfg=model_cfg,
                                             lora_cfg=lora_cfg)
            nll, count = np.asarray(nll), np.asarray(count)
            if gates is not None:
                gates.add(stats)
        out = []
        for r, (index, ex, clean) in enumerate(batch):
            label = int(np.asarray(ex.get("label", -1)))
            event_id = int(np.asarray(ex.get("event_id", -1)))
            case = ex.get("case_index")
            rec = {
                "event": _text(ex.get("event", "")),
                "event_id": event_id,
                "user": _text(ex.get("user", "")),
                "prompt_id": f"{event_id}:{int(np.asarray(case))}" if case is not None else index,
                "generated": sampled.texts[r][0],
                "reference": _reference_text(tokenizer, ex, clean),
                "label": labels[label] if 0 <= label < len(labels) else None,
                "probs": None if sampled.probs is None else [float(x) for x in sampled.probs[r]],
                "labels": labels,
                "ref_logprob_sum": None, "ref_num_tokens": None,
                "generated_tokens": int(sampled.lengths[r, 0]),
            }
            if nll is not None and count[r] > 0:
                rec["ref_logprob_sum"] = -float(nll[r])
                rec["ref_num_tokens"] = int(round(float(count[r])))
            if "target_dist" in ex:
                td = np.asarray(ex["target_dist"], np.float64)
                if td.sum() > 0:  # events without labelled responses carry zeros: no target
                    rec["target_dist"] = [float(x) for x in td]
            out.append(rec)
        return out

    batch: list = []
    try:
        for index, ex in enumerate(examples):
            clean = check_example(ex, f"{source_name}: example {index}", model_cfg.vocab_size)
            batch.append((index, ex, clean))
            if len(batch) == batch_size:
                yield from run(batch)
                if bar is not None:
                    bar.update(len(batch))
                batch = []
        if batch:
            yield from run(batch)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()


# ----------------------------------------------------------------------------- the CLI job


def stop_tokens_for(tokenizer) -> tuple[int, ...]:
    """The ids that end a reply: the tokenizer's eos plus ChatML's <|im_end|>/<|endoftext|> when known."""
    ids = {tokenizer.eos_token_id}
    unk = getattr(tokenizer, "unk_token_id", None)
    for name in ("<|im_end|>", "<|endoftext|>"):
        t = tokenizer.convert_tokens_to_ids(name)
        if t is not None and t != unk:
            ids.add(t)
    return tuple(sorted(int(t) for t in ids if t is not None))


def sampling_config(cfg: RunConfig, tokenizer, pad_id: int, *, greedy: bool | None = None) -> SamplingConfig:
    """The config's `sample` section with what the tokenizer decides (its stop tokens and pad id)
    filled in; the --greedy flag overrides sample.greedy. A plain SamplingConfig (the jitted
    `generate`'s static argument), without the section's batch size."""
    settings = {f.name: getattr(cfg.sample, f.name) for f in dataclasses.fields(SamplingConfig)}
    return SamplingConfig(**{**settings, "stop_tokens": stop_tokens_for(tokenizer), "pad_id": int(pad_id),
                             "greedy": cfg.sample.greedy if greedy is None else greedy})


def run_generate(cfg: RunConfig, workdir: str, *, split: str = "test", out: str, max_examples: int = 0,
                 greedy: bool | None = None, gates_out: str | None = None, step: int | None = None,
                 progress: bool = True) -> int:
    """launch/generate.py: restore a run, generate for one split, write the predictions JSONL."""

    base = load_base(cfg)
    data = setup.prepare(cfg, base.tokenizer, workdir, build_if_missing=False)
    if split not in data.dataset.sources:
        raise GenerationError(f"{data.dataset.path}: no split {split!r} (have {sorted(data.dataset.sources)})")
    source = data.dataset.sources[split]
    adapters, at_step = restore_adapters(base, workdir, step)
    scfg = sampling_config(cfg, base.tokenizer, data.pad_id, greedy=greedy)
    source = Subset(source, max_examples)  # evenly spaced over the split, as in training's eval
    n = len(source)
    labels = data.labels  # the dataset's class names, as data.setup read them
    gates = GateAccumulator() if gates_out else None
    examples = (source[i] for i in range(n))
    records = generate_predictions(
        base.params, adapters, base.model_cfg, base.lora_cfg, scfg, examples, base.tokenizer,
        int(cfg.sample.batch_size), labels=labels, source_name=f"{data.dataset.path} split {split}",
        total=n, progress=progress, gates=gates)
    count = write_jsonl(records, out)
    if gates_out and gates is not None:
        summary = gates.summary()
        if summary is not None:
            write_json(summary, gates_out)
    print(f"wrote {count} predictions ({split} split, checkpoint step {at_step}, "
          f"{'greedy' if scfg.greedy else 'sampled'}) to {out}")
    return 0
