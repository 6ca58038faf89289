"""BM25 scores against a hand computation, and history cleaning rules."""

import math

import numpy as np

from socialalign_jax.data.bm25 import BM25, bm25_scores, is_hashtag_only, select_history, tokenize
from socialalign_jax.data.records import HistoryPost


def test_scores_match_hand_computation():
    docs = ["apple banana apple", "banana cherry", "cherry durian egg fig"]
    assert [tokenize(d) for d in docs] == [["apple", "banana", "apple"], ["banana", "cherry"],
                                           ["cherry", "durian", "egg", "fig"]]
    # N = 3, avgdl = (3 + 2 + 4) / 3 = 3, k1 = 1.5, b = 0.75
    idf_apple = math.log((3 - 1 + 0.5) / (1 + 0.5) + 1)   # df = 1
    idf_cherry = math.log((3 - 2 + 0.5) / (2 + 0.5) + 1)  # df = 2
    expected = [
        idf_apple * 2 * 2.5 / (2 + 1.5 * (0.25 + 0.75 * 3 / 3)),   # apple tf 2, |d| = 3
        idf_cherry * 1 * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 2 / 3)),  # cherry tf 1, |d| = 2
        idf_cherry * 1 * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 4 / 3)),  # cherry tf 1, |d| = 4
    ]
    np.testing.assert_allclose(bm25_scores(docs, "apple cherry"), expected, rtol=1e-12)
    # A repeated query term counts twice; an unseen term adds nothing.
    np.testing.assert_allclose(bm25_scores(docs, "apple apple zebra"), [2 * expected[0], 0, 0], rtol=1e-12)


def test_idf_positive_when_term_in_every_doc():
    s = BM25([["a"], ["a", "b"]]).scores(["a"])
    assert np.all(s > 0)


def test_chinese_words_via_jieba():
    words = tokenize("北京发生了地震，大家注意安全！")
    assert "地震" in words and "北京" in words and "，" not in words and "！" not in words


def test_select_history_cleaning_and_order():
    posts = [
        HistoryPost("今天吃了火锅"),
        HistoryPost("#地震# #祈福#"),                      # hashtag-only: dropped
        HistoryPost("地震来了，房子在晃，地震好可怕"),
        HistoryPost("我的目标微博：地震"),                  # the target: never in its own history
        HistoryPost("#地震#", retweet="四川发生地震"),      # tags but retweets content: kept
        HistoryPost("周末去爬山"),
        HistoryPost("   "),                                # empty: dropped
    ]
    out = select_history(posts, "四川发生6级地震", k=3, exclude_text="我的目标微博：地震")
    texts = [p.text for p in out]
    assert "#地震# #祈福#" not in texts and "我的目标微博：地震" not in texts and "   " not in texts
    assert len(out) == 3
    assert out[0].retweet == "四川发生地震"           # matches 四川, 发生 and 地震
    assert out[1].text.startswith("地震来了")
    assert out[2].text == "今天吃了火锅"               # score 0: ties keep timeline order
    assert len(select_history(posts, "地震", k=10, exclude_text="我的目标微博：地震")) == 4
    assert is_hashtag_only(HistoryPost("#a##b#")) and not is_hashtag_only(HistoryPost("#a# 真的"))


def test_several_wordings_rank_by_the_summed_score_whatever_their_order():
    docs = ["apple banana apple", "banana cherry", "cherry durian egg fig"]
    posts = [HistoryPost(d) for d in docs]
    # The hand computation of test_scores_match_hand_computation: apple reaches doc 0 only,
    # cherry docs 1 and 2 (N = 3, avgdl = 3, k1 = 1.5, b = 0.75).
    idf_apple, idf_cherry = math.log(2.5 / 1.5 + 1), math.log(1.5 / 2.5 + 1)
    apple = [idf_apple * 2 * 2.5 / (2 + 1.5), 0.0, 0.0]
    cherry = [0.0, idf_cherry * 2.5 / (1 + 1.5 * 0.75), idf_cherry * 2.5 / (1 + 1.5 * 1.25)]
    assert cherry[1] < apple[0] < 3 * cherry[1]
    # One wording: plain BM25. Against "cherry cherry cherry" and "apple" the sums are
    # doc 0: apple[0], doc 1: 3 cherry[1], doc 2: 3 cherry[2] -> doc 1, then doc 0, then doc 2.
    totals = [apple[i] + 3 * cherry[i] for i in range(3)]
    want = [docs[i] for i in sorted(range(3), key=lambda i: -totals[i])]
    assert want == ["banana cherry", "apple banana apple", "cherry durian egg fig"]
    for wordings in (["cherry cherry cherry", "apple"], ["apple", "cherry cherry cherry"]):
        assert [p.text for p in select_history(posts, wordings, k=3)] == want
    assert [p.text for p in select_history(posts, "apple", k=1)] == ["apple banana apple"]
    assert [p.text for p in select_history(posts, ["apple"], k=2)] == [p.text for p in select_history(posts, "apple", k=2)]
