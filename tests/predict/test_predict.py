"""The product path: predict a crowd for a new event (Python API and launch/predict.py).

References are independent of the code under test: the head's probabilities are recomputed
from a plain forward pass (no KV cache, no left padding) over prompts built by the prompt
builder directly, the crowd's distribution is their numpy mean, and the bootstrap intervals
are re-derived in numpy from the documented procedure (and checked against the normal
approximation on a large synthetic crowd).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train_helpers import REPO, built_sample, script_env, tiny_config

from socialalign_jax.predict import (Predictor, PredictError, User, UsersError, crowd as crowd_lib, dataset_users,
                                     default_topic, parse_users_jsonl, read_users, sample_users)

USERS = REPO / "examples" / "users.jsonl"
NEWS = "某地宣布明年起延迟退休，引发网友热议"
NEWS2 = "延迟退休政策明年起实施"
_RUN: dict[str, str] = {}


def tiny_predict_run() -> str:
    """A 1-step tiny training run (its config.json, checkpoint and built dataset), once per session."""
    if "wd" not in _RUN:
        from socialalign_jax.train import loop

        wd = tempfile.mkdtemp(prefix="sa_predict_")
        cfg = tiny_config(built_sample(), **{"train.num_steps": 1, "sample.max_new_tokens": 6,
                                             "sample.batch_size": 8})
        loop.train(cfg, wd, progress=False)
        _RUN["wd"] = wd
    return _RUN["wd"]


@pytest.fixture(scope="module")
def predictor():
    return Predictor.from_run(tiny_predict_run())


# ----------------------------------------------------------------------------- users files


def _users_error(text: str) -> str:
    with pytest.raises(UsersError) as e:
        parse_users_jsonl(text, "crowd.jsonl")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_users_file_is_validated_with_file_line_and_field():
    good = '{"user_name": "a", "history": [{"text": "x"}], "user_persona": "p"}'
    assert _users_error(good + "\n{not json") .startswith("crowd.jsonl: line 2: invalid JSON (")
    assert _users_error('{"history": []}') == "crowd.jsonl: line 1: field 'user_name': missing"
    assert "line 1: field 'history': expected a list" in _users_error('{"user_name": "a", "history": "x"}')
    assert "line 1: field 'history[0].text': missing" in _users_error('{"user_name": "a", "history": [{"txt": "x"}]}')
    assert "field 'histroy': unknown field" in _users_error('{"user_name": "a", "histroy": []}')
    assert "line 3: field 'user_name': 'a' repeats line 1" in _users_error(good + "\n\n" + good)
    assert _users_error("\n \n") == "crowd.jsonl: no users (expected one JSON object per line)"
    # A case copied out of an event file is a valid user (its response and label are ignored).
    case = {"user_name": "b", "weibo": "w", "sentiment": "negative",
            "history": [{"text": "t", "retweet": {"text": "r"}, "topics": ["x"]}]}
    (u,) = parse_users_jsonl(json.dumps(case, ensure_ascii=False), "f")
    assert u.user_name == "b" and u.history[0].retweet == "r" and u.persona is None


def test_a_users_file_cut_short_says_so(tmp_path):
    raw = USERS.read_bytes()
    for end, what in ((raw.index("王".encode()) + 2, "the file ends in the middle of a character"),
                      (raw.index(b"\n") - 5, "line 1: invalid JSON: the file ends in the middle of a record")):
        (tmp_path / "u.jsonl").write_bytes(raw[:end])
        with pytest.raises(UsersError) as e:
            read_users(tmp_path / "u.jsonl")
        assert str(e.value).startswith(f"{tmp_path / 'u.jsonl'}: {what}") and "cut short" in str(e.value), e.value
    (tmp_path / "u.jsonl").write_bytes(raw.replace(b"}", b"}}", 1))  # damaged in the middle: not a cut
    with pytest.raises(UsersError, match=r"u\.jsonl: line 1: invalid JSON \(Expecting ',' delimiter at column"):
        read_users(tmp_path / "u.jsonl")


def test_example_users_file_reads():
    users = read_users(USERS)
    assert len(users) == 4 and all(u.history and u.persona for u in users)


def test_users_from_a_built_dataset_are_its_distinct_users():
    data = built_sample()
    pool = dataset_users(data)
    from socialalign_jax.data.records import read_event_dir
    from socialalign_jax.data.sample import load_sample_dir

    names = {c.user_name for ev in read_event_dir(load_sample_dir()) for c in ev.cases}
    assert {u.user_name for u in pool} == names and len(pool) == len(names)
    picked = sample_users(pool, 5, seed=3, source=data)
    assert len({u.user_name for u in picked}) == 5
    assert [u.user_name for u in picked] == [u.user_name for u in sample_users(pool, 5, seed=3, source=data)]
    with pytest.raises(UsersError, match=f"has {len(pool)} users, {len(pool) + 1} were asked for"):
        sample_users(pool, len(pool) + 1, seed=0, source=data)


def test_default_topic():
    assert default_topic("今天 #高考放榜# 了") == "高考放榜"
    assert default_topic("某地宣布明年起延迟退休，引发网友热议") == "某地宣布明年起延迟退休"
    assert len(default_topic("一" * 50)) == 20


# ----------------------------------------------------------------------------- bootstrap


def _numpy_bootstrap(per_user, seed, b, level):
    """The documented procedure, written out independently: one resample at a time."""
    rng = np.random.default_rng(seed)
    v, u, c = per_user.shape
    idx = rng.integers(0, u, size=(b, u), dtype=np.int32)
    boots = np.array([[per_user[k][idx[r]].mean(axis=0) for r in range(b)] for k in range(v)])  # [V, B, C]
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    iv = np.stack([np.percentile(boots, lo, axis=1), np.percentile(boots, hi, axis=1)], axis=-1)
    d = boots[0] - boots[1]
    div = np.stack([np.percentile(d, lo, axis=0), np.percentile(d, hi, axis=0)], axis=-1)
    return per_user.mean(axis=1), iv, per_user[0].mean(0) - per_user[1].mean(0), div


def test_bootstrap_matches_an_independent_numpy_derivation():
    rng = np.random.default_rng(0)
    per_user = rng.dirichlet([1.0, 2.0, 3.0], size=(2, 37))  # 2 wordings x 37 users
    s = crowd_lib.summarise(per_user, crowd_lib.resample_indices(37, seed=5, num_resamples=300), level=0.9)
    mean, iv, diff, div = _numpy_bootstrap(per_user, 5, 300, 0.9)
    np.testing.assert_allclose(s.mean, mean, atol=1e-12)
    np.testing.assert_allclose(s.interval, iv, atol=1e-12)
    assert s.pairs == [(0, 1)]
    np.testing.assert_allclose(s.diff[0], diff, atol=1e-12)
    np.testing.assert_allclose(s.diff_interval[0], div, atol=1e-12)


def test_bootstrap_interval_agrees_with_the_normal_approximation():
    # For a large crowd the bootstrap 90% interval of a mean ~ mean +- 1.645 sd / sqrt(U); paired
    # differences of two wordings that share most of their per-user variation are much narrower.
    rng = np.random.default_rng(1)
    u = 4000
    base = rng.dirichlet([2.0, 2.0, 2.0], size=u)
    shifted = 0.9 * base + 0.1 * np.array([0.6, 0.2, 0.2])
    per_user = np.stack([base, shifted])
    s = crowd_lib.summarise(per_user, crowd_lib.resample_indices(u, seed=0, num_resamples=2000))
    half = 1.6449 * base.std(axis=0, ddof=1) / np.sqrt(u)
    np.testing.assert_allclose(s.interval[0, :, 1] - s.interval[0, :, 0], 2 * half, rtol=0.1)
    assert np.all(s.interval[0, :, 0] < s.mean[0]) and np.all(s.mean[0] < s.interval[0, :, 1])
    d_half = 1.6449 * (base - shifted).std(axis=0, ddof=1) / np.sqrt(u)
    np.testing.assert_allclose(s.diff_interval[0, :, 1] - s.diff_interval[0, :, 0], 2 * d_half, rtol=0.1)
    assert s.diff_interval[0, 0, 1] < 0  # wording 1 draws clearly fewer "negative" than wording 2


# ----------------------------------------------------------------------------- the framing verdict


def _difference(n, interval, diff=None):
    from socialalign_jax.predict import Difference

    labels = ("negative", "neutral", "positive")
    return Difference(a=0, b=1, difference=dict(zip(labels, diff or (0.0, 0.0, 0.0))),
                      interval=dict(zip(labels, interval)), num_users=n, level=0.9)


def test_the_verdict_rests_on_enough_users_and_an_interval_that_excludes_0():
    from socialalign_jax.predict import MIN_USERS_FOR_VERDICT

    clear = [(-0.08, -0.02), (-0.01, 0.03), (0.01, 0.05)]  # negative excludes 0 (below), positive (above)
    few = _difference(4, clear, (-0.05, 0.01, 0.03))
    assert few.verdict == ("underpowered: 4 users, fewer than the 30 a framing comparison needs; no wording is named "
                           "(predict for at least 30 users)")
    assert {few.reading(k) for k in few.interval} == {"underpowered (4 users)"}
    enough = _difference(MIN_USERS_FOR_VERDICT, clear, (-0.05, 0.01, 0.03))
    assert enough.verdict == ("on 30 users, wording 1 draws fewer negative (-0.050, 90% interval [-0.080, -0.020] "
                              "excludes 0); more positive (+0.030, 90% interval [0.010, 0.050] excludes 0) than "
                              "wording 2")
    assert [enough.reading(k) for k in ("negative", "neutral", "positive")] == [
        "fewer under wording 1 (interval excludes 0)", "no clear difference (interval includes 0)",
        "more under wording 1 (interval excludes 0)"]
    none = _difference(40, [(-0.02, 0.01), (-0.01, 0.03), (-0.03, 0.0)])
    assert none.verdict == "no clear difference on 40 users: every label's 90% interval includes 0"


# ----------------------------------------------------------------------------- the API on a trained run


def _direct_head_probs(predictor, news, topic, users, wordings=None):
    """Head probabilities from one plain forward over the prompts (right padding, no KV cache).
    wordings: every wording of the request: a user's prompts are built together (`build_examples`,
    checked against the authors' template in tests/data/test_prompt.py: one history, one cut)."""
    from socialalign_jax.data.prompt import build_examples
    from socialalign_jax.data.records import Case, Event
    from socialalign_jax.model import decoder

    wordings = list(wordings or [news])
    exs = []
    for u in users:
        case = Case(user_name=u.user_name, weibo="", history=list(u.history), persona=u.persona)
        events = [Event("e", topic, w, [case]) for w in wordings]
        exs.append(build_examples(case, events, predictor.tokenizer, predictor.prompt_cfg,
                                  include_response=False)[wordings.index(news)])
    n = max(ex["prompt_len"] for ex in exs)
    ids = np.zeros((len(exs), n), np.int32)
    mask = np.zeros((len(exs), n), np.int32)
    for i, ex in enumerate(exs):
        ids[i, :ex["prompt_len"]] = ex["input_ids"][:ex["prompt_len"]]
        mask[i, :ex["prompt_len"]] = 1
    spans = (np.array([ex["user_end"] for ex in exs]), np.array([ex["news_end"] for ex in exs]))
    res = decoder.forward(predictor.params, ids, predictor.model_cfg, attention_mask=mask, adapters=predictor.adapters,
                          lora_cfg=predictor.lora_cfg, spans=spans, logits_at=None)
    hidden = np.asarray(res.hidden, np.float64)
    h = np.stack([hidden[i, ex["prompt_len"] - 1] for i, ex in enumerate(exs)])  # the last prompt token
    z = h @ np.asarray(predictor.adapters["head"]["kernel"], np.float64) + np.asarray(
        predictor.adapters["head"]["bias"], np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_api_predicts_the_crowd_as_a_direct_forward_and_numpy_do(predictor):
    from socialalign_jax.inference import generation

    users = read_users(USERS)
    pred = predictor.predict(NEWS, users, samples=2, seed=3, variants=[NEWS2], labeller="lexicon")
    # Token routing: each user's two wordings prefilled their common head once (and the head's
    # probabilities below still equal a plain forward over each whole prompt).
    assert predictor.lora_cfg.routing == "token" and any(s[2] > 0 for s in predictor.compiled_shapes)
    # Both wordings of a user carry one user span (history chosen and cut once), token for token.
    prompts = predictor.build_prompts([NEWS, NEWS2], default_topic(NEWS), users)
    for a, b in zip(*prompts):
        assert a["user_end"] == b["user_end"] and a["input_ids"][:a["user_end"]].tolist() == b["input_ids"][:b["user_end"]].tolist()
    labels = list(predictor.labels)
    assert pred.labels == tuple(labels) and pred.num_users == 4 and len(pred.variants) == 2
    assert [u.user_name for u in pred.users] == [u.user_name for u in users]
    probs = []
    for v, news in enumerate((NEWS, NEWS2)):
        c = pred.variants[v]
        assert c.topic == default_topic(NEWS)  # one hashtag for every wording: only the wording differs
        ref = _direct_head_probs(predictor, news, c.topic, users, wordings=(NEWS, NEWS2))
        got = np.array([[u.sentiment[k] for k in labels] for u in c.users])
        np.testing.assert_allclose(got, ref, atol=2e-5)
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)
        dist = np.array([c.distribution[k] for k in labels])
        np.testing.assert_allclose(dist, ref.mean(0), atol=2e-5)
        assert abs(dist.sum() - 1) < 1e-6
        for k in labels:
            lo, hi = c.interval[k]
            assert lo <= c.distribution[k] <= hi
        assert all(len(u.posts) == 2 and all(isinstance(p, str) for p in u.posts) for u in c.users)
        # The labeller's distribution: the share of each user's posts per class, averaged over users.
        from socialalign_jax.data.labellers import LexiconLabeller
        lab = LexiconLabeller().label([p for u in c.users for p in u.posts])
        assert [l for u in c.users for l in u.post_labels] == lab
        gen = np.mean([[np.mean([l == k for l in u.post_labels]) for k in labels] for u in c.users], axis=0)
        np.testing.assert_allclose([c.generated_distribution[k] for k in labels], gen, atol=1e-12)
        probs.append(got)
    # The intervals and the paired difference, re-derived in numpy from the per-user probabilities.
    mean, iv, diff, div = _numpy_bootstrap(np.array(probs), 3, pred.num_resamples, pred.level)
    for v in range(2):
        np.testing.assert_allclose([pred.variants[v].interval[k] for k in labels], iv[v], atol=1e-6)
    (d,) = pred.differences
    assert (d.a, d.b) == (0, 1)
    np.testing.assert_allclose([d.difference[k] for k in labels], diff, atol=1e-6)
    np.testing.assert_allclose([d.interval[k] for k in labels], div, atol=1e-6)

    # crowd.json's structure, and the records of predictions.jsonl.
    j = pred.to_json()
    assert j["labels"] == labels and j["num_users"] == 4 and j["distribution"] == pred.distribution
    assert [v["news"] for v in j["variants"]] == [NEWS, NEWS2] and len(j["differences"]) == 1
    assert j["run"]["step"] == 1 and j["seed"] == 3 and j["generated"]["distribution"]
    recs = list(pred.records())
    assert len(recs) == 2 * 4 * 2 and set(recs[0]) >= {"user_name", "post", "sentiment", "variant", "sample"}
    # Each record states its prompt's length and the history characters the budget cut: one cut per
    # user for both wordings (224 tokens cut each of these users' histories).
    for r in recs:
        ex = prompts[r["variant"]][[u.user_name for u in users].index(r["user_name"])]
        assert r["prompt_tokens"] == ex["prompt_len"] and r["history_chars_cut"] == ex["n_truncated_history_chars"]
    cuts = {(r["user_name"], r["variant"]): r["history_chars_cut"] for r in recs}
    assert all(cuts[u.user_name, 0] == cuts[u.user_name, 1] for u in users)
    assert all(cuts[u.user_name, 0] > 0 for u in users)

    # Same shapes again, another seed: no new compilation (the seed is a key, not a static argument),
    # and the same seed gives the same posts.
    size = generation._sample_batch._cache_size()
    again = predictor.predict(NEWS, users, samples=2, seed=3, variants=[NEWS2])
    other = predictor.predict(NEWS, users, samples=2, seed=4, variants=[NEWS2])
    assert generation._sample_batch._cache_size() == size
    assert [u.posts for u in again.users] == [u.posts for u in pred.users]
    assert [u.sentiment for u in other.users] == [u.sentiment for u in again.users]


def test_a_run_predicts_in_bfloat16_within_rounding_of_float32(predictor):
    """from_run(dtype='bfloat16') (launch/predict.py --dtype): the run's weights rounded to bf16 once, the
    adapters float32, the prediction recorded as bf16, and each user's head probabilities within bf16
    rounding of a plain float32 forward (an independent path: no cache, no sampler)."""
    from socialalign_jax.runs.validation import ConfigError

    p16 = Predictor.from_run(tiny_predict_run(), dtype="bfloat16")
    assert p16.model_cfg.dtype == p16.model_cfg.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(p16.params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(p16.adapters)} == {jnp.dtype(jnp.float32)}
    users = read_users(USERS)
    pred = p16.predict(NEWS, users, samples=1, seed=3)
    assert pred.to_json()["run"]["dtype"] == "bfloat16" and predictor.run["dtype"] == "float32"
    ref = _direct_head_probs(predictor, NEWS, pred.variants[0].topic, users)
    got = np.array([[u.sentiment[k] for k in p16.labels] for u in pred.variants[0].users])
    assert 0 < np.abs(got - ref).max() <= 2e-2  # > 0: bf16 really ran
    with pytest.raises(ConfigError, match="model.dtype"):
        Predictor.from_run(tiny_predict_run(), dtype="int8")


def test_k_posts_per_user_branch_from_one_prefill(predictor):
    """K posts per user share the prompt's prefill: K = 3 gives 3 posts per user (each its own PRNG
    stream, so they differ) and the head's probabilities of a plain forward, as K = 1 does; sample k
    of a user draws from (seed, row, k) alone, so the first post is the same at K = 1 and K = 3."""
    users = read_users(USERS)
    one = predictor.predict(NEWS, users, samples=1, seed=5)
    three = predictor.predict(NEWS, users, samples=3, seed=5)
    assert all(len(u.posts) == 3 for u in three.users) and len(list(three.records())) == 3 * len(users)
    # batch_size counts prompts (8 here; K = 3 decode rows each): all the users in one call, bucketed up to a power of 2
    from socialalign_jax.core.buckets import bucket
    prompts = min(predictor.batch_size, bucket(len(users), pow2=True))
    assert any(shape[:2] == (prompts, 3) for shape in predictor.compiled_shapes), predictor.compiled_shapes
    labels = list(predictor.labels)
    got = np.array([[u.sentiment[k] for k in labels] for u in three.users])
    np.testing.assert_allclose(got, _direct_head_probs(predictor, NEWS, three.crowd.topic, users), atol=2e-5)
    np.testing.assert_allclose(got, [[u.sentiment[k] for k in labels] for u in one.users], atol=1e-6)
    assert [u.posts[0] for u in three.users] == [u.posts[0] for u in one.users]
    assert any(len(set(u.posts)) > 1 for u in three.users)


def test_api_rejects_bad_input_with_one_line(predictor):
    users = read_users(USERS)
    cases = [
        (dict(news="  ", users=users), "news: empty"),
        (dict(news=NEWS, users=[]), "users: the crowd is empty"),
        (dict(news=NEWS, users=users, variants=[""]), "variants[0]: empty"),
        (dict(news=NEWS, users=users, samples=0), "samples: must be an integer >= 1"),
        (dict(news="新闻" * 400, users=users[:1]), "the prompt does not fit"),
        (dict(news=NEWS, users=users, labeller="nope"), "labeller: 'nope'"),
        (dict(news=NEWS, users=users, level=1.5), "level: must be between 0 and 1"),
        (dict(news=NEWS, users=users, num_resamples=0), "num_resamples: must be an integer >= 1"),
        (dict(news=NEWS, users=users, seed=-1), "seed: must be an integer in [0, 2147483647]"),
    ]
    for kw, msg in cases:
        with pytest.raises(PredictError) as e:
            predictor.predict(**kw)
        assert msg in str(e.value) and "\n" not in str(e.value)
    small = Predictor(predictor.params, predictor.adapters, predictor.model_cfg, predictor.lora_cfg,
                      predictor.tokenizer, labels=predictor.labels, prompt=predictor.prompt_cfg,
                      sampling=predictor.sampling, max_users=3)
    with pytest.raises(PredictError, match="4 users, more than this predictor's limit of 3"):
        small.predict(NEWS, users)
    with pytest.raises(UsersError, match=r"users\[0\]: field 'user_name': missing"):
        predictor.predict(NEWS, [{"history": []}])


def test_the_forecast_carries_its_track_record_and_leans_on_the_prior_by_w(predictor, tmp_path):
    """A run's forecast_skill.json: the crowd's shares, intervals and framing differences are
    w * head + (1 - w) * prior (differences: w * head's), the head's own mean is kept, and every output
    says how such forecasts did on held-out events."""
    from socialalign_jax.predict import outputs

    # the tiny run's own record: it skipped its final evaluation, so nothing is measured (and it says so)
    rec = json.loads((Path(tiny_predict_run()) / "forecast_skill.json").read_text())
    assert rec == {"num_events": 0, "status": "none", "w": 1.0, "reason": "train.eval_at_end is off", "step": 1}
    users = read_users(USERS)
    raw = predictor.predict(NEWS, users, seed=2, variants=[NEWS2])
    assert raw.skill_sentence.startswith("this run was not scored on held-out events")
    assert raw.variants[0].raw_distribution is None
    labels = list(predictor.labels)
    prior = [0.5, 0.3, 0.2]
    good = {"status": "better", "num_events": 40, "w": 0.25, "prior": prior, "labels": labels,
            "skill": {"point": 0.12, "low": 0.05, "high": 0.19}}
    shrunk_p = Predictor(predictor.params, predictor.adapters, predictor.model_cfg, predictor.lora_cfg,
                         predictor.tokenizer, labels=predictor.labels, prompt=predictor.prompt_cfg,
                         sampling=predictor.sampling, skill=good)
    pred = shrunk_p.predict(NEWS, users, seed=2, variants=[NEWS2])
    for v in range(2):
        r, c = raw.variants[v], pred.variants[v]
        assert c.raw_distribution == r.distribution
        for i, k in enumerate(labels):
            assert c.distribution[k] == pytest.approx(0.25 * r.distribution[k] + 0.75 * prior[i], abs=1e-12)
            for j in range(2):
                assert c.interval[k][j] == pytest.approx(0.25 * r.interval[k][j] + 0.75 * prior[i], abs=1e-12)
        assert [u.sentiment for u in c.users] == [u.sentiment for u in r.users]  # users keep their own
    for k in labels:
        assert pred.differences[0].difference[k] == pytest.approx(0.25 * raw.differences[0].difference[k], abs=1e-12)
    sentence = "on 40 held-out events these forecasts were 12% [5%, 19%] closer to the real crowd than the average mix"
    assert pred.to_json()["forecast_skill"]["sentence"] == sentence
    assert pred.to_json()["variants"][0]["raw_distribution"] == raw.distribution
    table = outputs.summary_table(pred)
    # first (this Predictor was built without run info, so no random-weights warning precedes it), then the hashtag
    assert table.startswith(f"forecast skill: {sentence}\n") and "w = 0.25" in table
    assert table.index(f"forecast skill: {sentence}\n") < table.index("hashtag #")
    assert f"**Forecast skill**: {sentence}." in outputs.report_markdown(pred, chart=None)
    # a damaged or mismatched record is refused in one line
    (tmp_path / "forecast_skill.json").write_text("{not json", "utf-8")
    with pytest.raises(PredictError, match="forecast_skill.json: unreadable") as e:
        from socialalign_jax.predict.predictor import read_skill
        read_skill(str(tmp_path))
    assert "\n" not in str(e.value)
    for bad, msg in (({**good, "w": 1.5}, "not in \\[0, 1\\]"), ({**good, "prior": [1.0]}, "must list 3 shares"),
                     ({**good, "labels": ["a", "b", "c"]}, "are not the head's")):
        with pytest.raises(PredictError, match=msg):
            Predictor(predictor.params, predictor.adapters, predictor.model_cfg, predictor.lora_cfg,
                      predictor.tokenizer, labels=predictor.labels, skill=bad)


def test_a_news_too_long_is_explained_in_prediction_terms(predictor):
    """A prompt has no response and no build settings: the error says what to do at predict time."""
    users = read_users(USERS)[:1]
    for news, what in (("新闻" * 400, "the news alone has 400 tokens, which exceeds max_length 224 (the news is never "
                                      "cut)"),
                       ("新闻" * 80, "tokens exceed max_length 224 even with history and persona cut")):
        with pytest.raises(PredictError) as e:
            predictor.predict(news, users)
        msg = str(e.value)
        assert msg.startswith(f"news for user {users[0].user_name!r}: the prompt does not fit: ") and what in msg, msg
        assert msg.endswith("; shorten the news (the run's prompts hold at most 224 tokens)"), msg
        assert "response" not in msg and "on_overflow" not in msg and "\n" not in msg, msg


def test_users_given_as_dicts_or_objects_predict_the_same(predictor):
    users = read_users(USERS)[:2]
    a = predictor.predict(NEWS, users, seed=1)
    b = predictor.predict(NEWS, [u.to_json() for u in users], seed=1)
    assert a.users == b.users and a.crowd == b.crowd
    assert isinstance(users[0], User)


def test_exported_adapters_on_a_weights_spec_predict_as_the_run_does(predictor, tmp_path):
    from socialalign_jax.weights import adapters

    path = adapters.save_adapters(jax.device_get(predictor.adapters), predictor.lora_cfg, predictor.model_cfg,
                                  tmp_path / "export")
    exported = Predictor.from_adapters(tmp_path / "export", "random:tiny-qwen2", max_length=224,
                                       sampling=predictor.sampling, batch_size=predictor.batch_size)
    assert exported.run["adapters"] == os.path.abspath(path.parent) and exported.labels == predictor.labels
    users = read_users(USERS)
    a = predictor.predict(NEWS, users, samples=2, seed=3)
    b = exported.predict(NEWS, users, samples=2, seed=3)
    for ua, ub in zip(a.users, b.users):
        np.testing.assert_allclose(list(ua.sentiment.values()), list(ub.sentiment.values()), atol=1e-6)
        assert ua.posts == ub.posts


def test_adapter_exports_with_an_adapter_config_are_read_by_their_layout(predictor, tmp_path):
    """A socialalign (PEFT-style) export has an adapter_config.json too: it is read as what it is, not as an
    Orbax export; an Orbax export whose adapter_config.json lost its fields is one line naming file and field."""
    from socialalign_jax.core.errors import UserError
    from socialalign_jax.inference import export
    from socialalign_jax.weights import adapters

    ad = jax.device_get(predictor.adapters)
    adapters.export_socialalign(ad, predictor.lora_cfg, predictor.model_cfg, tmp_path / "sa")
    exported = Predictor.from_adapters(tmp_path / "sa", "random:tiny-qwen2", max_length=224,
                                       sampling=predictor.sampling, batch_size=predictor.batch_size)
    users = read_users(USERS)[:2]
    a, b = predictor.predict(NEWS, users, seed=3), exported.predict(NEWS, users, seed=3)
    for ua, ub in zip(a.users, b.users):
        np.testing.assert_allclose(list(ua.sentiment.values()), list(ub.sentiment.values()), atol=1e-6)

    export.save_orbax_adapters(ad, predictor.lora_cfg, predictor.model_cfg, tmp_path / "ob")
    meta = tmp_path / "ob" / "adapter_config.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "lora_config"}))
    with pytest.raises(UserError) as e:
        Predictor.from_adapters(tmp_path / "ob", "random:tiny-qwen2", max_length=224)
    assert str(e.value) == f"{meta}: field 'lora_config': missing (an export made with --format orbax has it)"
    meta.write_text('{"format": "socialalign-orbax-adap')
    with pytest.raises(UserError, match=rf"^{meta}: not readable JSON \("):
        Predictor.from_adapters(tmp_path / "ob", "random:tiny-qwen2", max_length=224)


# ----------------------------------------------------------------------------- the CLI


def _cli(*args, timeout=600):
    env = script_env(1)
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    return subprocess.run([sys.executable, str(REPO / "launch" / "predict.py"), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=str(REPO))


def test_cli_end_to_end_writes_the_four_files(tmp_path):
    run = tiny_predict_run()
    variants = tmp_path / "variants.txt"
    variants.write_text(NEWS2 + "\n\n", encoding="utf-8")
    out = tmp_path / "pred"
    r = _cli("--workdir", run, "--news", NEWS, "--variants", str(variants), "--users", str(USERS),
             "--out", str(out), "--samples", "2", "--seed", "7", "--noprogress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["crowd.json", "crowd.png", "predictions.jsonl", "report.md"]
    crowd = json.loads((out / "crowd.json").read_text(encoding="utf-8"))
    labels = crowd["labels"]
    assert crowd["num_users"] == 4 and crowd["seed"] == 7 and crowd["run"]["workdir"] == os.path.abspath(run)
    assert [v["news"] for v in crowd["variants"]] == [NEWS, NEWS2] and len(crowd["differences"]) == 1
    rows = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 * 4 * 2
    for v, var in enumerate(crowd["variants"]):
        per_user = {r["user_name"]: [r["sentiment"][k] for k in labels] for r in rows if r["variant"] == v}
        p = np.array(list(per_user.values()))
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
        np.testing.assert_allclose([var["distribution"][k] for k in labels], p.mean(0), atol=1e-9)
        assert all(var["interval"][k][0] <= var["distribution"][k] <= var["interval"][k][1] for k in labels)
    assert (out / "crowd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| label | predicted share | 90% interval |" in report and "crowd.png" in report
    assert "| label | predicted share | 90% interval |" in r.stdout and "framing: wording 1 minus wording 2" in r.stdout
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".pred")]  # no staging left behind

    # The framing comparison holds everything but the wording fixed: one hashtag, derived once from wording 1
    # and shown; its verdict says how many users it rests on, and 4 are too few to name a wording.
    topic = default_topic(NEWS)
    assert [v["topic"] for v in crowd["variants"]] == [topic, topic] and crowd["topic_source"] == "derived from wording 1"
    assert f"hashtag #{topic}# for every wording (derived from wording 1; --topic sets it)" in r.stdout
    (d,) = crowd["differences"]
    assert d["num_users"] == 4 and d["verdict"].startswith("underpowered: 4 users, fewer than the 30")
    assert f"verdict: {d['verdict']}" in r.stdout and "fewer under wording" not in r.stdout + report
    assert "| negative | " in r.stdout and "| underpowered (4 users) |" in r.stdout
    # Random weights: said first, in the CLI's output, report.md and crowd.json; report.md lists no posts.
    warning = ("WARNING: random weights (random:tiny-qwen2): this model was never pretrained, so its posts are not text")
    assert r.stdout.lstrip().startswith(warning) and crowd["random_weights"] is True
    assert report.splitlines()[2].startswith("> **" + warning) and "| wording | user | head's label | post |" not in report
    assert "Not shown (a random-weight model writes no text" in report

    # A rerun into the same directory replaces the previous prediction whole.
    r2 = _cli("--workdir", run, "--news", NEWS, "--users_from", run, "--num_users", "3", "--out", str(out),
              "--noprogress", "--show_posts", "--topic", "退休", "--dtype", "bfloat16")
    assert r2.returncode == 0, r2.stderr[-3000:]
    crowd2 = json.loads((out / "crowd.json").read_text(encoding="utf-8"))
    assert crowd2["num_users"] == 3 and len(crowd2["variants"]) == 1
    assert crowd["run"]["dtype"] == "float32" and crowd2["run"]["dtype"] == "bfloat16"  # --dtype
    assert crowd2["topic"] == "退休" and crowd2["topic_source"] == "given" and "hashtag #退休# (given)" in r2.stdout
    assert len((out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()) == 3
    report2 = (out / "report.md").read_text(encoding="utf-8")  # posts on request, escaped as Markdown text
    assert "| wording | user | head's label | post |" in report2 and len(report2.split("| 1 | ")) == 4


def test_cli_bad_input_is_one_line_and_leaves_nothing(tmp_path):
    run = tiny_predict_run()
    bad_users = tmp_path / "bad.jsonl"
    bad_users.write_text('{"user_name": "a", "history": []}\n{"user_name": "b", "history": [{"txt": 1}]}\n',
                         encoding="utf-8")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = tmp_path / "out"
    base = ["--workdir", run, "--noprogress"]
    cases = [
        ([*base, "--news", " ", "--users", str(USERS), "--out", str(out)], "wording 1 is empty"),
        ([*base, "--news", NEWS, "--users", str(bad_users), "--out", str(out)],
         f"{bad_users}: line 2: field 'history[0].text': missing"),
        ([*base, "--news", NEWS, "--users", str(USERS), "--out", str(out), "--max_users", "2"],
         "4 users, more than --max_users 2"),
        ([*base, "--news", NEWS, "--users", str(USERS), "--out", str(a_file)], "is a file, expected a directory"),
        ([*base, "--news", "新闻" * 400, "--users", str(USERS), "--out", str(out)], "the prompt does not fit"),
        ([*base, "--news", NEWS, "--users", str(USERS), "--out", str(out), "--level", "90"],
         "--level: must be between 0 and 1"),
        ([*base, "--news", NEWS, "--users", str(USERS), "--out", str(out), "--seed", "-1"], "--seed: must be"),
    ]
    for args, msg in cases:
        r = _cli(*args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], (msg, r.stderr[-2000:])
        assert not out.exists() and a_file.read_text() == "x"
        assert sorted(os.listdir(tmp_path)) == ["a_file", "bad.jsonl"]  # no staging directory either
