"""evaluation.skill: the forecast's track record against the usual mix, and the line a user reads."""

import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from socialalign_jax.evaluation import skill as SK


def _jsd(p, q):  # scipy's, squared, in nats: an independent formula
    return jensenshannon(p, q, base=math.e, axis=-1) ** 2


def _events(n=60, seed=0):
    rng = np.random.default_rng(seed)
    real = rng.dirichlet(np.ones(3) * 3, size=n)
    return rng, real, real.mean(0)


def test_perfect_forecasts_have_skill_one_and_the_prior_has_skill_zero():
    _, real, prior = _events()
    rec = SK.forecast_skill(real, real, prior, n_resamples=300)
    assert rec["status"] == "better" and rec["w"] == 1.0 and set(rec["w_per_fold"]) == {1.0}
    assert rec["skill"]["point"] == pytest.approx(1.0) and rec["skill"]["low"] == pytest.approx(1.0)
    rec = SK.forecast_skill(np.broadcast_to(prior, real.shape), real, prior, n_resamples=300)
    assert rec["status"] == "not_better" and rec["skill"]["point"] == pytest.approx(0.0, abs=1e-12)
    assert rec["w"] == 0.0  # ties go to the prior


def test_noise_is_shrunk_toward_the_prior_and_never_called_better():
    rng, real, prior = _events(n=200, seed=1)
    noise = rng.dirichlet(np.ones(3), size=len(real))
    rec = SK.forecast_skill(noise, real, prior, n_resamples=500, noise_floor=np.full(len(real), 0.002))
    assert rec["status"] == "not_better" and rec["w"] <= 0.2
    assert rec["raw_skill"]["point"] < rec["skill"]["point"]  # the raw forecast is worse than its shrunk self
    assert rec["skill"]["point"] > -0.05 and rec["noise_floor"] == pytest.approx(0.002)
    # the point figures from scipy's JSD: 1 - mean JSD(raw) / mean JSD(prior)
    want = 1 - _jsd(real, noise).mean() / _jsd(real, np.broadcast_to(prior, real.shape)).mean()
    assert rec["raw_skill"]["point"] == pytest.approx(want, rel=1e-9)
    assert rec["jsd"]["prior"] == pytest.approx(_jsd(real, np.broadcast_to(prior, real.shape)).mean(), rel=1e-9)


def test_each_events_weight_comes_from_the_other_events(monkeypatch):
    """Cross-fitting: no event helps choose the weight its own forecast is shrunk with."""
    rng, real, prior = _events(n=23, seed=2)
    f = rng.dirichlet(np.ones(3), size=len(real))
    rows = []
    real_choose = SK.choose_weight
    monkeypatch.setattr(SK, "choose_weight", lambda fc, p, r, **kw: rows.append({tuple(x) for x in r})
                        or real_choose(fc, p, r, **kw))
    SK.forecast_skill(f, real, prior, folds=5, n_resamples=50)
    every = {tuple(x) for x in real}
    folds = rows[:5]
    assert rows[5] == every  # the weight the user's forecasts get: fitted on all held-out events
    held_back = [every - r for r in folds]
    assert all(h for h in held_back)  # each fold's w leaves its own events out ...
    assert set().union(*held_back) == every and sum(map(len, held_back)) == len(every)  # ... each event exactly once


def test_statuses_and_the_sentence():
    _, real, prior = _events(n=12)
    assert SK.forecast_skill(real[:0], real[:0], prior)["status"] == "none"
    few = SK.forecast_skill(real[:9], real[:9], prior)
    assert few["status"] == "too_few" and few["w"] == 1.0 and "skill" not in few
    assert SK.skill_sentence(few) == ("only 9 held-out events: too few to measure how close these forecasts come "
                                      "to a real crowd (at least 10 are needed)")
    assert SK.skill_sentence(None).startswith("this run was not scored on held-out events")
    good = {"status": "better", "num_events": 120, "skill": {"point": 0.12, "low": 0.05, "high": 0.19}}
    assert SK.skill_sentence(good) == ("on 120 held-out events these forecasts were 12% [5%, 19%] closer to the "
                                       "real crowd than the average mix")
    bad = {"status": "not_better", "num_events": 45, "skill": {"point": -0.02, "low": -0.08, "high": 0.03}}
    assert SK.skill_sentence(bad) == ("on 45 held-out events these forecasts were not better than the average mix "
                                      "(-2% [-8%, 3%] closer): read the forecast as the average")


def test_prior_is_the_response_weighted_mix_of_the_given_events():
    real = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    np.testing.assert_allclose(SK.prior(real, [1, 3, 0]), [0.25, 0.75, 0.0])
    np.testing.assert_allclose(SK.prior(real, [1, 3, 4], events=[0, 2]), [0.2, 0.0, 0.8])
    with pytest.raises(ValueError):
        SK.prior(real, [0, 0, 0])


def test_the_trainers_track_record_uses_the_training_prior_and_the_held_out_targets():
    """train.evaluate.forecast_track_record: prior = response-weighted mix of the TRAIN targets; each held-out
    event's forecast is scored against its test target (events without one are left out)."""
    from types import SimpleNamespace

    from socialalign_jax.data import targets as T
    from socialalign_jax.data.tfds_builders import Dataset
    from socialalign_jax.train.evaluate import forecast_track_record

    rng = np.random.default_rng(4)
    names = [f"e{i}" for i in range(40)]
    train = {i: {"dist": [0.6, 0.3, 0.1], "count": 50 + i, "source": "crowd"} for i in range(20)}
    test_real = rng.dirichlet(np.ones(3) * 2, size=20)
    test = {20 + i: {"dist": test_real[i].tolist(), "count": 80, "source": "crowd", "noise_floor": 0.002}
            for i in range(20)}
    test[39] = {"dist": [0.0, 0.0, 0.0], "count": 0, "source": "none", "noise_floor": None}
    meta = {"targets": T.to_json({"train": train, "test": test}, names)}
    job = SimpleNamespace(data=SimpleNamespace(dataset=Dataset("d", meta, {}), labels=("negative", "neutral", "positive")))
    per_event = {20 + i: test_real[i].tolist() for i in range(20)}  # perfect forecasts
    rec = forecast_track_record(job, per_event, seed=0)
    assert rec["num_events"] == 19 and rec["prior"] == pytest.approx([0.6, 0.3, 0.1])
    assert rec["status"] == "better" and rec["skill"]["point"] == pytest.approx(1.0)
    assert rec["noise_floor"] == pytest.approx(0.002) and rec["labels"] == ["negative", "neutral", "positive"]
    # no held-out forecasts: nothing measured, said so
    assert forecast_track_record(job, {}, seed=0)["status"] == "none"


def test_an_export_carries_the_record_of_its_own_step_only(tmp_path):
    import json

    from socialalign_jax.inference.export import carry_track_record
    from socialalign_jax.predict.predictor import read_skill

    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    out.mkdir()
    assert carry_track_record(run, 3, out) == []  # a run without a record: nothing to carry
    rec = {"status": "not_better", "num_events": 40, "w": 0.1, "prior": [0.5, 0.3, 0.2], "step": 3,
           "skill": {"point": -0.01, "low": -0.05, "high": 0.02}}
    (run / "forecast_skill.json").write_text(json.dumps(rec), "utf-8")
    assert carry_track_record(run, 2, out) == [] and read_skill(str(out)) is None  # another step's adapters
    assert carry_track_record(run, 3, out) == [out / "forecast_skill.json"]
    assert read_skill(str(out)) == rec
