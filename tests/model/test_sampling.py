"""The KV-cache sampler against independent references.

- decoding: greedy tokens equal repeated argmax of a cache-free full forward over the
  unpadded (right-padded) sequence, in every routing mode, with non-zero adapters;
- processors: Hugging Face's logits processors (PyTorch) and hand-computed values.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from socialalign_jax.model import sampling
from socialalign_jax.model.sampling import SamplingConfig
from socialalign_jax.model import decoder
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig

CFG = ModelConfig("qwen2", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rope_theta=10000.0)
PAD = 0


def _adapters(lc: LoraConfig, seed: int = 1):
    """init_adapters, then random non-zero B's so the adapters (and their routing) matter."""
    ad = decoder.init_adapters(jax.random.PRNGKey(seed), CFG, lc)
    leaves, tree = jax.tree_util.tree_flatten_with_path(ad)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    out = []
    for (path, leaf), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        out.append(0.3 * jax.random.normal(k, leaf.shape) if name.endswith("['B']") else leaf)
    return jax.tree_util.tree_unflatten(tree, out)


def _prompts():
    """3 prompts of different lengths with spans inside each (absolute positions)."""
    rng = np.random.default_rng(0)
    lens = [9, 5, 7]
    rows = [rng.integers(1, CFG.vocab_size, n).tolist() for n in lens]
    user_end = np.array([3, 2, 2], np.int32)
    news_end = np.array([7, 4, 6], np.int32)
    return rows, user_end, news_end


@functools.partial(jax.jit, static_argnames=("lc",))
def _full_logits(params, adapters, ids, mask, user_end, news_end, lc):
    return decoder.forward(params, ids, CFG, attention_mask=mask, adapters=adapters, lora_cfg=lc,
                           spans=(user_end, news_end)).logits


def _reference_greedy(params, adapters, lc, rows, spans, max_new, penalty=1.0):
    """Greedy decoding without a cache: full forward over the right-padded sequences each step."""
    b = len(rows)
    total = max(len(r) for r in rows) + max_new
    seqs = [list(r) for r in rows]
    out = []
    for _ in range(max_new):
        ids = np.full((b, total), PAD, np.int32)
        mask = np.zeros((b, total), np.int32)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
            mask[i, :len(s)] = 1
        logits = np.asarray(_full_logits(params, adapters, ids, mask, *spans, lc=lc))
        step = []
        for i, s in enumerate(seqs):
            lg = logits[i, len(s) - 1].astype(np.float64)
            seen = np.zeros(CFG.vocab_size, bool)
            seen[s] = True  # prompt + generated so far
            lg = np.where(seen, np.where(lg > 0, lg / penalty, lg * penalty), lg)
            step.append(int(np.argmax(lg)))
        for s, t in zip(seqs, step):
            s.append(t)
        out.append(step)
    return np.array(out).T  # [B, max_new]


def _left(rows):
    return sampling.left_pad(rows, PAD)


PARAMS = decoder.init_params(CFG, jax.random.PRNGKey(0))


@pytest.mark.parametrize("routing,layer_loop", [(r, "auto") for r in ("token", "pooled", "uniform_a", "uniform_b", "uniform")]
                         + [("token", "scan"), ("pooled", "scan"), ("token", "unrolled"), ("pooled", "unrolled")])
def test_greedy_matches_full_forward_argmax(routing, layer_loop):
    lc = LoraConfig(rank=4, gate_width=8, routing=routing, dropout=0.1)
    ad = _adapters(lc)
    rows, ue, ne = _prompts()
    max_new = 6
    ref = _reference_greedy(PARAMS, ad, lc, rows, (ue, ne), max_new)
    # The adapters must matter, or this test could not catch a routing bug.
    base = _reference_greedy(PARAMS, None, None, rows, (ue, ne), max_new)
    assert not np.array_equal(ref, base)

    ids, mask = _left(rows)
    scfg = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=max_new, stop_tokens=(), pad_id=PAD,
                          layer_loop=layer_loop)
    out = sampling.generate(PARAMS, ad, ids, mask, CFG, lc, scfg, (ue, ne), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    np.testing.assert_array_equal(np.asarray(out.lengths), [max_new] * 3)

    # The prefill hidden state is the full forward's hidden at each row's last prompt token.
    full = decoder.forward(PARAMS, jnp.asarray(ids), CFG, attention_mask=jnp.asarray(mask), adapters=ad,
                           lora_cfg=lc, spans=(ue, ne))
    np.testing.assert_allclose(np.asarray(out.last_hidden), np.asarray(full.hidden[:, -1]), atol=1e-5)


def test_greedy_with_repetition_penalty_and_topk1():
    lc = LoraConfig(rank=4, gate_width=8, routing="token")
    ad = _adapters(lc, seed=3)
    rows, ue, ne = _prompts()
    max_new = 8
    ref = _reference_greedy(PARAMS, ad, lc, rows, (ue, ne), max_new, penalty=1.8)
    ids, mask = _left(rows)
    greedy = SamplingConfig(greedy=True, repetition_penalty=1.8, max_new_tokens=max_new, stop_tokens=(), pad_id=PAD)
    out = sampling.generate(PARAMS, ad, ids, mask, CFG, lc, greedy, (ue, ne), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    # top-k = 1 sampling is greedy whatever the temperature and key.
    topk1 = greedy.replace(greedy=False, top_k=1, temperature=1.7, top_p=0.5)
    out1 = sampling.generate(PARAMS, ad, ids, mask, CFG, lc, topk1, (ue, ne), jax.random.PRNGKey(42))
    np.testing.assert_array_equal(np.asarray(out1.tokens), ref)


def test_stop_tokens_end_rows_independently():
    rows, ue, ne = _prompts()
    ids, mask = _left(rows)
    max_new = 10
    free = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=max_new, stop_tokens=(), pad_id=PAD)
    base = np.asarray(sampling.generate(PARAMS, None, ids, mask, CFG, None, free, (ue, ne),
                                        jax.random.PRNGKey(0)).tokens)
    # A stop token that row 0 emits and some other row never emits.
    stop = next(int(t) for t in base[0, 1:] if not all(t in r for r in base[1:]))
    out = sampling.generate(PARAMS, None, ids, mask, CFG, None, free.replace(stop_tokens=(stop, 10_000)), (ue, ne),
                            jax.random.PRNGKey(0))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for r in range(len(rows)):
        hits = np.flatnonzero(base[r] == stop)
        n = int(hits[0]) + 1 if hits.size else max_new
        assert lengths[r] == n
        np.testing.assert_array_equal(tokens[r, :n], base[r, :n])  # identical up to and including the stop
        assert (tokens[r, n:] == PAD).all()
    assert lengths[0] < max_new and lengths.max() == max_new


def test_all_rows_stopped_ends_early_with_padding():
    rows, ue, ne = _prompts()
    ids, mask = _left(rows)
    free = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=5, stop_tokens=(), pad_id=PAD)
    first = np.asarray(sampling.generate(PARAMS, None, ids, mask, CFG, None, free, (ue, ne),
                                         jax.random.PRNGKey(0)).tokens)[:, 0]
    out = sampling.generate(PARAMS, None, ids, mask, CFG, None, free.replace(stop_tokens=tuple(set(first.tolist()))),
                            (ue, ne), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out.lengths), [1, 1, 1])
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0], first)
    assert (np.asarray(out.tokens)[:, 1:] == PAD).all()


def test_batch8_64_tokens_sampling_completes():
    lc = LoraConfig(rank=4, gate_width=8, routing="pooled")
    ad = _adapters(lc, seed=5)
    rng = np.random.default_rng(1)
    rows = [rng.integers(1, CFG.vocab_size, n).tolist() for n in rng.integers(4, 16, 8)]
    ue = np.array([min(2, len(r)) for r in rows], np.int32)
    ne = np.array([len(r) - 1 for r in rows], np.int32)
    ids, mask = _left(rows)
    scfg = SamplingConfig(max_new_tokens=64, stop_tokens=(3,), pad_id=PAD)  # paper defaults otherwise
    out = sampling.generate(PARAMS, ad, ids, mask, CFG, lc, scfg, (ue, ne), jax.random.PRNGKey(7))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    assert tokens.shape == (8, 64) and out.last_hidden.shape == (8, CFG.hidden_size)
    assert ((lengths >= 1) & (lengths <= 64)).all()
    for r in range(8):
        n = lengths[r]
        assert ((tokens[r, :n] >= 0) & (tokens[r, :n] < CFG.vocab_size)).all()
        assert (tokens[r, n:] == PAD).all()
        assert (tokens[r, :n - 1] != 3).all()  # no stop token before the end
        assert n == 64 or tokens[r, n - 1] == 3
    # Sampling, not greedy: another key gives another continuation somewhere.
    other = sampling.generate(PARAMS, ad, ids, mask, CFG, lc, scfg, (ue, ne), jax.random.PRNGKey(8))
    assert not np.array_equal(np.asarray(other.tokens), tokens)


# ---------------------------------------------------------------- logit processors


def test_top_p_hand_built():
    probs = np.array([[0.15, 0.5, 0.05, 0.3]])  # ranked: 1 (.5), 3 (.3), 0 (.15), 2 (.05)
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    kept = lambda p: set(np.flatnonzero(np.isfinite(np.asarray(sampling.top_p_filter(logits, p))[0])).tolist())
    assert kept(0.3) == {1}  # the top token alone already reaches p
    assert kept(0.5 - 1e-3) == {1}
    assert kept(0.6) == {1, 3}  # the token that crosses p is kept
    assert kept(0.75) == {1, 3}
    assert kept(0.9) == {1, 3, 0}
    assert kept(0.99) == {0, 1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}
    np.testing.assert_allclose(np.asarray(sampling.top_p_filter(logits, 0.75))[0, [1, 3]],
                               np.log([0.5, 0.3]), rtol=1e-6)  # kept logits unchanged


def test_repetition_penalty_hand_built():
    logits = jnp.array([[2.0, -1.0, 0.5, -0.5, 0.0]])
    seen = jnp.array([[True, True, False, False, True]])
    out = np.asarray(sampling.apply_repetition_penalty(logits, seen, 2.0))
    np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, -0.5, 0.0]])


def test_top_k_hand_built():
    logits = jnp.array([[0.1, 3.0, -2.0, 2.0, 1.0]])
    out = np.asarray(sampling.top_k_filter(logits, 2))
    assert np.isfinite(out).tolist() == [[False, True, False, True, False]]
    np.testing.assert_array_equal(np.asarray(sampling.top_k_filter(logits, 0)), np.asarray(logits))


def _hf_chain(logits, input_ids, scfg):
    scores = torch.tensor(np.asarray(logits))
    ids = torch.tensor(input_ids)
    scores = RepetitionPenaltyLogitsProcessor(scfg.repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(scfg.temperature)(ids, scores)
    if scfg.top_k > 0:  # HF has no "off" value for top-k
        scores = TopKLogitsWarper(scfg.top_k)(ids, scores)
    scores = TopPLogitsWarper(scfg.top_p)(ids, scores)
    return scores.numpy()


@pytest.mark.parametrize("top_k,top_p", [(20, 0.9), (5, 0.5), (0, 0.8), (50, 1.0)])
def test_processing_chain_matches_hugging_face(top_k, top_p):
    rng = np.random.default_rng(top_k)
    b, v = 4, 60
    logits = (rng.standard_normal((b, v)) * 2.5).astype(np.float32)
    input_ids = rng.integers(0, v, (b, 12))
    seen = np.zeros((b, v), bool)
    np.put_along_axis(seen, input_ids, True, axis=1)
    scfg = SamplingConfig(temperature=0.7, top_k=top_k, top_p=top_p, repetition_penalty=1.2)
    ref = _hf_chain(logits, input_ids, scfg)
    ours = np.asarray(sampling.process_logits(jnp.asarray(logits), jnp.asarray(seen), scfg))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-5)

    # The sort-free candidate path used in the decode loop gives the same distribution.
    cand_logits, cand_ids = sampling.candidates(jnp.asarray(logits), jnp.asarray(seen), scfg)
    dense = np.zeros((b, v))
    np.put_along_axis(dense, np.asarray(cand_ids), np.asarray(jax.nn.softmax(cand_logits, axis=-1)), axis=1)
    np.testing.assert_allclose(dense, torch.softmax(torch.tensor(ref), -1).numpy(), atol=1e-6)

    # Sampled tokens always come from the kept set.
    toks = np.asarray(jax.vmap(lambda k: sampling.next_token(jnp.asarray(logits), jnp.asarray(seen), scfg, k))(
        jax.random.split(jax.random.PRNGKey(0), 64)))  # [64, B]
    for r in range(b):
        assert np.isfinite(ref[r, toks[:, r]]).all()


def test_sampling_frequencies_follow_processed_distribution():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]]))
    scfg = SamplingConfig(temperature=1.0, top_k=3, top_p=1.0, repetition_penalty=1.0)
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    toks = np.asarray(jax.vmap(lambda k: sampling.next_token(logits, jnp.zeros((1, 4), bool), scfg, k))(keys))[:, 0]
    freq = np.bincount(toks, minlength=4) / toks.size
    np.testing.assert_allclose(freq, [4 / 9, 3 / 9, 2 / 9, 0.0], atol=0.03)


def test_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    SamplingConfig(temperature=0.0, greedy=True)  # greedy ignores temperature
    with pytest.raises(ValueError, match="empty"):
        sampling.left_pad([[1, 2], []], 0)
