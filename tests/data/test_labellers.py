"""Labellers: SnowNLP lexicon on unambiguous sentences, zero-shot with a controlled fake scorer."""

import numpy as np
import pytest

from socialalign_jax.data.labellers import (ZERO_SHOT_PROMPT, ZERO_SHOT_WORDS, LexiconLabeller,
                                                  ZeroShotLabeller)


@pytest.fixture(scope="module")
def lexicon():
    pytest.importorskip("snownlp")
    return LexiconLabeller()


def test_lexicon_unambiguous(lexicon):
    texts = ["这部电影太好看了，我非常喜欢！", "支持！加油！", "太糟糕了，我很生气，真是垃圾。", "太恶心了", "他去了上海。", "   "]
    assert lexicon.label(texts) == ["positive", "positive", "negative", "negative", "neutral", "neutral"]


def test_lexicon_probs_follow_the_score(lexicon):
    texts = ["这部电影太好看了，我非常喜欢！", "太糟糕了，我很生气，真是垃圾。", "他去了上海。"]
    s = lexicon.scores(texts)
    p = lexicon.probs(texts)
    np.testing.assert_allclose(p.sum(-1), 1.0)
    np.testing.assert_allclose(p, np.stack([(1 - s) ** 2, 2 * s * (1 - s), s ** 2], -1))
    # With the default thresholds 1/3, 2/3 the label is the argmax of probs.
    assert lexicon.label(texts) == [lexicon.labels[i] for i in p.argmax(-1)]
    assert lexicon.probs([]).shape == (0, 3)


def test_lexicon_thresholds(lexicon):
    s = float(lexicon.scores(["他去了上海。"])[0])  # about 0.44
    assert LexiconLabeller(thresholds=(s + 0.01, 0.9)).label(["他去了上海。"]) == ["negative"]
    assert LexiconLabeller(thresholds=(0.1, s - 0.01)).label(["他去了上海。"]) == ["positive"]
    with pytest.raises(ValueError):
        LexiconLabeller(thresholds=(0.7, 0.3))


def test_zero_shot_with_fake_scorer():
    calls = []

    def score_fn(prompts, conts):
        # A fake model: log p(word) is -1 for the word named in the text ("选X"), -5 otherwise.
        calls.append((list(prompts), list(conts)))
        return np.array([-1.0 if f"选{c}" in p else -5.0 for p, c in zip(prompts, conts)])

    zs = ZeroShotLabeller(score_fn)
    texts = ["选积极", "选消极", "选中性"]
    assert zs.label(texts) == ["positive", "negative", "neutral"]
    assert len(calls) == 1  # one batched call for all texts and label words
    prompts, conts = calls[0]
    assert conts == ["消极", "中性", "积极"] * 3
    assert prompts[0] == prompts[2] == ZERO_SHOT_PROMPT.format(text="选积极")
    assert "选积极" in prompts[0] and prompts[0].endswith("情感倾向：")
    p = zs.probs(["选积极"])[0]
    # softmax of (-5, -5, -1): positive gets e^4 / (e^4 + 2)
    assert p[2] == pytest.approx(np.exp(4) / (np.exp(4) + 2))
    assert p[0] == pytest.approx(p[1])
    assert tuple(ZERO_SHOT_WORDS) == zs.labels == ("negative", "neutral", "positive")


def test_zero_shot_rejects_bad_scores():
    with pytest.raises(ValueError, match="shape"):
        ZeroShotLabeller(lambda p, c: np.zeros(2)).probs(["a"])
    with pytest.raises(ValueError, match="non-finite"):
        ZeroShotLabeller(lambda p, c: np.full(len(p), np.nan)).probs(["a"])
    with pytest.raises(ValueError, match="text"):
        ZeroShotLabeller(lambda p, c: np.zeros(len(p)), template="no placeholder")
