"""Experiments: event folds, the bootstrap, paired differences, the feature cache and design-A heads.

References are independent: numpy loops over explicit index draws, scipy.stats.bootstrap,
the list-based metrics.macro_f1, and the model's own forward + sentiment_logits.
"""

import json

import jax
import numpy as np
import pytest

from socialalign_jax.core.labels import DEFAULT_LABELS
from socialalign_jax.evaluation import bootstrap, distributions, metrics
from socialalign_jax.experiments import cells as C
from socialalign_jax.experiments import folds as FO
from socialalign_jax.experiments import summary as S


# ----------------------------------------------------------------------------- folds

@pytest.mark.parametrize("n,k", [(45, 5), (12, 3), (7, 7), (503, 5)])
def test_event_folds_hold_out_every_event_exactly_once(n, k):
    names = [f"event {i:03d}" for i in range(n)]
    folds = FO.event_folds(names[::-1] + names[:3], k, seed=3)  # order and duplicates do not matter
    assert len(folds) == k
    held = [e for f in folds for e in f]
    assert sorted(held) == names  # every event once, none twice
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for f in folds:  # train = the other folds: disjoint from the test fold
        train = set(names) - set(f)
        assert not train & set(f) and len(train) + len(f) == n
    assert FO.event_folds(names, k, seed=3) == folds
    assert FO.event_folds(names, k, seed=4) != folds
    assert FO.fold_of(folds)[folds[1][0]] == 1


def test_event_folds_refuses_too_few_events():
    with pytest.raises(ValueError, match="cannot fill"):
        FO.event_folds(["a", "b"], 3)
    with pytest.raises(ValueError, match="k must be"):
        FO.event_folds(["a", "b"], 1)


# ----------------------------------------------------------------------------- bootstrap

def test_resample_weights_are_draws_with_replacement():
    w = bootstrap.resample_weights(10, 500, seed=1)
    assert w.shape == (500, 10) and (w.sum(1) == 10).all() and w.min() >= 0
    # each unit is drawn Binomial(10, 1/10) times: mean 1
    assert abs(w.mean() - 1.0) < 0.05
    strata = np.array([0] * 3 + [1] * 7)
    ws = bootstrap.resample_weights(10, 500, seed=1, strata=strata)
    assert (ws[:, :3].sum(1) == 3).all() and (ws[:, 3:].sum(1) == 7).all()
    assert np.array_equal(bootstrap.resample_weights(10, 50, seed=2), bootstrap.resample_weights(10, 50, seed=2))


def test_bootstrap_mean_interval_matches_numpy_loop_and_scipy():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 0.05, size=60)  # skewed, like per-event JSD
    res = bootstrap.bootstrap(lambda w: w @ x / w.sum(1), x.size, n_resamples=4000, seed=7)
    # the same draws, one resample at a time with explicit indices
    g = np.random.default_rng(7)
    means = [x[g.integers(0, x.size, size=x.size)].mean() for _ in range(4000)]
    lo, hi = np.percentile(means, [2.5, 97.5])
    assert res["point"] == pytest.approx(x.mean(), rel=1e-12)
    assert res["low"] == pytest.approx(lo, rel=1e-9) and res["high"] == pytest.approx(hi, rel=1e-9)
    # an independent implementation (other draws): agrees to Monte-Carlo error
    scipy_stats = pytest.importorskip("scipy.stats")
    ref = scipy_stats.bootstrap((x,), np.mean, n_resamples=20000, method="percentile", random_state=1)
    sd = x.std() / np.sqrt(x.size)
    assert abs(res["low"] - ref.confidence_interval.low) < 0.15 * sd
    assert abs(res["high"] - ref.confidence_interval.high) < 0.15 * sd


def test_percentile_interval_ignores_nan_and_checks_confidence():
    assert bootstrap.percentile_interval(np.array([np.nan, 1.0, 2.0, 3.0]), 0.5) == (1.5, 2.5)
    with pytest.raises(ValueError):
        bootstrap.percentile_interval(np.ones(3), 1.0)


# ----------------------------------------------------------------------------- metrics on events

def test_macro_f1_confusion_equals_list_macro_f1():
    rng = np.random.default_rng(1)
    classes = ["favor", "against", "neutral"]
    for trial in range(20):
        n = int(rng.integers(1, 40))
        k_used = int(rng.integers(1, 4))  # sometimes a class never appears
        gold = rng.integers(0, k_used, n)
        pred = rng.integers(0, 3, n)
        conf = np.zeros((3, 3))
        np.add.at(conf, (gold, pred), 1)
        ref, _ = metrics.macro_f1([classes[i] for i in gold], [classes[i] for i in pred])
        assert metrics.macro_f1_confusion(conf) == pytest.approx(ref, abs=1e-12)
    stack = np.stack([conf, 2 * conf])  # weights scale every count: same F1
    assert np.allclose(metrics.macro_f1_confusion(stack), metrics.macro_f1_confusion(conf))


def _cell(fold, seed, names, jsd, conf):
    return {"fold": fold, "seed": seed,
            "events": [{"event": n, "n": int(np.sum(c)), "real": [1, 0, 0], "pred": [1, 0, 0], "jsd": j,
                        "conf": np.asarray(c).tolist()} for n, j, c in zip(names, jsd, conf)]}


def test_summary_rows_and_paired_differences_match_a_direct_derivation():
    rng = np.random.default_rng(2)
    folds = [[f"e{i}" for i in range(f * 4, f * 4 + 4)] for f in range(3)]  # 12 events, 3 folds
    cells = {"a": [], "b": []}
    truth = {}
    for row, shift in (("a", 0.0), ("b", 0.02)):
        for seed in (0, 1):
            for f, names in enumerate(folds):
                j = rng.uniform(0, 0.1, 4) + shift
                conf = rng.integers(0, 5, (4, 3, 3))
                cells[row].append(_cell(f, seed, names, j, conf))
                truth[(row, seed, f)] = (j, conf)
    out = S.summarise(cells, [("a", "b")], n_resamples=300, seed=5)
    # point: the mean over folds and seeds of the per-cell mean event JSD and per-cell macro-F1
    pt = np.mean([truth[("a", s, f)][0].mean() for s in (0, 1) for f in range(3)])
    assert out["rows"]["a"]["jsd_mean"]["point"] == pytest.approx(pt)
    f1 = np.mean([metrics.macro_f1_confusion(truth[("a", s, f)][1].sum(0)) for s in (0, 1) for f in range(3)])
    assert out["rows"]["a"]["macro_f1"]["point"] == pytest.approx(f1)
    # interval of the difference: the same stratified draws, recomputed per resample by hand
    names = sorted(e for f in folds for e in f)
    strata = np.asarray([int(n[1:]) // 4 for n in names])
    w = bootstrap.resample_weights(len(names), 300, seed=5, strata=strata)
    pos = {n: i for i, n in enumerate(names)}
    diffs = []
    for r in range(300):
        d = []
        for s in (0, 1):
            for f, fn in enumerate(folds):
                ww = np.asarray([w[r, pos[n]] for n in fn], float)
                d.append(ww @ truth[("a", s, f)][0] / ww.sum() - ww @ truth[("b", s, f)][0] / ww.sum())
        diffs.append(np.mean(d))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    d = out["differences"][0]
    assert d["jsd_mean"]["low"] == pytest.approx(lo) and d["jsd_mean"]["high"] == pytest.approx(hi)
    assert d["jsd_mean"]["point"] == pytest.approx(pt - out["rows"]["b"]["jsd_mean"]["point"])
    md = S.markdown(out, {"a": "row A"})
    assert "row A - b" in md and "[95% CI]" in md


def test_event_records_use_the_evaluation_functions():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    labels = np.array([0, 0, -1])
    ev = np.array([0, 0, 1])
    real = np.array([[0.5, 0.5, 0.0], [0.2, 0.2, 0.6]])
    recs = C.event_records(["x", "y"], real, probs, labels, ev)
    assert recs[0]["pred"] == pytest.approx([0.4, 0.5, 0.1])
    assert recs[0]["jsd"] == pytest.approx(float(distributions.jsd(real[0], [0.4, 0.5, 0.1])))
    assert recs[0]["conf"] == [[1, 1, 0], [0, 0, 0], [0, 0, 0]] and recs[1]["n"] == 1
    m = C.cell_metrics(recs, ["a", "b", "c"])
    assert m["accuracy"] == 0.5
    assert m["macro_f1"] == pytest.approx(metrics.macro_f1(["a", "a"], ["a", "b"])[0])


# ----------------------------------------------------------------------------- features and heads

@pytest.fixture(scope="module")
def tiny():
    from socialalign_jax.weights.resolve import resolve_weights
    return resolve_weights("random:tiny-llama")


def _selection(n_events=6, per_event=5, seed=0, vocab=512):
    rng = np.random.default_rng(seed)
    prompts, ev, lab = [], [], []
    for e in range(n_events):
        for _ in range(per_event):
            prompts.append(rng.integers(3, vocab, int(rng.integers(5, 40))).astype(np.int32))
            ev.append(e)
            lab.append(int(rng.integers(0, 3)))
    events = [{"name": f"event {e}", "real": (np.bincount(np.array(lab)[np.array(ev) == e], minlength=3)
                                              / per_event).tolist(), "count": per_event} for e in range(n_events)]
    n = len(prompts)
    return {"prompts": prompts, "events": events, "classes": list(DEFAULT_LABELS), "pad_id": 0,
            "examples": {"event": np.array(ev), "label": np.array(lab), "prompt_len": np.array([len(p) for p in prompts]),
                         "case_index": np.arange(n), "row": np.arange(n)}}


def test_feature_cache_is_what_the_head_reads_and_resumes(tiny, tmp_path):
    import jax.numpy as jnp

    from socialalign_jax.experiments import features as F, heads
    from socialalign_jax.model import decoder

    sel = _selection()
    params = jax.device_put(tiny.params)
    digest = F.params_digest(tiny.params)
    out = tmp_path / "feat"
    F.compute(out, sel, params, tiny.cfg, model_digest=digest, tok_digest="t", chunk_size=8, progress=False)
    fs = F.FeatureSet(out)
    assert fs.features.shape == (30, tiny.cfg.hidden_size)
    # the head on cached features == the model's sentiment head on the full padded batch
    head = heads.init_head(tiny.cfg.hidden_size, 3, seed=0)
    idx = [0, 7, 13]
    seq = 48
    ids = np.zeros((3, seq), np.int32)
    mask = np.zeros((3, seq), np.int32)
    for r, i in enumerate(idx):
        p = sel["prompts"][i]
        ids[r, :len(p)], mask[r, :len(p)] = p, 1
        ids[r, len(p):len(p) + 3], mask[r, len(p):len(p) + 3] = 5, 1  # a "response" after the prompt
    hid = decoder.forward(params, jnp.asarray(ids), tiny.cfg, attention_mask=jnp.asarray(mask),
                          logits_at=None, deterministic=True).hidden
    want = np.asarray(decoder.sentiment_logits(hid, jnp.asarray(sel["examples"]["prompt_len"][idx]), head))
    got = fs.features[idx] @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)

    # resume: drop a chunk from the manifest and delete it; only that chunk is recomputed
    man = json.loads((out / F.MANIFEST).read_text())
    (out / "chunk_00002.npz").unlink()
    man["done"], man["complete"] = [0, 1, 3], False
    (out / F.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(Exception, match="incomplete"):
        F.FeatureSet(out)
    # a partial cache as a sample of events: only events whose every example is done, same features
    part = F.FeatureSet(out, allow_partial=True)
    names = [e["name"] for e in part.events]
    assert part.partial and 0 < len(names) < 6
    full_rows = [i for i in range(30) if fs.event_names[fs.examples["event"][i]] in names]
    np.testing.assert_array_equal(part.features, fs.features[full_rows])
    assert [part.event_names[e] for e in part.examples["event"]] == [fs.event_names[fs.examples["event"][i]]
                                                                     for i in full_rows]
    before = (out / "chunk_00000.npz").stat().st_mtime_ns
    F.compute(out, sel, params, tiny.cfg, model_digest=digest, tok_digest="t", chunk_size=8, progress=False)
    assert (out / "chunk_00000.npz").stat().st_mtime_ns == before
    np.testing.assert_array_equal(F.FeatureSet(out).features, fs.features)
    # a changed prompt changes the key: the cache is recomputed, never trusted
    sel2 = dict(sel, prompts=[p + 1 for p in sel["prompts"]])
    logs = []
    F.compute(out, sel2, params, tiny.cfg, model_digest=digest, tok_digest="t", chunk_size=8, progress=False,
              log=logs.append)
    assert logs and "key changed" in logs[0]
    assert F.FeatureSet(out).key != fs.key


def test_design_a_head_learns_event_distributions_with_the_training_loss():
    """Separable synthetic features: the head trained by heads.train_head (pipeline batches, total_loss,
    make_optimizer) predicts each held-out event's class mix; the macro loss lowers L_macro."""
    from socialalign_jax.experiments import heads

    rng = np.random.default_rng(0)
    n_events, per = 12, 16
    centers = rng.normal(size=(3, 16)) * 3
    feats, ev, lab = [], [], []
    real = rng.dirichlet(np.ones(3) * 2, size=n_events)
    for e in range(n_events):
        y = rng.choice(3, size=per, p=real[e])
        for c in y:
            feats.append(centers[c] + rng.normal(size=16) * 0.3)
            ev.append(e)
            lab.append(c)
    feats, ev, lab = np.asarray(feats, np.float32), np.asarray(ev), np.asarray(lab)
    emp = np.stack([np.bincount(lab[ev == e], minlength=3) / per for e in range(n_events)])
    train = np.flatnonzero(ev < 9)
    cfg = heads.HeadConfig(steps=150, lr=3e-2, events_per_batch=3, cases_per_event=8)
    head, curve = heads.train_head(cfg, feats, lab, ev, train, emp, seed=0)
    assert curve.shape == (150, 3) and curve[-10:, 0].mean() < 0.3 * curve[:10, 0].mean()
    p = heads.predict(cfg, head, feats[ev >= 9])
    assert (p.argmax(1) == lab[ev >= 9]).mean() > 0.9
    macro = heads.HeadConfig(steps=150, lr=3e-2, events_per_batch=3, cases_per_event=8, lambda_macro=1.0,
                             estimator="gumbel")
    _, curve_m = heads.train_head(macro, feats, lab, ev, train, emp, seed=0)
    assert np.isfinite(curve_m).all() and curve_m[-10:, 2].mean() < curve_m[:10, 2].mean()
    # same seed, same plan, same result; another seed: another init and data order
    _, again = heads.train_head(cfg, feats, lab, ev, train, emp, seed=0)
    np.testing.assert_array_equal(again, curve)
    _, other = heads.train_head(cfg, feats, lab, ev, train, emp, seed=1)
    assert not np.array_equal(other, curve)
