"""Model-backed zero-shot labeller: scores against a numpy log-softmax of decoder.forward's logits.

The cached path (`score_fn.score_words`: one prefill per prompt, the label words run from the
repeated cache) is checked against the full-forward pair path `scoring.score_examples` on pairs
tokenised here, with and without PAC-LoRA adapters, and against transformers' Qwen2 log-probs.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from socialalign_jax.core.errors import UserError
from socialalign_jax.core.labels import DEFAULT_LABELS
from socialalign_jax.data.labellers import ZERO_SHOT_PROMPT, ZERO_SHOT_WORDS
from socialalign_jax.evaluation import model_labeller
from socialalign_jax.evaluation.model_labeller import model_score_fn, zero_shot_labeller
from socialalign_jax.inference import scoring
from socialalign_jax.model import decoder
from socialalign_jax.model.pac_lora import LoraConfig
from socialalign_jax.weights.resolve import WeightsError, resolve_weights
from socialalign_jax.weights.tokenizer import chat_template

SPEC = "random:tiny-qwen2"


@pytest.fixture(scope="module")
def weights():
    return resolve_weights(SPEC)


def reference_score(w, prompt: str, continuation: str, chat: bool) -> float:
    """Unpadded forward of one pair; log-softmax in float64; gather at the continuation tokens."""
    if chat:
        prompt = chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    p = w.tokenizer.encode(prompt, add_special_tokens=False)
    c = w.tokenizer.encode(continuation, add_special_tokens=False)
    ids = np.asarray(p + c, np.int32)
    logits = np.asarray(decoder.forward(w.params, ids[None], w.cfg).logits[0], np.float64)  # [n, V]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(sum(logp[t - 1, ids[t]] for t in range(len(p), len(ids))))


def test_score_fn_matches_forward_logits(weights):
    prompts = ["今天天气很好", "情感倾向：", "a much longer English prompt to force different lengths in one batch"]
    conts = ["积极", "消极的", "neutral"]
    for chat, n in ((True, 3), (False, 1)):
        fn = model_score_fn(weights.params, weights.cfg, weights.tokenizer, batch_size=2, chat=chat)  # 2 batches
        got = fn(prompts[:n], conts[:n])
        want = [reference_score(weights, p, c, chat) for p, c in zip(prompts[:n], conts[:n])]
        assert got.shape == (n,)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    # The continuation is scored given its prompt: another prompt gives another score.
    assert not np.isclose(fn(["甲"], ["积极"])[0], fn(["乙乙乙"], ["积极"])[0])
    assert fn([], []).shape == (0,)


def test_labeller_probs_are_softmax_of_label_word_scores(weights, monkeypatch):
    from socialalign_jax.evaluation import model_labeller

    seen = []
    monkeypatch.setattr(model_labeller, "resolve_weights", lambda spec, dtype=None: seen.append(spec) or weights)
    zs = zero_shot_labeller(SPEC, batch_size=2)  # the cached path: one prompt, 3 label words from its cache
    texts = ["这部电影太好看了"]
    probs = zs.probs(texts)
    assert seen == [SPEC] and zs.labels == tuple(ZERO_SHOT_WORDS) and probs.shape == (1, 3)
    for i, t in enumerate(texts):
        s = np.array([reference_score(weights, ZERO_SHOT_PROMPT.format(text=t), ZERO_SHOT_WORDS[k], True)
                      for k in zs.labels])
        e = np.exp(s - s.max())
        np.testing.assert_allclose(probs[i], e / e.sum(), rtol=1e-3, atol=1e-5)
    assert zs.label(texts) == [zs.labels[j] for j in probs.argmax(-1)]


def test_errors_are_one_line(weights):
    fn = model_score_fn(weights.params, weights.cfg, weights.tokenizer)
    with pytest.raises(Exception, match=r"pair 1: field 'continuation' is empty"):
        fn(["a", "b"], ["x", ""])
    with pytest.raises(WeightsError, match="no tokenizer"):
        zero_shot_labeller("random:tiny-llama")


def _evaluate_cli():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "launch" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("evaluate_cli_zs", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evaluate_cli_zeroshot(tmp_path, capsys, weights, monkeypatch):
    import json

    from socialalign_jax.evaluation import model_labeller

    cli = _evaluate_cli()
    labels = list(DEFAULT_LABELS)
    recs = [{"event": "事件", "event_id": 0, "user": "u", "prompt_id": i, "generated": t, "reference": t,
             "label": lab, "probs": [0.2, 0.3, 0.5], "labels": labels}
            for i, (t, lab) in enumerate([("好开心", "positive"), ("真糟糕", "negative")])]
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    # Without --weights: one line, exit 2, nothing loaded.
    rc = cli.main(["--predictions", str(preds), "--out", str(tmp_path / "o"), "--labeller", "zeroshot"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "error: --labeller zeroshot needs --weights SPEC (e.g. gguf:smollm2)"
    # A bad spec is one line too.
    rc = cli.main(["--predictions", str(preds), "--out", str(tmp_path / "o"), "--labeller", "zeroshot",
                   "--weights", "random:no-such-preset"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "no-such-preset" in err
    monkeypatch.setattr(model_labeller, "resolve_weights", lambda spec, dtype=None: weights)
    rc = cli.main(["--predictions", str(preds), "--out", str(tmp_path / "o"), "--labeller", "zeroshot",
                   "--weights", SPEC])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "o" / "metrics.json").read_text(encoding="utf-8"))
    assert m["labeller"] == "zeroshot"
    assert sum(m["per_event"][0]["generated"]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- cached path (score_words)

# Prompts of different lengths (one over 64 tokens: two length buckets) and label words of 1 to 5 tokens.
PROMPTS = ["今天天气很好", "情感倾向：", "a much longer English prompt to force different lengths in one batch",
           "好", "这部电影太好看了，" * 16, "x y z", "真糟糕"]
WORDS = ["积极", "消极的", "中性情绪", "中性情绪非常复杂的"]


@functools.lru_cache(maxsize=None)
def _peaked(routing):
    """tiny-qwen2 with its matrices x4 (peaked logits, so prompts matter) and, unless routing is None,
    PAC-LoRA adapters with random B and sharp gates (so the adapters and their routing matter)."""
    w = resolve_weights(SPEC)
    params = jax.tree_util.tree_map(lambda a: a * 4.0 if a.ndim >= 2 else a, w.params)
    if routing is None:
        return w, params, None, None
    lc = LoraConfig(num_analyze=3, num_compose=2, rank=4, alpha=8.0, gate_width=16, routing=routing,
                    num_classes=3, targets=("q", "v", "o", "down"))
    rng = np.random.default_rng(0)

    def perturb(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        if "B" in names:
            return jnp.asarray(rng.normal(0, 0.3, leaf.shape), jnp.float32)
        return 4.0 * leaf if "w1" in names or "w2" in names else leaf

    ad = jax.tree_util.tree_map_with_path(perturb, decoder.init_adapters(jax.random.PRNGKey(0), w.cfg, lc))
    return w, params, ad, lc


def _pair_reference(w, params, ad, lc, prompts, words, chat):
    """[N, K]: scoring.score_examples (one full forward per pair) on pairs tokenised here."""
    enc = functools.partial(w.tokenizer.encode, add_special_tokens=False)
    examples = []
    for p in prompts:
        if chat:
            p = chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for c in words:
            examples.append(scoring.Example({}, enc(p) + enc(c), len(enc(p))))
    rows = scoring.score_examples(params, w.cfg, examples, batch_size=5, pad_id=w.tokenizer.pad_token_id,
                                  adapters=ad, lora_cfg=lc)
    return np.array([r["sum_logprob"] for r in rows]).reshape(len(prompts), len(words))


@pytest.mark.parametrize("routing", [None, "token", "pooled"], ids=["base", "lora-token", "lora-pooled"])
def test_cached_word_scores_equal_full_forward_pairs(routing):
    """Measured |cached - pairs| <= 5e-6 on sums up to 64 nats. The labeller's prompts have no user/news
    spans, so token and pooled adapters route alike; pooled still takes the cache's stored-gate branch."""
    w, params, ad, lc = _peaked(routing)
    lens = {len(w.tokenizer.encode(c, add_special_tokens=False)) for c in WORDS}
    assert lens == {1, 2, 3, 5}, lens  # 5 columns; one word is its first token only
    p_lens = [len(w.tokenizer.encode(p, add_special_tokens=False)) for p in PROMPTS]
    assert max(p_lens) > scoring.BUCKET > min(p_lens)
    for chat, batch_size in ((True, 4), (False, 16)):  # 7 prompts: batches of 4 and 3 (+1 filler row); 7 of 8
        fn = model_score_fn(params, w.cfg, w.tokenizer, batch_size=batch_size, chat=chat, adapters=ad, lora_cfg=lc)
        got = fn.score_words(PROMPTS, WORDS)
        want = _pair_reference(w, params, ad, lc, PROMPTS, WORDS, chat)
        assert got.shape == (len(PROMPTS), len(WORDS)) and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)
        assert np.ptp(want, axis=0).max() > 1.0  # the prompt matters: a wrong prompt row would show
    if ad is not None:  # and the adapters matter: the base model's scores differ
        base = model_score_fn(params, w.cfg, w.tokenizer, batch_size=4, chat=False).score_words(PROMPTS, WORDS)
        assert np.abs(base - got).max() > 0.1
    # One word and one prompt (the whole batch is a filler but one row); no prompts at all.
    np.testing.assert_allclose(fn.score_words(PROMPTS[:1], WORDS[1:2]), want[:1, 1:2], rtol=1e-5, atol=5e-5)
    assert fn.score_words([], WORDS).shape == (0, len(WORDS))


def test_cached_labeller_probs_equal_pair_path(weights, monkeypatch):
    """The labeller asks score_words (no pair forward at all) and gets the pair path's probabilities."""
    w, params, _, _ = _peaked(None)
    monkeypatch.setattr(model_labeller, "resolve_weights", lambda spec, dtype=None: w._replace(params=params))
    texts = ["这部电影太好看了", "真糟糕，再也不来了", "今天开会", "好" * 80, "一般般吧"]
    old = zero_shot_labeller(SPEC, batch_size=4, cached=False)
    new = zero_shot_labeller(SPEC, batch_size=4)
    assert not hasattr(old.score_fn, "score_words") and hasattr(new.score_fn, "score_words")
    want = old.probs(texts)
    calls = []
    real = scoring.score_examples
    monkeypatch.setattr(model_labeller.scoring, "score_examples",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    got = new.probs(texts)
    assert calls == [] and got.shape == (len(texts), 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.ptp(want, axis=0).max() > 0.01  # texts get different probabilities
    assert new.label(texts) == old.label(texts)


def test_cached_errors_are_the_pair_paths(weights):
    """score_words raises the pair path's one-line UserError, for the same pair index."""
    fn = model_score_fn(weights.params, weights.cfg, weights.tokenizer, chat=False)
    small = model_score_fn(weights.params, dataclasses.replace(weights.cfg, vocab_size=100), weights.tokenizer,
                           chat=False)
    cases = [(fn, ["a", "b"], ["x", ""], "pair 1: field 'continuation' is empty"),
             (fn, ["a", ""], ["x", "y"], "pair 2: field 'prompt' is empty"),
             (small, ["a"], ["x", "中性"], "pair 1: token id \\d+ is outside the model vocabulary \\(100\\)")]
    for f, prompts, words, msg in cases:
        with pytest.raises(UserError, match=msg) as pair_err:
            f([p for p in prompts for _ in words], [c for _ in prompts for c in words])
        with pytest.raises(UserError, match=msg) as words_err:
            f.score_words(prompts, words)
        assert str(words_err.value) == str(pair_err.value) and "\n" not in str(words_err.value)


class _CharTokenizer:
    """One id per character (ord mod 997, + 1): any text in, ids inside a 1000-token vocabulary."""
    pad_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) % 997 + 1 for ch in text]


def test_cached_word_scores_match_hf_qwen2(tmp_path):
    """The cached scores of an imported HF Qwen2 equal transformers' own log-probs of the pair."""
    torch = pytest.importorskip("torch", reason="torch (CPU) is needed for the HF transformers reference")
    pytest.importorskip("transformers")
    from socialalign_jax.weights.hf import load_hf_checkpoint
    from tests.helpers_hf import make_hf_model, save_hf_model

    model = make_hf_model("qwen2", seed=3, vocab=1000)
    save_hf_model(model, tmp_path)
    cfg, params = load_hf_checkpoint(tmp_path)
    tok = _CharTokenizer()
    prompts, words = ["今天天气很好", "a longer prompt, " * 5, "x"], ["积极", "消极的", "neutral"]
    got = model_score_fn(params, cfg, tok, batch_size=2).score_words(prompts, words)
    want = np.zeros_like(got)
    for i, p in enumerate(prompts):
        p_ids = tok.encode(chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
        for j, c in enumerate(words):
            ids = p_ids + tok.encode(c)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, -1).numpy()
            want[i, j] = sum(logp[t - 1, ids[t]] for t in range(len(p_ids), len(ids)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
