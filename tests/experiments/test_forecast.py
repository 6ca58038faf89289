"""Crowd forecasts beside the head: the char n-gram baseline against scikit-learn, the shrink toward the
prior, and the runner's forecast rows (inner cross-validation inside the training events only)."""

import json

import numpy as np
import pytest

from socialalign_jax.core import atomic_io
from socialalign_jax.core.divergence import jensen_shannon
from socialalign_jax.core.labels import DEFAULT_LABELS
from socialalign_jax.experiments import features as F
from socialalign_jax.experiments import forecast as FC
from socialalign_jax.experiments import runner
from socialalign_jax.evaluation import skill as SK

sk_text = pytest.importorskip("sklearn.feature_extraction.text")
sk_linear = pytest.importorskip("sklearn.linear_model")


# ----------------------------------------------------------------------------- n-grams and the classifier

DOCS = ["今天天气很好 我们去公园", "天气不好，心情很坏[怒]", "公园里人很多 很好玩", "坏消息：地铁停运了",
        "好消息！地铁恢复了", "地铁 公园 天气", "心情很好[哈哈]", "很坏很坏"]


def test_tfidf_matches_scikit_learn_char_1_3_sublinear():
    ref = sk_text.TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2, lowercase=False)
    want = ref.fit_transform(DOCS).toarray()
    vec = FC.Tfidf.fit([FC.char_ngrams(d) for d in DOCS], max_features=10 ** 6, min_df=2)
    assert sorted(vec.vocab) == sorted(ref.vocabulary_)
    got = vec.transform([FC.char_ngrams(d) for d in DOCS])
    order = [vec.vocab[g] for g in sorted(ref.vocabulary_, key=ref.vocabulary_.get)]
    np.testing.assert_allclose(got[:, order], want, atol=1e-6)
    # an n-gram outside the vocabulary is ignored; a document with none is a zero row
    assert not got.sum() == 0 and not vec.transform([FC.char_ngrams("ＸＹＺ")]).any()
    # max_features keeps the n-grams found in most documents
    small = FC.Tfidf.fit([FC.char_ngrams(d) for d in DOCS], max_features=3, min_df=1)
    df = {g: sum(g in FC.char_ngrams(d) for d in DOCS) for g in small.vocab}
    assert len(small.vocab) == 3 and min(df.values()) >= max(
        sum(g in FC.char_ngrams(d) for d in DOCS) for g in set().union(*map(FC.char_ngrams, DOCS)) - set(small.vocab))


def _separable(n=240, v=30, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, v)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.argmax(x @ (rng.normal(size=(v, k)) * 4) + rng.gumbel(size=(n, k)), 1)
    return x, y, rng


@pytest.mark.parametrize("c", [0.3, 3.0])
def test_softmax_regression_matches_scikit_learn(c):
    x, y, rng = _separable()
    sw = rng.random(len(y)) + 0.5
    ours = FC.Softmax.fit(x, np.eye(3)[y], c, sw, max_iter=3000, tol=1e-7)
    ref = sk_linear.LogisticRegression(C=c, max_iter=10000, tol=1e-12).fit(x, y, sample_weight=sw)
    np.testing.assert_allclose(ours.predict(x), ref.predict_proba(x), atol=2e-4)


def test_soft_targets_equal_weighted_copies_of_each_class():
    """A soft target row y is the same objective as K copies of the example weighted y_k (scikit-learn)."""
    x, _, rng = _separable(n=60)
    y = rng.dirichlet(np.ones(3), size=60)
    ours = FC.Softmax.fit(x, y, 1.0, max_iter=3000, tol=1e-7)
    xx, yy, ww = np.repeat(x, 3, axis=0), np.tile(np.arange(3), 60), y.reshape(-1)
    ref = sk_linear.LogisticRegression(C=1.0, max_iter=10000, tol=1e-12).fit(xx, yy, sample_weight=ww)
    np.testing.assert_allclose(ours.predict(x), ref.predict_proba(x), atol=2e-4)


# ----------------------------------------------------------------------------- the shrink

def test_shrink_ends_and_weight_choice():
    rng = np.random.default_rng(0)
    prior = np.array([0.5, 0.3, 0.2])
    f = rng.dirichlet(np.ones(3), size=20)
    np.testing.assert_array_equal(SK.shrink(f, prior, 0.0), np.broadcast_to(prior, f.shape))  # w = 0: the prior exactly
    np.testing.assert_array_equal(SK.shrink(f, prior, 1.0), f)
    pri = np.broadcast_to(prior, f.shape)
    assert SK.choose_weight(f, pri, pri) == 0.0  # the truth is the prior: lean on it entirely
    assert SK.choose_weight(f, pri, f) == 1.0  # the truth is the forecast: trust it entirely
    half = 0.5 * f + 0.5 * prior
    assert SK.choose_weight(f, pri, half) == 0.5
    # the chosen w minimises the mean JSD over the grid (checked by brute force)
    real = rng.dirichlet(np.ones(3) * 5, size=20)
    w = SK.choose_weight(f, pri, real)
    losses = {v: np.mean(jensen_shannon(real, v * f + (1 - v) * prior)) for v in SK.WEIGHTS}
    assert losses[w] == min(losses.values())


# ----------------------------------------------------------------------------- the runner's forecast rows

def write_cache(path, *, informative: bool, n_events=30, per_event=3, seed=0, dim=8):
    """A complete feature cache written file by file: events whose crowd mix follows a word in the news
    ('好' -> mostly positive, '坏' -> mostly negative) when `informative`, else random words."""
    rng = np.random.default_rng(seed)
    events, ev, lab, texts = [], [], [], []
    for e in range(n_events):
        tone = e % 3
        mix = [[0.7, 0.2, 0.1], [0.2, 0.6, 0.2], [0.1, 0.2, 0.7]][tone] if informative else [0.4, 0.3, 0.3]
        counts = rng.multinomial(100, mix)
        word = "坏平好"[tone] if informative else "甲乙丙丁"[int(rng.integers(4))]
        events.append({"name": f"event {e:02d}", "real": (counts / 100).tolist(), "count": 100,
                       "noise_floor": 0.0025})
        for c in range(per_event):
            y = int(rng.choice(3, p=mix))
            ev.append(e)
            lab.append(y)
            texts.append({"news": f"新闻{e}：{word}{word}消息 {e}", "user": f"用户{c}的历史 {'好坏'[c % 2]}",
                          "response": "好" if y == 2 else "坏" if y == 0 else "嗯"})
    n = len(ev)
    path.mkdir(parents=True)
    ex = {"event": np.array(ev), "label": np.array(lab), "prompt_len": np.full(n, 10), "case_index": np.arange(n),
          "row": np.arange(n)}
    atomic_io.atomic_write(path / F.EXAMPLES, lambda f: np.savez(f, **ex), binary=True)
    atomic_io.write_json({"events": events, "classes": list(DEFAULT_LABELS)}, path / F.EVENTS)
    atomic_io.write_json(texts, path / F.TEXTS)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    atomic_io.atomic_write(path / "chunk_00000.npz", lambda f: np.savez(f, positions=np.arange(n), features=feats),
                           binary=True)
    atomic_io.write_json({"format": F.FORMAT, "key": f"synthetic-{seed}-{informative}", "num_examples": n,
                          "chunk_size": n, "num_chunks": 1, "hidden_size": dim, "done": [0], "complete": True,
                          "order": "events", "seconds": 0.0}, path / F.MANIFEST)
    return path


PLAN = """
name = "forecast_test"
kind = "head"
features = "{features}"
folds = 5
seeds = [0]
baseline = "prior"
[bootstrap]
n_resamples = 200
[defaults]
steps = 20
lr = 1e-2
events_per_batch = 4
cases_per_event = 2
[[rows]]
name = "prior"
reference = "prior"
[[rows]]
name = "floor"
reference = "floor"
[[rows]]
name = "cases"
reference = "cases"
[[rows]]
name = "news"
model = "ngram"
text = "news"
[[rows]]
name = "news_shrunk"
model = "ngram"
text = "news"
shrink = true
[[rows]]
name = "response"
model = "ngram"
text = "response"
[[rows]]
name = "head_shrunk"
shrink = true
[[compare]]
a = "news_shrunk"
b = "prior"
"""


def _run(tmp_path, informative, monkeypatch=None):
    cache = write_cache(tmp_path / "cache", informative=informative)
    (tmp_path / "plan.toml").write_text(PLAN.format(features=cache), "utf-8")
    plan = runner.load_plan(tmp_path / "plan.toml")
    return plan, runner.run_plan(plan, tmp_path / "out", log=lambda _: None)


def test_forecast_rows_inner_cv_never_sees_a_held_out_event(tmp_path, monkeypatch):
    seen = []
    real_forecast = runner.HeadContext._forecast

    def spy(self, plan, row, train, target, fold, seed, fixed=None):
        held = {e for e, n in enumerate(self.fs.event_names) if self.fold_of[n] == fold}
        seen.append((row["name"], fold, set(map(int, train)), set(map(int, target)), held))
        return real_forecast(self, plan, row, train, target, fold, seed, fixed)

    monkeypatch.setattr(runner.HeadContext, "_forecast", spy)
    calls = []
    real_choice = SK.choose_weight
    monkeypatch.setattr(SK, "choose_weight", lambda f, p, r, **kw: calls.append(len(r)) or real_choice(f, p, r, **kw))
    plan, summ = _run(tmp_path, informative=True)
    assert not summ["failed"]
    outer = inner = 0
    for name, fold, train, target, held in seen:
        assert not train & held, (name, fold)  # no fit ever reads a held-out event
        if target == held:  # the one forecast that is scored
            outer += 1
        else:  # inner cross-validation (C and w): training events only
            assert not target & held, (name, fold)
            inner += 1
    assert outer >= 5 * 3 and inner >= 5 * 4
    assert calls and all(n == 24 for n in calls)  # w is fitted on the 24 training events of each fold, never more


def test_informative_news_beats_the_prior_and_the_shrink_trusts_it(tmp_path):
    _, summ = _run(tmp_path, informative=True)
    rows = summ["rows"]
    # the news word decides the crowd: the n-gram forecast is far closer than the prior ...
    assert rows["news"]["jsd_mean"]["point"] < 0.5 * rows["prior"]["jsd_mean"]["point"]
    assert rows["news_shrunk"]["skill"]["low"] > 0.3
    d = next(d for d in summ["differences"] if d["a"] == "news_shrunk")
    assert d["jsd_mean"]["high"] < 0 and d["jsd_mean"]["excludes_zero"]
    cells = [json.loads(line) for line in (tmp_path / "out" / runner.CELLS).read_text().splitlines()]
    assert all(c["shrink_w"] >= 0.5 for c in cells if c["row"] == "news_shrunk")
    # the floor row: each event's noise floor, no forecast; the case-label ceiling reads the cases' labels
    assert rows["floor"]["jsd_mean"]["point"] == pytest.approx(0.0025)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "skill vs prior" in md and "Shrink weights w" in md


def test_uninformative_texts_shrink_to_the_prior(tmp_path):
    """Random words: no row can know an event's mix; the shrunk rows stay within noise of the prior."""
    _, summ = _run(tmp_path, informative=False)
    rows = summ["rows"]
    assert rows["news"]["skill"]["point"] < 0.1
    for r in ("news_shrunk", "head_shrunk"):
        assert rows[r]["skill"]["high"] > 0 and rows[r]["skill"]["point"] > -0.05, (r, rows[r]["skill"])
    cells = [json.loads(line) for line in (tmp_path / "out" / runner.CELLS).read_text().splitlines()]
    prior = {c["fold"]: c for c in cells if c["row"] == "prior"}
    for c in cells:  # w = 0 is the prior exactly, event by event
        if c.get("shrink_w") == 0.0:
            assert [e["pred"] for e in c["events"]] == [e["pred"] for e in prior[c["fold"]]["events"]]


def test_a_forecast_row_is_checked_when_the_plan_is_read(tmp_path):
    cache = write_cache(tmp_path / "cache", informative=True)
    bad = PLAN.format(features=cache).replace('text = "response"', 'text = "tweets"')
    (tmp_path / "plan.toml").write_text(bad, "utf-8")
    with pytest.raises(runner.UserError, match=r"rows\[5\]: field 'text'"):
        runner.load_plan(tmp_path / "plan.toml")
    bad = PLAN.format(features=cache).replace('baseline = "prior"', 'baseline = "nope"')
    (tmp_path / "plan.toml").write_text(bad, "utf-8")
    with pytest.raises(runner.UserError, match="field 'baseline'"):
        runner.load_plan(tmp_path / "plan.toml")
