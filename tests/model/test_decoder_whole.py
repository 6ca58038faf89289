"""The Decoder applied in one piece: what it reads off the hidden states, and the gate statistics it sows.

References are independent of the code under test: numpy gathers and matmuls of the returned hidden
states and of the variables, token counts from the spans by hand, and the unrolled layer loop against
the scan (two different wirings of the same sown statistics).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from socialalign_jax.model import decoder, modules, pac_lora
from socialalign_jax.model.config import ModelConfig
from socialalign_jax.train.step import gate_summary
from tests.model_helpers import lively_adapters

CFG = ModelConfig("qwen2", 96, 24, 40, 2, 4, 2, 6, tie_embeddings=False)
LC = pac_lora.LoraConfig(rank=2, num_analyze=3, num_compose=2, gate_width=5, targets=("q", "v", "down"),
                         num_classes=3)
B, S = 3, 10
USER_END = np.array([3, 2, 0], np.int32)
NEWS_END = np.array([6, 7, 0], np.int32)


@pytest.fixture(scope="module")
def setup():
    params = decoder.init_params(CFG, jax.random.PRNGKey(0))
    ad = lively_adapters(CFG, LC, seed=1)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, S)), jnp.int32)
    mask = np.ones((B, S), np.int32)
    mask[1, -3:] = 0  # right padding on row 1
    return params, ad, ids, jnp.asarray(mask)


def _run(setup, **kw):
    params, ad, ids, mask = setup
    return decoder.forward(params, ids, CFG, attention_mask=mask, adapters=ad, lora_cfg=LC,
                           spans=(USER_END, NEWS_END), **kw)


def test_logits_at_positions_last_and_none_read_the_same_hidden_states(setup):
    params = setup[0]
    full = _run(setup)
    hidden = np.asarray(full.hidden, np.float64)
    lm = np.asarray(params["lm_head"]["kernel"], np.float64)  # untied: [D, V]
    np.testing.assert_allclose(np.asarray(full.logits), hidden @ lm, rtol=1e-4, atol=1e-4)

    pos = np.array([[0, 4, 9], [1, 1, 6], [8, 2, 3]], np.int32)
    at = _run(setup, logits_at=jnp.asarray(pos))
    want = np.take_along_axis(hidden, pos[..., None], axis=1) @ lm  # [B, R, V]
    assert at.logits.shape == (B, 3, CFG.vocab_size)
    np.testing.assert_allclose(np.asarray(at.logits), want, rtol=1e-4, atol=1e-4)

    last = _run(setup, logits_at="last")
    np.testing.assert_allclose(np.asarray(last.logits)[:, 0], hidden[:, -1] @ lm, rtol=1e-4, atol=1e-4)
    none = _run(setup, logits_at=None)
    assert none.logits is None
    np.testing.assert_allclose(np.asarray(none.hidden), hidden, rtol=0, atol=0)

    with pytest.raises(ValueError, match="logits_at"):
        _run(setup, logits_at="first")


def test_sentiment_at_is_the_head_on_the_prompts_last_token(setup):
    _, ad, _, _ = setup
    prompt_len = np.array([4, 7, 10], np.int32)
    out = _run(setup, sentiment_at=jnp.asarray(prompt_len))
    h = np.asarray(out.hidden, np.float64)[np.arange(B), prompt_len - 1]  # [B, D]
    want = h @ np.asarray(ad["head"]["kernel"], np.float64) + np.asarray(ad["head"]["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(out.sentiment), want, rtol=1e-5, atol=1e-5)
    assert _run(setup).sentiment is None
    params, _, ids, mask = setup
    with pytest.raises(ValueError, match="num_classes"):  # the base model has no head
        decoder.forward(params, ids, CFG, attention_mask=mask, sentiment_at=jnp.asarray(prompt_len))


def test_gate_stats_are_sown_into_intermediates_and_count_the_span_tokens(setup):
    params, ad, ids, mask = setup
    dec = decoder.model(CFG, LC)
    _, state = dec.apply({"params": params, "lora": ad}, ids, mask, None, (USER_END, NEWS_END),
                         mutable=["intermediates"])
    sown = state["intermediates"]["layers"]
    assert set(sown) == {"attn", "mlp"} and set(sown["attn"]) == {"q", "v"} and set(sown["mlp"]) == {"down"}
    st = sown["attn"]["q"][modules.GATE_STATS][0]
    assert st["a"].shape == (CFG.num_layers, 3, LC.num_analyze) and st["count"].shape == (CFG.num_layers, 3)

    # Tokens per segment by hand: positions 0.. of the real tokens, user < user_end <= news < news_end.
    m = np.asarray(mask)
    counts = np.zeros(3)
    for b in range(B):
        for t in range(S):
            if m[b, t]:
                counts[0 if t < USER_END[b] else 1 if t < NEWS_END[b] else 2] += 1
    stats = _run(setup).gate_stats
    assert set(stats) == {"q", "v", "down"}
    for name, s in stats.items():
        np.testing.assert_array_equal(np.asarray(s["count"]), np.tile(counts, (CFG.num_layers, 1)), err_msg=name)
        # Each token's gate weights sum to one, so the summed weights of a segment are its token count.
        np.testing.assert_allclose(np.asarray(s["a"]).sum(-1), np.asarray(s["count"]), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(s["b"]).sum(-1), np.asarray(s["count"]), rtol=1e-5)
    # forward returns what the apply sowed
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 stats["q"], jax.tree.map(np.asarray, st))

    # The unrolled layer loop sows per layer; forward stacks them like the scan does.
    unrolled = dataclasses.replace(CFG, scan_layers=False)
    loop = decoder.forward(params, ids, unrolled, attention_mask=mask, adapters=ad, lora_cfg=LC,
                           spans=(USER_END, NEWS_END)).gate_stats
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5),
                 loop, stats)


def test_one_summariser_means_per_module_and_pooled(setup):
    stats = jax.tree.map(lambda x: np.asarray(x, np.float64), _run(setup).gate_stats)
    per = pac_lora.summarize_gate_stats(stats)
    for name, s in stats.items():
        np.testing.assert_allclose(np.asarray(per[name]["a"]), s["a"] / np.maximum(s["count"], 1)[..., None])
    # pooled: token-weighted over every layer and module, by hand
    cnt = sum(s["count"].sum(0) for s in stats.values())
    a = sum(s["a"].sum(0) for s in stats.values()) / np.maximum(cnt, 1)[:, None]
    ent = sum(s["b_entropy"].sum(0) for s in stats.values()) / np.maximum(cnt, 1)
    pooled = pac_lora.summarize_gate_stats(stats, pool=True)
    np.testing.assert_allclose(np.asarray(pooled["a"]), a, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(pooled["b_entropy"]), ent, rtol=1e-6)
    metrics = gate_summary(stats)  # the train step's metrics read the same summary
    np.testing.assert_allclose(np.asarray(metrics["gate_a_weights"]), a, rtol=1e-6)
    assert pac_lora.summarize_gate_stats({}, pool=True) == {} and gate_summary({}) == {}


def test_statistics_come_only_from_adapted_maps_and_only_when_asked_for(setup):
    params, ad, ids, mask = setup
    args = (ids, mask, None, (USER_END, NEWS_END))
    out = decoder.model(CFG, LC).apply({"params": params, "lora": ad}, *args)
    assert isinstance(out, modules.ModelOutput) and out.gate_stats is None  # the module returns none itself
    # The base model's maps are not adapted: a mutable `intermediates` stays empty, and forward reports None.
    _, state = decoder.model(CFG).apply({"params": params}, *args, mutable=["intermediates"])
    assert not state.get("intermediates")
    assert decoder.forward(params, ids, CFG, attention_mask=mask).gate_stats is None
    # Adapters without targets (the head only): no map sows.
    head_only = dataclasses.replace(LC, targets=())
    _, state = decoder.model(CFG, head_only).apply({"params": params, "lora": {"head": ad["head"]}}, *args,
                                                   mutable=["intermediates"])
    assert not state.get("intermediates")


def test_pooled_gates_are_the_adapted_maps_cache_and_a_cache_without_them_is_refused(setup):
    """Pooled routing keeps the prefill's gate weights as each adapted map's own `cache` variables; the
    prefill writes exactly the span means' gate probabilities (recomputed here by hand in numpy), and a
    cache made without the adapter config (no stored gates) is refused rather than decoded with uniform gates."""
    params, ad, ids, mask = setup
    lc = dataclasses.replace(LC, routing="pooled")
    cache = decoder.init_cache(CFG, B, S + 2, lc)
    assert sorted(cache["layers"]["mlp"]) == ["down"]
    out = decoder.forward(params, ids, CFG, attention_mask=mask, adapters=ad, lora_cfg=lc,
                          spans=(USER_END, NEWS_END), cache=cache)
    stored = np.asarray(out.cache["layers"]["attn"]["q"]["pooled_a"])  # [L, B, Ea]

    # Layer 0's q reads the first RMSNorm of the embeddings: its news-span mean through gate_a, by hand.
    x = np.asarray(params["embed"]["embedding"], np.float64)[np.asarray(ids)]  # [B, S, D]
    scale = np.asarray(params["layers"]["input_norm"]["scale"][0], np.float64)
    h = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + CFG.rms_norm_eps) * scale
    g = jax.tree.map(lambda a: np.asarray(a[0], np.float64), ad["layers"]["attn"]["q"]["gate_a"])
    for b in range(B):
        news = [t for t in range(S) if mask[b, t] and USER_END[b] <= t < NEWS_END[b]]
        mean = h[b, news].mean(0) if news else np.zeros(CFG.hidden_size)
        pre = mean @ g["w1"]
        z = 0.5 * pre * (1 + np.vectorize(math.erf)(pre / math.sqrt(2)))  # exact GELU
        logits = z @ g["w2"]
        want = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(stored[0, b], want, rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match="needs init_cache"):
        decoder.forward(params, ids, CFG, attention_mask=mask, adapters=ad, lora_cfg=lc,
                        spans=(USER_END, NEWS_END), cache=decoder.init_cache(CFG, B, S + 2))
    dec = decoder.model(CFG, lc)  # the module itself refuses too, not only the functional wrapper
    with pytest.raises(ValueError, match="needs init_cache"):
        dec.apply({"params": params, "lora": ad, "cache": {"kv": decoder.init_cache(CFG, B, S + 2)}}, ids, mask,
                  None, (USER_END, NEWS_END), True, mutable=["cache"])
