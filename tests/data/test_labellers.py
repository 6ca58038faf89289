"""Labellers: SnowNLP lexicon on unambiguous sentences, zero-shot with a controlled fake scorer, the
char n-gram labeller against scikit-learn and on human-labelled Weibo text, the registry."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from socialalign_jax.data.labellers import (LABELLERS, NGRAM_MODEL, ZERO_SHOT_PROMPT, ZERO_SHOT_WORDS,
                                            LexiconLabeller, NgramLabeller, ZeroShotLabeller, describe,
                                            make_labeller, normalize_weibo)

ROOT = Path(__file__).resolve().parents[2]
FIT_SCRIPT = ROOT / "scripts" / "fit_labeller.py"


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


def test_zero_shot_prefers_score_words():
    """A scorer offering score_words(prompts, words) -> [N, K] gets each prompt once, with all words."""
    calls = []

    def score_fn(prompts, conts):
        raise AssertionError("the pair path must not be used when score_words is offered")

    def score_words(prompts, words):
        calls.append((list(prompts), list(words)))
        return np.array([[-1.0 if f"选{w}" in p else -5.0 for w in words] for p in prompts])

    score_fn.score_words = score_words
    zs = ZeroShotLabeller(score_fn)
    texts = ["选积极", "选消极", "选中性"]
    assert zs.label(texts) == ["positive", "negative", "neutral"]
    assert calls == [([ZERO_SHOT_PROMPT.format(text=t) for t in texts], ["消极", "中性", "积极"])]
    assert zs.probs(["选积极"])[0][2] == pytest.approx(np.exp(4) / (np.exp(4) + 2))
    score_fn.score_words = lambda p, w: np.zeros((len(p) * len(w),))
    with pytest.raises(ValueError, match=r"score_words returned shape \(3,\), expected \(1, 3\)"):
        zs.probs(["a"])
    score_fn.score_words = lambda p, w: np.full((len(p), len(w)), np.inf)
    with pytest.raises(ValueError, match="non-finite"):
        zs.probs(["a"])


# ----------------------------------------------------------------------------- char n-gram labeller

def _fit_script():
    spec = importlib.util.spec_from_file_location("fit_labeller", FIT_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY = [  # (text, label): a fixture in the formats the labeller meets (emoticons, weibo2018 hashtags, full width)
    ("太好了，开心[哈哈]", "positive"), ("喜欢喜欢，超级棒！", "positive"), ("{%#好消息#%} 恭喜恭喜[鼓掌]", "positive"),
    ("今天天气真好，开心", "positive"), ("ＧＯＯＤ！赞赞赞", "positive"), ("谢谢大家，幸福[爱你]", "positive"),
    ("气死我了，太恶心了", "negative"), ("垃圾，骗子[怒]", "negative"), ("太糟糕了，很生气", "negative"),
    ("难过，想哭[泪]", "negative"), ("恶心的造谣者 @某人 滚", "negative"), ("失望透顶 http://t.cn/abc", "negative"),
    ("明天下午三点开会。", "neutral"), ("该地区今日发布天气预报。", "neutral"), ("他去了上海。", "neutral"),
    ("会议在北京举行", "neutral"), ("数据来自国家统计局", "neutral"), ("列车于八点出发", "neutral"),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small scikit-learn pipeline fitted here, and its export read back by NgramLabeller."""
    pytest.importorskip("sklearn")
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    texts, labels = zip(*TINY)
    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), preprocessor=normalize_weibo, token_pattern=None,
                          sublinear_tf=True, norm="l2", min_df=1)
    clf = LogisticRegression(C=10.0, max_iter=1000).fit(vec.fit_transform(texts), labels)
    path = tmp_path_factory.mktemp("ngram") / "tiny.npz"
    _fit_script().export(vec, clf, path, {"fixture": "tiny"})
    return vec, clf, NgramLabeller(path)


def test_ngram_numpy_matches_sklearn(tiny_model):
    vec, clf, ng = tiny_model
    assert ng.labels == tuple(clf.classes_) == ("negative", "neutral", "positive")
    queries = [t for t, _ in TINY] + ["开心开心[哈哈]！", "真恶心", "下午去上海开会", "Ｇｏｏｄ　ｎｅｗｓ {%#北京#%}",
                                      "好" * 3000, "开心" * 1500 + "生气"]  # the last two: read up to MAX_LABEL_CHARS
    x = vec.transform(queries)
    assert (np.diff(x.indptr) > 0).all()  # every query has a known n-gram (else neutral by rule)
    np.testing.assert_allclose(ng.probs(queries), clf.predict_proba(x), atol=1e-6)
    assert ng.label(queries) == list(clf.predict(x))
    # chunked the same as whole
    ng.chunk = 4
    np.testing.assert_allclose(ng.probs(queries), clf.predict_proba(x), atol=1e-6)


def test_ngram_nothing_to_read_is_neutral(tiny_model):
    _, _, ng = tiny_model
    empty = ["", "   ", "\u200b\n", "@某某某", "http://t.cn/xyz", "{%网页链接%}", "😶"]  # 😶: not in the fixture's vocabulary
    p = ng.probs(empty)
    np.testing.assert_array_equal(p, np.tile([0.0, 1.0, 0.0], (len(empty), 1)))
    assert ng.label(empty) == ["neutral"] * len(empty)
    assert ng.probs([]).shape == (0, 3) and ng.label([]) == []


def test_normalize_weibo():
    assert normalize_weibo("{%#静下心来#%} “书”，【标题】[哈哈]ＡＢＣ！ http://t.cn/abc 好") == '#静下心来# "书",《标题》《哈哈》abc! 好'
    assert normalize_weibo("回复@小明:你说的对、真的") == "你说的对,真的"
    assert normalize_weibo("看{%上海·川沙新镇%}\u200b  了") == "看 了"
    assert normalize_weibo(" \n\t ") == ""


@pytest.fixture(scope="module")
def bundled():
    return NgramLabeller()


def test_bundled_model_file(bundled):
    assert NGRAM_MODEL.is_file() and NGRAM_MODEL.stat().st_size < 3_000_000
    with np.load(NGRAM_MODEL, allow_pickle=False) as z:  # no object arrays
        assert all(z[k].dtype != object for k in z.files)
    assert bundled.labels == ("negative", "neutral", "positive") and bundled.ngram_range == (1, 3)
    assert bundled.meta["script"] == "scripts/fit_labeller.py" and "hyperparameters" in bundled.meta
    assert bundled.source.startswith("ngram: char 1-3 TF-IDF + logistic regression")
    assert "docs/labellers.md" in bundled.source and bundled.sha256[:12] in bundled.source
    pyproject = (ROOT / "pyproject.toml").read_text("utf-8")
    assert '"labeller_models/*.npz"' in pyproject  # shipped as package data


def test_bundled_model_clear_cases(bundled):
    # Hand-written, labelled by a person as unambiguous before the model was run on them.
    pos = ["太好了，开心[哈哈]", "这部电影太好看了，我非常喜欢！", "恭喜恭喜！祝你们幸福[爱你]", "谢谢医护人员，辛苦了，致敬[心]"]
    neg = ["气死我了，太恶心了", "太糟糕了，我很生气，真是垃圾。", "造谣的人太可恶了，应该严惩！[怒]", "好难过，心都碎了[泪]"]
    assert bundled.label(pos) == ["positive"] * len(pos)
    assert bundled.label(neg) == ["negative"] * len(neg)
    assert bundled.label(["", "  ", "\u200b"]) == ["neutral"] * 3
    p = bundled.probs(pos + neg)
    np.testing.assert_allclose(p.sum(-1), 1.0)


# ----------------------------------------------------------------------------- registry

def test_registry_names_and_sources():
    assert set(LABELLERS) == {"snownlp", "ngram"}
    assert isinstance(make_labeller("ngram"), NgramLabeller)
    pytest.importorskip("snownlp")
    for name in ("snownlp", "lexicon"):
        lab = make_labeller(name)
        assert isinstance(lab, LexiconLabeller) and lab.name == "lexicon"  # the name metadata already records
    assert describe("lexicon") == describe("snownlp") and describe("snownlp").startswith("snownlp: SnowNLP")
    assert "1/3 and 2/3" in describe("snownlp") and "0.4 and 0.7" in LexiconLabeller(thresholds=(0.4, 0.7)).source
    assert describe("ngram") == NgramLabeller().source


def test_registry_refuses_unknown_names_in_one_line():
    with pytest.raises(ValueError) as e:
        make_labeller("vader")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("unknown labeller 'vader': choose from ")
    assert all(n in msg for n in ("ngram", "snownlp", "lexicon"))
    with pytest.raises(ValueError, match="unknown labeller"):
        describe("")


# ----------------------------------------------------------------------------- fitting script, real data

def test_fit_script_refuses_a_missing_data_folder_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(FIT_SCRIPT), "--data", str(tmp_path / "absent"), "--out",
                          str(tmp_path / "m.npz")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"error: data folder {tmp_path / 'absent'} not found")
    assert out.stdout == "" and not (tmp_path / "m.npz").exists()
    (tmp_path / "half" / "weibo2018").mkdir(parents=True)
    out = subprocess.run([sys.executable, str(FIT_SCRIPT), "--data", str(tmp_path / "half")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "lacks weibo2018/train.txt" in out.stderr


def shared_data() -> Path:
    """$SOCIALALIGN_SHARED/data, else ../shared/data beside the repository root (skip when absent)."""
    env = os.environ.get("SOCIALALIGN_SHARED")
    data = Path(env) / "data" if env else ROOT.parent / "shared" / "data"
    if not (data / "weibo2018").is_dir() or not (data / "smp2020_ewect" / "clean").is_dir():
        pytest.skip(f"{data} has no weibo2018/ and smp2020_ewect/clean/")
    return data


def _docs_macro_f1(test_file: str, labeller: str) -> float:
    """The macro-F1 docs/labellers.md reports for (test file, labeller row)."""
    rx = re.compile(rf"^\| {re.escape(test_file)} \| \d+ \| {re.escape(labeller)} \| ([0-9.]+) \[", re.M)
    m = rx.search((ROOT / "docs" / "labellers.md").read_text("utf-8"))
    assert m, f"docs/labellers.md has no row for {test_file} / {labeller}"
    return float(m[1])


@pytest.mark.parametrize("test_file,row,classes", [
    ("ewect/usual_test", "ngram", (0, 1, 2)), ("ewect/virus_test", "ngram", (0, 1, 2)),
    ("weibo2018/test", "ngram, neutral counted wrong", (0, 2))])
def test_bundled_model_scores_what_the_docs_say(bundled, test_file, row, classes):
    data = shared_data()
    fit = _fit_script()
    texts, gold, _ = fit.read_split(data, test_file)
    x, y = fit.kept(texts, gold)
    f1, _ = fit.scores(y, bundled.probs(x).argmax(-1), classes)
    assert f1 >= _docs_macro_f1(test_file, row) - 0.005
