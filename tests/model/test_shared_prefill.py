"""Shared prefill: a prompt's K samples branch from ONE prefill and decode as K separate runs would.

`sampling.generate(samples=K)` runs the B prompts once and branches their cache into K rows each
(`decoder.branch_cache`: the prompt's slots stored and read once, each row's own slots beside them),
the first logits and the seen mask repeated K times. References, independent of that path:

- an unshared run: the same prompts repeated K times BEFORE the prefill (B*K prefills), with the
  same per-row PRNG keys: the same tokens, token for token, greedy and sampled;
- a plain full forward without cache over each row's prompt + its sampled tokens: the same
  logits at every decoded position and the same head probabilities at the last prompt token;
- the unshared prefill's cache, leaf by leaf (k/v, positions, spans, pooled routing's stored
  gate weights), and its gate statistics (prefill and every decode step).

Prompts of different lengths are left-padded into one batch; routing `token` and `pooled`; K in {1, 3}.

These tests run in a process of their own (test_shared_prefill_isolated.py starts it): inside the
full suite's one long process, XLA segfaulted three times compiling their programs (2026-12-07),
while this file alone, and tests/model as a whole, pass.
"""

from __future__ import annotations

import os

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from socialalign_jax.inference import generation
from socialalign_jax.model import decoder, sampling
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.model.sampling import SamplingConfig

from tests.model_helpers import lively_adapters

ISOLATED_ENV = "SOCIALALIGN_SHARED_PREFILL_TESTS"  # set by test_shared_prefill_isolated.py
pytestmark = pytest.mark.skipif(os.environ.get(ISOLATED_ENV) != "1", reason=(
    f"runs in its own process (tests/model/test_shared_prefill_isolated.py; or {ISOLATED_ENV}=1 pytest THIS_FILE)"))

CFG = ModelConfig("qwen2", 89, 32, 48, 2, 4, 2, 8, rope_theta=1e4, qkv_bias=True, tie_embeddings=True)
PROMPT_LENS = (9, 6, 4)  # one left-padded batch of different lengths
USER_END = np.array([3, 2, 1], np.int32)  # absolute token positions in each unpadded prompt
NEWS_END = np.array([7, 5, 3], np.int32)
N_GEN = 5
GREEDY = SamplingConfig(greedy=True, max_new_tokens=N_GEN, stop_tokens=(), pad_id=0, repetition_penalty=1.3)
SAMPLED = SamplingConfig(max_new_tokens=N_GEN, stop_tokens=(), pad_id=0, temperature=1.0, top_k=0, top_p=1.0,
                         repetition_penalty=1.3)


def _lora(routing):
    return LoraConfig(num_analyze=3, num_compose=2, rank=4, alpha=8.0, gate_width=16, routing=routing,
                      num_classes=3, targets=("q", "v", "o", "down"))


@functools.lru_cache(maxsize=None)
def _model(routing):
    """Params and adapters scaled so that the logits are peaked and routing matters (random B, sharp gates)."""
    params = decoder.init_params(CFG, jax.random.PRNGKey(5))
    params = jax.tree_util.tree_map(lambda a: a * 4.0 if a.ndim >= 2 and not bool(jnp.all(a == 1)) else a, params)
    lc = _lora(routing)
    return params, lively_adapters(CFG, lc, 0), lc


def _prompts():
    rng = np.random.default_rng(11)
    prompts = [rng.integers(1, CFG.vocab_size, n).astype(np.int32) for n in PROMPT_LENS]
    ids, mask = sampling.left_pad(prompts, 0)
    return prompts, ids, mask


def _keys(k):
    """One key per output row [B*K], made independently of the code under test."""
    return jax.random.split(jax.random.PRNGKey(42), len(PROMPT_LENS) * k)


def _rep(x, k):
    return np.repeat(np.asarray(x), k, axis=0)


@functools.lru_cache(maxsize=None)
def _forward(lc):
    """`decoder.forward` of the tiny model, jitted, for teacher-forcing a cache step by step."""
    return jax.jit(functools.partial(decoder.forward, cfg=CFG, lora_cfg=lc))


def _assert_stats_close(got, want):
    """Gate statistics (a pytree of sums) equal, compared in float64."""
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                                                   rtol=1e-5, atol=1e-4), got, want)


def _generate(routing, k, greedy, shared):
    params, ad, lc = _model(routing)
    _, ids, mask = _prompts()
    scfg = GREEDY if greedy else SAMPLED
    if shared:
        out = sampling.generate(params, ad, ids, mask, CFG, lc, scfg, (USER_END, NEWS_END), _keys(k), samples=k)
    else:
        out = sampling.generate(params, ad, _rep(ids, k), _rep(mask, k), CFG, lc, scfg,
                                (_rep(USER_END, k), _rep(NEWS_END, k)), _keys(k))
    return jax.tree_util.tree_map(np.asarray, tuple(out))


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("routing", ["token", "pooled"])
def test_shared_prefill_samples_equal_unshared_runs_with_the_same_keys(routing, k, greedy):
    tokens, lengths, hidden, sentiment = _generate(routing, k, greedy, shared=True)
    ref_tokens, ref_lengths, ref_hidden, ref_sentiment = _generate(routing, k, greedy, shared=False)
    b = len(PROMPT_LENS)
    assert tokens.shape == (b * k, N_GEN) and hidden.shape == (b, CFG.hidden_size)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(lengths, ref_lengths)
    np.testing.assert_allclose(hidden, ref_hidden[::k], rtol=0, atol=1e-5)  # one prefill per prompt
    assert sentiment.shape == (b, 3)  # the head, read off the same prefill
    np.testing.assert_allclose(sentiment, ref_sentiment[::k], rtol=0, atol=1e-5)
    if not greedy and k > 1:  # each of the K rows has its own stream: a prompt's samples differ
        per_prompt = tokens.reshape(b, k, N_GEN)
        assert all(len({tuple(r) for r in per_prompt[i]}) > 1 for i in range(b)), per_prompt


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("routing", ["token", "pooled"])
def test_repeated_cache_decodes_as_a_full_forward(routing, k):
    """Teacher-force the shared run's SAMPLED tokens: logits, gate statistics, the cache and the head
    equal the unshared prefill's, and the logits and head equal a full forward without cache."""
    params, ad, lc = _model(routing)
    prompts, ids, mask = _prompts()
    gen = _generate(routing, k, False, shared=True)[0]  # [B*K, N_GEN]
    b, p = ids.shape
    fwd = _forward(lc)

    def prefill(ids_, mask_, ue, ne):
        cache = decoder.init_cache(CFG, ids_.shape[0], p + N_GEN, lc)
        return fwd(params, jnp.asarray(ids_), attention_mask=jnp.asarray(mask_), adapters=ad, spans=(ue, ne),
                   cache=cache)

    shared = prefill(ids, mask, USER_END, NEWS_END)
    unshared = prefill(_rep(ids, k), _rep(mask, k), _rep(USER_END, k), _rep(NEWS_END, k))
    cache = decoder.repeat_cache(shared.cache, k, CFG, lc)
    ref_cache = unshared.cache
    # The branched cache IS the unshared prefill's cache: every leaf, pooled gate weights included.
    flat, ref_flat = jax.tree_util.tree_flatten_with_path(cache)[0], jax.tree_util.tree_flatten_with_path(ref_cache)[0]
    assert [path for path, _ in flat] == [path for path, _ in ref_flat]
    for (path, got), (_, want) in zip(flat, ref_flat):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    if routing == "pooled":
        assert "pooled_a" in cache["layers"]["attn"]["q"]
    # Prefill gate statistics: the K copies of a prompt route exactly as its single prefill (sums x K).
    _assert_stats_close(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64) * k, shared.gate_stats),
                        unshared.gate_stats)

    logits = [_rep(np.asarray(shared.logits)[:, -1], k)]
    ref_logits = [np.asarray(unshared.logits)[:, -1]]
    for i in range(N_GEN - 1):
        tok = jnp.asarray(gen[:, i:i + 1])
        out = fwd(params, tok, adapters=ad, cache=cache)
        ref = fwd(params, tok, adapters=ad, cache=ref_cache)
        cache, ref_cache = out.cache, ref.cache
        logits.append(np.asarray(out.logits)[:, 0])
        ref_logits.append(np.asarray(ref.logits)[:, 0])
        _assert_stats_close(out.gate_stats, ref.gate_stats)
    for i, (got, want) in enumerate(zip(logits, ref_logits)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"step {i}")

    # Independent reference: a plain forward over each row's unpadded prompt + its sampled tokens.
    rows = [np.concatenate([prompts[r // k], gen[r]]) for r in range(b * k)]
    full_ids = np.zeros((b * k, max(len(r) for r in rows)), np.int32)
    full_mask = np.zeros_like(full_ids)
    for r, seq in enumerate(rows):
        full_ids[r, :len(seq)], full_mask[r, :len(seq)] = seq, 1
    full = fwd(params, jnp.asarray(full_ids), attention_mask=jnp.asarray(full_mask), adapters=ad,
               spans=(_rep(USER_END, k), _rep(NEWS_END, k)))
    full_logits = np.asarray(full.logits)
    for i, got in enumerate(logits):
        want = np.stack([full_logits[r, PROMPT_LENS[r // k] - 1 + i] for r in range(b * k)])
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=f"step {i} vs full forward")
    # The head, read once per prompt off the shared prefill, equals the full forward's at the last prompt token.
    head = np.asarray(decoder.sentiment_logits(shared.hidden[:, -1:], jnp.ones((b,), jnp.int32), ad["head"]))
    ref_head = np.asarray(decoder.sentiment_logits(full.hidden, jnp.asarray(_rep(PROMPT_LENS, k)), ad["head"]))
    np.testing.assert_allclose(_rep(head, k), ref_head, rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("routing", ["token", "pooled"])
def test_branched_cache_decodes_as_the_unshared_cache(routing, k):
    """`branch_cache`: the B prompts' cache (prefilled with no spare slots) as the shared block of
    B*K rows. Teacher-forcing the shared run's sampled tokens, every step's logits and gate statistics
    equal those of the unshared prefill's cache (the prompts repeated K times before the prefill),
    stacked and in the unrolled decode loop's form (`unstack_cache`, `unstack_layers`,
    `unstack_adapters`); the rows' next positions, spans and pooled gate weights are the prompts'."""
    params, ad, lc = _model(routing)
    _, ids, mask = _prompts()
    gen = _generate(routing, k, False, shared=True)[0]  # [B*K, N_GEN]
    b, p = ids.shape
    fwd = _forward(lc)

    shared = fwd(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask), adapters=ad, spans=(USER_END, NEWS_END),
                 cache=decoder.init_cache(CFG, b, p, lc))
    ref = fwd(params, jnp.asarray(_rep(ids, k)), attention_mask=jnp.asarray(_rep(mask, k)), adapters=ad,
              spans=(_rep(USER_END, k), _rep(NEWS_END, k)), cache=decoder.init_cache(CFG, b * k, p + N_GEN, lc))
    branched = decoder.branch_cache(shared.cache, k, N_GEN, CFG, lc)
    assert branched["k"].shape == (CFG.num_layers, b * k, CFG.num_kv_heads, N_GEN, CFG.head_dim)
    assert branched["shared_k"].shape == (CFG.num_layers, b, CFG.num_kv_heads, p, CFG.head_dim)
    assert int(branched["index"]) == 0 and np.all(np.asarray(branched["key_pos"]) == -1)
    for name in ("next_pos", "user_end", "news_end"):
        np.testing.assert_array_equal(np.asarray(branched[name]), np.asarray(ref.cache[name]), err_msg=name)
    if routing == "pooled":
        np.testing.assert_allclose(np.asarray(branched["layers"]["attn"]["q"]["pooled_a"]),
                                   np.asarray(ref.cache["layers"]["attn"]["q"]["pooled_a"]), rtol=0, atol=1e-6)
    unrolled = (decoder.unstack_layers(params), decoder.unstack_adapters(ad, lc), decoder.unstack_cache(branched))
    assert isinstance(unrolled[2]["k"], tuple) and "proj" in unrolled[1]["layers"][0]["attn"]["q"]
    caches = {"stacked": (params, ad, branched), "unrolled": unrolled}
    ref_cache = ref.cache
    for i in range(N_GEN - 1):
        tok = jnp.asarray(gen[:, i:i + 1])
        want = fwd(params, tok, adapters=ad, cache=ref_cache)
        ref_cache = want.cache
        for form, (pp, aa, cc) in caches.items():
            out = fwd(pp, tok, adapters=aa, cache=cc)
            caches[form] = (pp, aa, out.cache)
            np.testing.assert_allclose(np.asarray(out.logits), np.asarray(want.logits), rtol=0, atol=1e-5,
                                       err_msg=f"{form} step {i}")
            _assert_stats_close(out.gate_stats, want.gate_stats)
    assert int(caches["stacked"][2]["index"]) == N_GEN - 1  # the rows' own slots, the shared block untouched
    np.testing.assert_array_equal(np.asarray(caches["stacked"][2]["shared_k"]), np.asarray(shared.cache["k"]))
    np.testing.assert_allclose(np.asarray(decoder.stack_cache(caches["unrolled"][2])["k"]),
                               np.asarray(caches["stacked"][2]["k"]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="branched already"):
        decoder.repeat_cache(branched, 2, CFG, lc)
    with pytest.raises(ValueError, match="branched already"):
        decoder.branch_cache(branched, 2, 1, CFG, lc)


def test_repeat_cache_keeps_each_prompts_samples_together():
    """Row b*K + k of the branched cache is prompt b's: tiling the batch (k*B + b) would mix prompts
    and decode other tokens, so the equality tests above can tell the two orders apart."""
    params, ad, lc = _model("pooled")
    _, ids, mask = _prompts()
    cache = decoder.init_cache(CFG, len(PROMPT_LENS), ids.shape[1] + N_GEN, lc)
    out = decoder.forward(params, jnp.asarray(ids), CFG, attention_mask=jnp.asarray(mask), adapters=ad, lora_cfg=lc,
                          spans=(USER_END, NEWS_END), cache=cache)
    rep = decoder.repeat_cache(out.cache, 3, CFG, lc)
    np.testing.assert_array_equal(np.asarray(rep["next_pos"]), _rep(PROMPT_LENS, 3))
    np.testing.assert_array_equal(np.asarray(rep["user_end"]), _rep(USER_END, 3))
    np.testing.assert_array_equal(np.asarray(rep["key_pos"]), _rep(out.cache["key_pos"], 3))
    np.testing.assert_array_equal(np.asarray(rep["k"]), np.repeat(np.asarray(out.cache["k"]), 3, axis=1))
    br = decoder.branch_cache(out.cache, 3, 2, CFG, lc)  # the branched cache keeps the same row order
    np.testing.assert_array_equal(np.asarray(br["next_pos"]), _rep(PROMPT_LENS, 3))
    np.testing.assert_array_equal(np.asarray(br["layers"]["attn"]["q"]["pooled_a"]),
                                  np.asarray(rep["layers"]["attn"]["q"]["pooled_a"]))
    np.testing.assert_array_equal(np.asarray(rep["layers"]["attn"]["q"]["pooled_a"]),
                                  np.repeat(np.asarray(out.cache["layers"]["attn"]["q"]["pooled_a"]), 3, axis=1))
    assert int(rep["index"]) == int(out.cache["index"]) == ids.shape[1]
    # The stored pooled gate weights differ between prompts, so a wrong row order would show.
    a = np.asarray(out.cache["layers"]["attn"]["q"]["pooled_a"])
    assert np.abs(a[:, 0] - a[:, 1]).max() > 1e-3
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        decoder.repeat_cache(out.cache, 0, CFG, lc)


def test_sample_keys_follow_their_documented_definition():
    """sample_keys(key, ids, K)[b*K + k] == fold_in(fold_in(key, ids[b]), k), written out by hand."""
    key = jax.random.PRNGKey(9)
    ids = np.array([4, 0, 17], np.uint32)
    got = np.asarray(generation.sample_keys(key, ids, 2))
    want = np.stack([np.asarray(jax.random.fold_in(jax.random.fold_in(key, int(r)), k)) for r in ids for k in range(2)])
    np.testing.assert_array_equal(got, want)


def _head_probs(params, ad, lc, prompts, ue, ne):
    """Softmax of the head at each prompt's last token, from a plain right-padded forward (no cache)."""
    n = max(len(x) for x in prompts)
    ids = np.zeros((len(prompts), n), np.int32)
    mask = np.zeros_like(ids)
    for i, x in enumerate(prompts):
        ids[i, :len(x)], mask[i, :len(x)] = x, 1
    out = decoder.forward(params, jnp.asarray(ids), CFG, attention_mask=jnp.asarray(mask), adapters=ad, lora_cfg=lc,
                          spans=(ue, ne), logits_at=None)
    z = np.asarray(decoder.sentiment_logits(out.hidden, jnp.asarray([len(x) for x in prompts]), ad["head"]),
                   np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("routing", ["token", "pooled"])
def test_sample_rows_is_independent_of_batching_and_matches_single_prompt_runs(routing):
    """sample_rows: sample k of the row with id r is a one-prompt `generate` with key
    fold_in(fold_in(PRNGKey(seed), r), k), however the rows are batched (one prompt per call, or all
    in one call with a filler row); the head's probabilities are a plain forward's, one per row."""
    params, ad, lc = _model(routing)
    prompts, _, _ = _prompts()
    rows = [{"input_ids": np.concatenate([x, [1, 2]]), "prompt_len": len(x), "user_end": int(u), "news_end": int(n)}
            for x, u, n in zip(prompts, USER_END, NEWS_END)]  # input_ids may run past the prompt
    row_ids, seed, k = [10, 3, 7], 5, 3
    run = functools.partial(generation.sample_rows, params, ad, CFG, lc, SAMPLED, rows, samples=k, seed=seed,
                            row_ids=row_ids)
    one_by_one, together = run(batch_size=1), run(batch_size=16)  # batch_size counts prompts (K rows each)
    assert one_by_one.shapes == ((1, 3, 0, 32),) * 3 and together.shapes == ((4, 3, 0, 32),)
    assert one_by_one.tokens.shape == (3, k, N_GEN) and one_by_one.texts is None
    np.testing.assert_array_equal(one_by_one.tokens, together.tokens)
    np.testing.assert_array_equal(one_by_one.lengths, np.full((3, k), N_GEN))
    np.testing.assert_allclose(together.probs, _head_probs(params, ad, lc, prompts, USER_END, NEWS_END), atol=1e-5)
    np.testing.assert_allclose(one_by_one.probs, together.probs, atol=1e-6)
    base = jax.random.PRNGKey(seed)
    for i, x in enumerate(prompts):
        ids, mask = sampling.left_pad([x], 0, 32)
        for j in range(k):
            key = jax.random.fold_in(jax.random.fold_in(base, row_ids[i]), j)
            ref = sampling.generate(params, ad, ids, mask, CFG, lc, SAMPLED, (USER_END[i:i + 1], NEWS_END[i:i + 1]),
                                    key[None])
            np.testing.assert_array_equal(together.tokens[i, j], np.asarray(ref.tokens)[0],
                                          err_msg=f"row {i} sample {j}")
    with pytest.raises(ValueError, match="samples must be an integer >= 1"):
        run(batch_size=3, samples=0)
    with pytest.raises(ValueError, match=r"row_ids must be in \[0, 2\*\*32\)"):
        run(batch_size=3, row_ids=[-1, 0, 1])


# ----------------------------------------------------------------------------- a head shared across wordings
# Two users x two wordings: each user's prompts share a head and differ after it. Wording 0's
# user_end is one token before the head's end, wording 1's one after: the head's last token is
# news for one prompt and user for the other, so sharing must stop at the first user_end.

HEAD_LENS = (7, 4)
TAIL_LENS = ((4, 6), (3, 5))  # [user][wording]


def _wordings(head_lens=HEAD_LENS, tail_lens=TAIL_LENS):
    rng = np.random.default_rng(21)
    prompts, ue, ne, heads = [], [], [], []
    for u, h in enumerate(head_lens):
        head = rng.integers(1, CFG.vocab_size, h).astype(np.int32)
        heads.append(head)
        for v, t in enumerate(tail_lens[u]):
            prompts.append(np.concatenate([head, rng.integers(1, CFG.vocab_size, t).astype(np.int32)]))
            ue.append(h - 1 + 2 * v)
            ne.append(h + 2)
    return prompts, np.array(ue, np.int32), np.array(ne, np.int32), heads


def _slot_of(key_pos, row, pos):
    (slot,) = np.flatnonzero(np.asarray(key_pos)[row] == pos)
    return slot


@pytest.mark.parametrize("routing", ["token", "uniform_a"])
def test_a_shared_head_prefills_as_the_whole_prompts(routing):
    """prefill(prefix=heads) over the continuations equals prefill over the whole prompts: the
    K/V of every prompt token (found by its absolute position), the per-row positions and spans,
    the logits and hidden state at the last token, the seen tokens and the gate statistics; the
    logits also equal a plain forward without cache."""
    params, ad, _ = _model("token")
    lc = _lora(routing)
    prompts, ue, ne, heads = _wordings()
    run = jax.jit(functools.partial(sampling.prefill, cfg=CFG, lora_cfg=lc, extra=N_GEN))
    ids, mask = sampling.left_pad(prompts, 0)
    whole = run(params, ad, ids, mask, spans=(ue, ne))
    heads = [x[:min(ue[2 * u], ue[2 * u + 1])] for u, x in enumerate(heads)]  # up to the group's first user_end
    cut = [len(heads[i // 2]) for i in range(len(prompts))]
    c_ids, c_mask = sampling.left_pad([x[c:] for x, c in zip(prompts, cut)], 0)
    shared = run(params, ad, c_ids, c_mask, spans=(ue, ne), prefix=sampling.left_pad(heads, 0))

    np.testing.assert_allclose(np.asarray(shared.last_hidden), np.asarray(whole.last_hidden), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(shared.logits), np.asarray(whole.logits), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(shared.seen), np.asarray(whole.seen))
    _assert_stats_close(shared.gate_stats, whole.gate_stats)
    for name in ("next_pos", "user_end", "news_end"):
        np.testing.assert_array_equal(np.asarray(shared.cache[name]), np.asarray(whole.cache[name]), err_msg=name)
    for row, x in enumerate(prompts):
        for pos in range(len(x)):
            a = _slot_of(shared.cache["key_pos"], row, pos)
            b = _slot_of(whole.cache["key_pos"], row, pos)
            for leaf in ("k", "v"):
                np.testing.assert_allclose(np.asarray(shared.cache[leaf])[:, row, :, a],
                                           np.asarray(whole.cache[leaf])[:, row, :, b], rtol=0, atol=1e-5,
                                           err_msg=f"{leaf} row {row} position {pos}")
    # Independent reference: a plain right-padded forward over each whole prompt.
    full_ids = np.zeros((len(prompts), max(len(x) for x in prompts)), np.int32)
    full_mask = np.zeros_like(full_ids)
    for i, x in enumerate(prompts):
        full_ids[i, :len(x)], full_mask[i, :len(x)] = x, 1
    full = decoder.forward(params, jnp.asarray(full_ids), CFG, attention_mask=jnp.asarray(full_mask), adapters=ad,
                           lora_cfg=lc, spans=(ue, ne))
    want = np.stack([np.asarray(full.logits)[i, len(x) - 1] for i, x in enumerate(prompts)])
    np.testing.assert_allclose(np.asarray(shared.logits), want, rtol=0, atol=2e-5)


# (head lengths, tail lengths, the prefix slots and continuation slots generation.plan_prefix picks: the
# fewest prefilled slots, hand-computed from the shared heads h - 1 = (39, 35) and (59, 57)).
LAYOUTS = {
    # whole prompts 4 x 64 = 256 slots; cut every prompt at 32 (below both heads): 2 x 32 + 4 x 32 = 192;
    # share each whole head: 2 x 64 + 4 x 32 = 256
    "cut_below_heads": ((40, 36), ((4, 6), (3, 5)), 32, 32),
    # whole 4 x 128 = 512; cut at 32: 2 x 32 + 4 x 96 = 448; each whole head: 2 x 64 + 4 x 64 = 384
    "whole_heads": ((60, 58), ((30, 40), (31, 40)), 64, 64),
}


@pytest.mark.parametrize("layout,greedy", [("cut_below_heads", True), ("whole_heads", False)])
def test_sample_rows_sharing_a_users_head_changes_no_sample(layout, greedy):
    """sample_rows(group_size=2): a user's two wordings share the prefill of their common head, cut where
    the fewest slots are prefilled (below both heads, or at each one's end); the samples (same per-row
    streams) and the head's probabilities are those of whole prompts."""
    params, ad, lc = _model("token")
    head_lens, tail_lens, p0, p_len = LAYOUTS[layout]
    prompts, ue, ne, _ = _wordings(head_lens, tail_lens)
    rows = [{"input_ids": x, "prompt_len": len(x), "user_end": int(a), "news_end": int(b)}
            for x, a, b in zip(prompts, ue, ne)]
    run = functools.partial(generation.sample_rows, params, ad, CFG, lc, GREEDY if greedy else SAMPLED, rows,
                            samples=3, seed=2, row_ids=[0, 2, 1, 3], batch_size=12)
    whole, grouped = run(group_size=1), run(group_size=2)
    assert [s[2] for s in whole.shapes] == [0] and [s[2:] for s in grouped.shapes] == [(p0, p_len)]
    np.testing.assert_array_equal(grouped.tokens, whole.tokens)
    np.testing.assert_array_equal(grouped.lengths, whole.lengths)
    np.testing.assert_allclose(grouped.probs, whole.probs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(whole.probs, _head_probs(params, ad, lc, prompts, ue, ne), atol=1e-5)
    with pytest.raises(ValueError, match="group_size 3 does not divide the 4 rows"):
        run(group_size=3)


def test_pooled_routing_shares_no_head_because_the_user_span_reads_the_news():
    """Pooled gates give every token the news span's mean, so the user span's hidden states depend on
    the news (they do not under token routing): a head cannot be prefilled once for two wordings.
    generate refuses a prefix under pooled routing and sample_rows prefills whole prompts."""
    prompts, ue, ne, heads = _wordings()
    ids, mask = sampling.left_pad(prompts[:2], 0)  # user 0 under two wordings: same head, other news
    h = min(ue[0], ue[1])  # the head's tokens that are user tokens in both prompts
    gap = {}
    for routing in ("token", "pooled"):
        params, ad, lc = _model(routing)
        out = decoder.forward(params, jnp.asarray(ids), CFG, attention_mask=jnp.asarray(mask), adapters=ad,
                              lora_cfg=lc, spans=(ue[:2], ne[:2]), logits_at=None)
        hid = np.asarray(out.hidden)
        # The head's tokens sit at the same absolute positions, in columns that differ by the padding.
        cols = [ids.shape[1] - len(x) + np.arange(h) for x in prompts[:2]]
        gap[routing] = np.abs(hid[0, cols[0]] - hid[1, cols[1]]).max()
    assert gap["token"] < 1e-5 and gap["pooled"] > 1e-3, gap

    params, ad, lc = _model("pooled")
    c_ids, c_mask = sampling.left_pad([x[h:] for x in prompts[:2]], 0)
    with pytest.raises(ValueError, match="a shared prefix needs causal routing; 'pooled'"):
        sampling.prefill(params, ad, c_ids, c_mask, CFG, lc, (ue[:2], ne[:2]), N_GEN,
                         prefix=sampling.left_pad([heads[0][:h]], 0))
    rows = [{"input_ids": x, "prompt_len": len(x), "user_end": int(a), "news_end": int(b)}
            for x, a, b in zip(prompts, ue, ne)]
    out = generation.sample_rows(params, ad, CFG, lc, GREEDY, rows, samples=1, seed=0, batch_size=4, group_size=2)
    assert [s[2] for s in out.shapes] == [0]  # whole prompts
    np.testing.assert_allclose(out.probs, _head_probs(params, ad, lc, prompts, ue, ne), atol=1e-5)
