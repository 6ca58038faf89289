"""PAC-LoRA under KV-cached decoding: same logits and same gate weights as a full forward.

SPEC section 2: routing depends on segment ids from ABSOLUTE positions. The original code
derives them from the current chunk, so every decoded token is routed as a user token. The
main test compares, per decoded token, the logits and the per-token gate weights (recovered
from the gate-stat sums as the difference between full passes whose masks end one token
apart) with a full forward; the second test shows that chunk-local segment ids break it,
so the main test is sensitive to that bug.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from socialalign_jax.model import decoder, pac_lora
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.model.pac_lora import LoraConfig

from tests.model_helpers import lively_adapters

CFG = ModelConfig("qwen2", 89, 32, 48, 2, 4, 2, 8, rope_theta=1e4, qkv_bias=True, tie_embeddings=True)
PROMPT_LENS = np.array([9, 6, 5])
PADDING = ("right", "right", "left")  # one batch mixes both paddings (positions come from the mask)
USER_END = np.array([3, 2, 1])  # spans inside the prompt, in absolute token positions
NEWS_END = np.array([7, 5, 4])
MAX_PROMPT = int(PROMPT_LENS.max())
N_GEN = 4


def _adapters(lc, seed=0):
    return lively_adapters(CFG, lc, seed)


def _inputs():
    rng = np.random.default_rng(11)
    b, total = len(PROMPT_LENS), MAX_PROMPT + N_GEN
    prompts = [rng.integers(1, CFG.vocab_size, n) for n in PROMPT_LENS]
    gen = rng.integers(1, CFG.vocab_size, (b, N_GEN))
    p_ids = np.zeros((b, MAX_PROMPT), np.int32)
    p_mask = np.zeros_like(p_ids)
    f_ids = np.zeros((b, total), np.int32)
    real_cols = []  # per row: the full-sequence columns of its real tokens, in order
    for i, (pr, n) in enumerate(zip(prompts, PROMPT_LENS)):
        off = MAX_PROMPT - n if PADDING[i] == "left" else 0
        p_ids[i, off:off + n] = pr
        p_mask[i, off:off + n] = 1
        f_ids[i, off:off + n + N_GEN] = np.concatenate([pr, gen[i]])
        real_cols.append(np.arange(off, off + n + N_GEN))
    return p_ids, p_mask, f_ids, gen, real_cols


def _mask_upto(real_cols, k_real):
    """Full-sequence mask keeping the first k_real[b] real tokens of each row."""
    m = np.zeros((len(real_cols), MAX_PROMPT + N_GEN), np.int32)
    for b, cols in enumerate(real_cols):
        m[b, cols[:k_real[b]]] = 1
    return m


def _stats_np(stats):
    return {name: {k: np.asarray(v, np.float64) for k, v in st.items()} for name, st in stats.items()}


@functools.lru_cache(maxsize=None)
def _run(mode, chunk_local=False):
    """Full passes and a cached decode; returns (full logits per decoded token, decoded logits,
    per-token stats from full passes, per-token stats from decode steps, full-sequence stats,
    prefill + decode stat sums)."""
    lc = LoraConfig(num_analyze=3, num_compose=2, rank=4, alpha=8.0, dropout=0.1, gate_width=16,
                    routing=mode, num_classes=0, targets=("q", "v", "o", "down"))
    adapters = _adapters(lc)
    p_ids, p_mask, f_ids, gen, real_cols = _inputs()
    spans = (jnp.asarray(USER_END), jnp.asarray(NEWS_END))
    fwd = jax.jit(functools.partial(decoder.forward, cfg=CFG, lora_cfg=lc))

    def full(k_real):
        return fwd(CFG_PARAMS, jnp.asarray(f_ids), attention_mask=jnp.asarray(_mask_upto(real_cols, k_real)),
                   adapters=adapters, spans=spans)

    rows = np.arange(len(PROMPT_LENS))
    full_all = full(PROMPT_LENS + N_GEN)
    full_logits, full_tok_stats = [], []
    prev = _stats_np(full(PROMPT_LENS).gate_stats)
    for i in range(N_GEN):
        cols = np.array([real_cols[b][PROMPT_LENS[b] + i] for b in rows])
        full_logits.append(np.asarray(full_all.logits)[rows, cols])
        cur = _stats_np(full(PROMPT_LENS + i + 1).gate_stats)
        full_tok_stats.append(jax.tree_util.tree_map(lambda a, b: a - b, cur, prev))
        prev = cur

    cache = decoder.init_cache(CFG, len(PROMPT_LENS), MAX_PROMPT + N_GEN, lc)
    out = fwd(CFG_PARAMS, jnp.asarray(p_ids), attention_mask=jnp.asarray(p_mask), adapters=adapters,
              spans=spans, cache=cache)
    total = _stats_np(out.gate_stats)
    cache = out.cache
    dec_logits, dec_tok_stats = [], []
    for i in range(N_GEN):
        out = fwd(CFG_PARAMS, jnp.asarray(gen[:, i:i + 1]), adapters=adapters, cache=cache)
        cache = out.cache
        dec_logits.append(np.asarray(out.logits)[:, 0])
        st = _stats_np(out.gate_stats)
        dec_tok_stats.append(st)
        total = jax.tree_util.tree_map(lambda a, b: a + b, total, st)
    return full_logits, dec_logits, full_tok_stats, dec_tok_stats, _stats_np(full_all.gate_stats), total


CFG_PARAMS = None


@pytest.fixture(scope="module", autouse=True)
def _params():
    global CFG_PARAMS
    params = decoder.init_params(CFG, jax.random.PRNGKey(5))
    CFG_PARAMS = jax.tree_util.tree_map(lambda a: a * 4.0 if a.ndim >= 2 and not bool(jnp.all(a == 1)) else a,
                                        params)
    yield


def _assert_tree_close(got, want, atol, msg):
    for name in want:
        for k in want[name]:
            np.testing.assert_allclose(got[name][k], want[name][k], rtol=0, atol=atol, err_msg=f"{msg}: {name}/{k}")


@pytest.mark.parametrize("mode", pac_lora.ROUTING_MODES)
def test_cached_decode_matches_full_forward(mode):
    full_logits, dec_logits, full_tok, dec_tok, full_stats, dec_total = _run(mode)
    for i in range(N_GEN):
        np.testing.assert_allclose(dec_logits[i], full_logits[i], rtol=0, atol=1e-5, err_msg=f"{mode} step {i}")
        _assert_tree_close(dec_tok[i], full_tok[i], 1e-5, f"{mode} step {i} gate weights")
    # Prefill + every decode step add up to the full pass's stats (all segments, all tokens).
    _assert_tree_close(dec_total, full_stats, 1e-4, f"{mode} total gate stats")
    # Decoded tokens are 'other': one count per row per step, in every module and layer.
    for st in dec_tok:
        for name in st:
            np.testing.assert_array_equal(st[name]["count"], np.tile([0, 0, len(PROMPT_LENS)], (CFG.num_layers, 1)))


@pytest.mark.parametrize("mode", pac_lora.ROUTING_MODES)
def test_decode_form_matches_full_forward(mode):
    """The weights the CPU decode loop reads (`decoder.decode_form`: the adapters merged into the
    kernels wherever a generated token's gates are fixed, every mode but pooled; kernels stored
    transposed) decode as the full forward does, token by token, with gates that are far from
    uniform inside the spans (so merging with the experts' mean is right only outside them)."""
    lc = LoraConfig(num_analyze=3, num_compose=2, rank=4, alpha=8.0, dropout=0.1, gate_width=16,
                    routing=mode, num_classes=0, targets=("q", "v", "o", "down"))
    adapters = _adapters(lc)
    p_ids, p_mask, _, gen, _ = _inputs()
    fwd = jax.jit(decoder.forward, static_argnames=("cfg", "lora_cfg"))
    cache = decoder.init_cache(CFG, len(PROMPT_LENS), MAX_PROMPT + N_GEN, lc)
    cache = fwd(CFG_PARAMS, jnp.asarray(p_ids), CFG, attention_mask=jnp.asarray(p_mask), adapters=adapters,
                lora_cfg=lc, spans=(jnp.asarray(USER_END), jnp.asarray(NEWS_END)), cache=cache).cache
    step_params, step_adapters, step_lc = decoder.decode_form(CFG_PARAMS, adapters, lc)
    merged = mode != "pooled"
    assert (step_adapters is None and step_lc is None) == merged
    q = step_params["layers"][1]["attn"]["q"]
    assert q["kernel_t"].shape == (CFG.num_heads * CFG.head_dim, CFG.hidden_size) and "bias" in q
    # merged: W0 + s mean(A) mean(B), which differs from W0 (B is random): the adapters are in the weights
    w0 = np.asarray(CFG_PARAMS["layers"]["attn"]["q"]["kernel"][1]).T
    assert (np.abs(np.asarray(q["kernel_t"]) - w0).max() > 1e-3) == merged
    full_logits = _run(mode)[0]
    for i in range(N_GEN):
        out = fwd(step_params, jnp.asarray(gen[:, i:i + 1]), CFG, adapters=step_adapters, lora_cfg=step_lc,
                  cache=cache)
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.logits)[:, 0], full_logits[i], rtol=0, atol=2e-5,
                                   err_msg=f"{mode} step {i}")


def test_pooled_decode_uses_prompt_summaries_not_uniform():
    """In pooled mode the decoded tokens must carry the prompt's routing, which is not uniform."""
    _, _, _, dec_tok, _, _ = _run("pooled")
    a = dec_tok[0]["q"]["a"][:, 2] / len(PROMPT_LENS)  # [L, Ea] mean weight on 'other' tokens
    assert np.abs(a - 1.0 / 3).max() > 1e-2


def test_chunk_local_segments_break_decode(monkeypatch):
    """Routing from chunk-local positions (the original code's bug) makes decode diverge,
    so test_cached_decode_matches_full_forward would catch it."""
    orig = pac_lora.segment_ids

    def chunk_local(positions, user_end, news_end, valid):
        local = jnp.broadcast_to(jnp.arange(positions.shape[1], dtype=positions.dtype), positions.shape)
        return orig(local, user_end, news_end, valid)

    monkeypatch.setattr(pac_lora, "segment_ids", chunk_local)
    full_logits, dec_logits, full_tok, dec_tok, _, _ = _run("token", chunk_local=True)
    right = [i for i, pad in enumerate(PADDING) if pad == "right"]  # rows whose full pass is unaffected
    logit_gap = max(np.abs(d[right] - f[right]).max() for d, f in zip(dec_logits, full_logits))
    stat_gap = max(np.abs(d["q"]["b"] - f["q"]["b"]).max() for d, f in zip(dec_tok, full_tok))
    assert logit_gap > 1e-3, logit_gap
    assert stat_gap > 1e-3, stat_gap


def test_pooled_decode_without_stored_summaries_is_refused():
    """A cache made without lora_cfg has no pooled slot: decoding would silently use uniform gates."""
    lc = LoraConfig(num_analyze=3, num_compose=2, rank=4, routing="pooled", num_classes=0)
    cache = decoder.init_cache(CFG, 1, 8)  # lora_cfg forgotten
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="init_cache"):
        decoder.forward(CFG_PARAMS, ids, CFG, adapters=_adapters(lc), lora_cfg=lc, cache=cache,
                        spans=(jnp.array([1]), jnp.array([3])))
