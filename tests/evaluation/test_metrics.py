"""Micro and macro metrics against hand-computed values, sacrebleu and scipy."""

import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from socialalign_jax.evaluation import distributions as D
from socialalign_jax.evaluation import metrics as M
from socialalign_jax.evaluation.plots import gate_statistic
from socialalign_jax.evaluation.report import flatten, format_table, json_clean


def test_chinese_rouge_by_hand():
    # ref 今 天 天 气 很 好 / hyp 天 气 今 天 很 好 (6 characters each).
    # ROUGE-L: the LCS is "天气很好" (or "今天很好"), length 4; no 5-character common subsequence
    #   exists (dropping any one hyp character leaves 今 after 气 or 天, out of ref order),
    #   so P = R = 4/6 and F = 2/3.
    # ROUGE-1: both are the multiset {今, 天, 天, 气, 很, 好}: overlap 6, F = 1.
    # ROUGE-2: ref {今天, 天天, 天气, 气很, 很好}, hyp {天气, 气今, 今天, 天很, 很好}: overlap 3 of 5, F = 0.6.
    ref, hyp = "今天天气很好", "天气今天很好"
    assert M.rouge_l(ref, hyp)["f"] == pytest.approx(2 / 3)
    assert M.rouge_l(ref, hyp)["precision"] == pytest.approx(4 / 6)
    assert M.rouge_n(ref, hyp, 1)["f"] == pytest.approx(1.0)
    assert M.rouge_n(ref, hyp, 2)["f"] == pytest.approx(0.6)


def test_rouge_ignores_whitespace_and_clips_counts():
    assert M.chars(" 今天 天气\n很好 ") == list("今天天气很好")
    assert M.rouge_l("今天 天气", "今天天气")["f"] == pytest.approx(1.0)
    # hyp 哈哈哈哈 vs ref 哈好: the single 哈 of the ref matches once (clipped): P = 1/4, R = 1/2, F = 1/3.
    r1 = M.rouge_n("哈好", "哈哈哈哈", 1)
    assert (r1["precision"], r1["recall"], r1["f"]) == pytest.approx((0.25, 0.5, 1 / 3))
    # Unequal lengths for ROUGE-L: ref ABCDE, hyp ACE -> LCS 3, P = 1, R = 3/5, F = 2*0.6/1.6 = 0.75.
    assert M.rouge_l("ABCDE", "ACE")["f"] == pytest.approx(0.75)
    assert M.rouge_l("今天", "")["f"] == 0.0


def test_corpus_rouge_is_mean_of_pair_scores():
    out = M.corpus_rouge(["今天天气很好", "好"], ["天气今天很好", "好"])
    assert out["rougeL"] == pytest.approx((2 / 3 + 1) / 2)
    assert out["rouge2"] == pytest.approx((0.6 + 0.0) / 2)  # "好" has no bigram: F = 0
    with pytest.raises(ValueError):
        M.corpus_rouge(["a"], [])


def test_bleu_zh():
    # sacrebleu documents BLEU 100 for an exact match.
    assert M.corpus_bleu(["今天天气很好"], ["今天天气很好"]) == pytest.approx(100.0)
    # hyp 今天天气不好 vs ref 今天天气很好, one character per token:
    #   1-grams 5/6, 2-grams 3/5 (今天 天天 天气), 3-grams 2/4 (今天天 天天气), 4-grams 1/3 (今天天气);
    #   equal lengths so BP = 1; BLEU = 100 * (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = 100 * (1/12) ** 0.25.
    assert M.corpus_bleu(["今天天气很好"], ["今天天气不好"]) == pytest.approx(100 * (1 / 12) ** 0.25)
    # A hypothesis that is a 6-character prefix of a 7-character reference: every precision is 1,
    #   BP = exp(1 - 7/6).
    assert M.corpus_bleu(["今天天气很好啊"], ["今天天气很好"]) == pytest.approx(100 * math.exp(1 - 7 / 6))


def test_distinct_by_hand():
    # unigrams: 哈 哈 哈 | 哈 哈 好 -> 2 unique of 6; bigrams: 哈哈 哈哈 | 哈哈 哈好 -> 2 of 4
    # (no bigram spans the two texts).
    assert M.distinct_n(["哈哈哈", "哈哈 好"], 1) == pytest.approx(2 / 6)
    assert M.distinct_n(["哈哈哈", "哈哈 好"], 2) == pytest.approx(2 / 4)
    assert math.isnan(M.distinct_n(["哈"], 2))


def test_accuracy_and_macro_f1_by_hand():
    gold = ["negative", "negative", "positive", "neutral"]
    pred = ["negative", "positive", "positive", "positive"]
    assert M.accuracy(gold, pred) == pytest.approx(0.5)
    # negative: TP 1 FP 0 FN 1 -> 2/3; positive: TP 1 FP 2 FN 0 -> 1/2; neutral: TP 0 FN 1 -> 0.
    f1, classes = M.macro_f1(gold, pred)
    assert f1 == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert classes == ["negative", "neutral", "positive"]
    # A class absent from gold and predictions does not count as 0.
    f1, classes = M.macro_f1(["negative", "positive"], ["negative", "positive"])
    assert (f1, classes) == (1.0, ["negative", "positive"])


def test_perplexity_is_token_weighted():
    # exp(-(-2 - 4) / (1 + 3)) = e^1.5, not the mean of e^2 and e^(4/3).
    assert M.perplexity([-2.0, -4.0], [1, 3]) == pytest.approx(math.exp(1.5))
    assert math.isnan(M.perplexity([], []))


def test_jsd_matches_scipy():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(3), size=5), rng.dirichlet(np.ones(3), size=5)
    for a, b in zip(p, q):
        # scipy returns the square root of the divergence (natural log by default).
        assert D.jsd(a, b) == pytest.approx(jensenshannon(a, b) ** 2, abs=1e-12)
    np.testing.assert_allclose(D.jsd(p, q), jensenshannon(p, q, axis=1) ** 2, atol=1e-12)
    assert D.jsd([1, 0, 0], [0, 0.5, 0.5]) == pytest.approx(math.log(2))  # disjoint supports
    assert D.jsd([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == pytest.approx(0.0, abs=1e-15)
    assert D.jsd([2, 2, 0], [0.5, 0.5, 0]) == pytest.approx(0.0, abs=1e-15)  # normalised first


def test_kl_matches_scipy_with_smoothing():
    eps = 1e-6
    real, pred = np.array([0.5, 0.5, 0.0]), np.array([0.0, 0.4, 0.6])
    sm = lambda x: (x + eps) / (1 + 3 * eps)  # noqa: E731
    assert D.kl(real, pred, eps) == pytest.approx(entropy(sm(real), sm(pred)), rel=1e-12)
    assert np.isfinite(D.kl(real, pred, eps))
    a, b = np.array([0.1, 0.2, 0.7]), np.array([0.3, 0.3, 0.4])
    assert D.kl(a, b, 0.0) == pytest.approx(entropy(a, b), rel=1e-12)


def test_tv_by_hand_and_validation():
    # 1/2 (|0.5-0.2| + |0.5-0.3| + |0-0.5|) = 1/2 (0.3 + 0.2 + 0.5) = 0.5
    assert D.total_variation([0.5, 0.5, 0.0], [0.2, 0.3, 0.5]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        D.jsd([0.5, -0.1, 0.6], [1 / 3] * 3)
    with pytest.raises(ValueError):
        D.total_variation([0, 0, 0], [1 / 3] * 3)


def test_summarise_mean_and_weighted():
    per = [{"jsd": 0.1, "kl": 1.0, "tv": 0.2}, {"jsd": 0.3, "kl": 2.0, "tv": 0.4}]
    s = D.summarise(per, [1, 3])
    assert s["jsd_mean"] == pytest.approx(0.2)
    assert s["jsd_weighted"] == pytest.approx((0.1 + 0.9) / 4)
    assert s["kl_weighted"] == pytest.approx((1 + 6) / 4)
    assert s["num_events"] == 2


def test_gate_statistic():
    w = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 1.0, 1.0]])
    np.testing.assert_allclose(gate_statistic(w, "max")[[0, 1, 3]], [0.5, 1.0, 0.5])
    np.testing.assert_allclose(gate_statistic(w, "entropy")[[0, 1, 3]],
                               [math.log(2), 0.0, entropy([0.5, 0.25, 0.25])])
    assert np.isnan(gate_statistic(w, "max")[2]) and np.isnan(gate_statistic(w, "entropy")[2])
    with pytest.raises(ValueError):
        gate_statistic(w, "mean")


def test_report_table_with_baseline():
    cur = {"micro": {"bleu": 30.0, "perplexity": float("nan")}, "macro": {"head": {"jsd_mean": 0.1}}}
    base = {"micro": {"bleu": 25.5}, "macro": {"head": {"jsd_mean": 0.15}}}
    assert json_clean(cur)["micro"]["perplexity"] is None
    assert flatten(cur) == {"micro.bleu": 30.0, "micro.perplexity": None, "macro.head.jsd_mean": 0.1}
    table = format_table(cur, base).splitlines()
    assert table[2] == "| micro.bleu | 30.0000 | 25.5000 | +4.5000 |"
    assert table[3] == "| micro.perplexity | n/a | n/a | n/a |"
    assert table[4] == "| macro.head.jsd_mean | 0.1000 | 0.1500 | -0.0500 |"


def test_metrics_md_shows_markup_from_the_data_as_text(tmp_path):
    """Event text and label names come from the data: rendered as Markdown (with HTML, as many viewers do),
    a '<script>' or an '<img onerror>' in them is text on the page, never an element."""
    from html.parser import HTMLParser

    markdown_it = pytest.importorskip("markdown_it")
    from socialalign_jax.evaluation.report import write_report

    evil = '<script>alert(1)</script> & <img src=x onerror="alert(2)"> | 新闻'
    metrics = {"micro": {"accuracy": 0.5}, "labels": ["neg<b>", "pos"],
               "per_event": [{"event_id": "<i>7</i>", "event": evil, "n": 2, "real": [0.5, 0.5],
                              "head": [0.4, 0.6], "head_jsd": 0.01}]}
    write_report(metrics, str(tmp_path))
    html = markdown_it.MarkdownIt("commonmark", {"html": True}).enable("table").render(
        (tmp_path / "metrics.md").read_text(encoding="utf-8"))

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.text = set(), []

        def handle_starttag(self, tag, attrs):
            self.tags.add(tag)

        def handle_data(self, data):
            self.text.append(data)

    parsed = Tags()
    parsed.feed(html)
    assert not parsed.tags & {"script", "img", "b", "i"}, parsed.tags
    text = "".join(parsed.text)
    assert evil in text and "neg<b>/pos" in text and "<i>7</i>" in text
