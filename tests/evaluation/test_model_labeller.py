"""Model-backed zero-shot labeller: scores against a numpy log-softmax of decoder.forward's logits."""

import numpy as np
import pytest

from socialalign_jax.core.labels import DEFAULT_LABELS
from socialalign_jax.data.labellers import ZERO_SHOT_PROMPT, ZERO_SHOT_WORDS
from socialalign_jax.evaluation.model_labeller import model_score_fn, zero_shot_labeller
from socialalign_jax.model import decoder
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
    zs = zero_shot_labeller(SPEC, batch_size=2)  # 3 label words -> 2 batches, one with a filler row
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
