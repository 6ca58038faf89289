"""tfds array_record builders: round trip, splits, targets, and the pipeline on top.

References: examples are re-encoded here with prompt.build_example straight from the raw
files (the builder's tfds/array_record path is what is under test), labels and target
distributions are re-counted from the raw JSON with plain Python, and split membership
is checked from the raw events.
"""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from socialalign_jax.data import pipeline as P
from socialalign_jax.data import records, tfds_builders as B
from socialalign_jax.data.prompt import PromptConfig, build_example

CLASSES = list(records.DEFAULT_LABELS)


def write_events(d: Path, n_events=6, seed=0):
    """Small raw event files; some cases unlabelled, users shared across events."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for e in range(n_events):
        cases = []
        for c in range(int(rng.integers(2, 7))):
            case = {"user_name": f"用户{int(rng.integers(0, 5))}",
                    "weibo": f"事件{e}的第{c}条回复，" + "好" * int(rng.integers(1, 20)),
                    "history": [{"text": f"我在{k}号发的微博，讲了事件{(e + k) % 3}"} for k in range(6)],
                    "user_persona": "一名关心社会新闻的上班族"}
            lab = int(rng.integers(-1, 3))
            if lab >= 0:
                case["sentiment"] = CLASSES[lab]
            cases.append(case)
        (d / f"ev{e:02d}.json").write_text(json.dumps(
            {"topic": f"话题{e}", "news": f"第{e}条新闻：某市发生了一件大事。", "cases": cases},
            ensure_ascii=False), encoding="utf-8")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("builders")
    write_events(root / "events")
    cfg = B.SocialConfig(name="t", input=str(root / "events"), max_length=512, test_fraction=0.34, seed=3)
    path = B.build(root / "out", cfg)
    return root, cfg, path, B.open_dataset(root / "out")


def raw_cases(events_dir: Path):
    """[(event name, case index, raw case dict)] from the JSON files, in file order."""
    out = []
    for f in sorted(events_dir.glob("*.json")):
        blob = json.loads(f.read_text(encoding="utf-8"))
        out += [(f.stem, i, c) for i, c in enumerate(blob["cases"])]
    return out


def test_round_trip_every_example_equals_a_direct_encoding(built):
    root, cfg, path, ds = built
    from socialalign_jax.weights.tokenizer import load_tokenizer

    tok = load_tokenizer()
    events = {e.event_id: e for e in records.read_event_dir(root / "events")}
    raw = {(n, i): c for n, i, c in raw_cases(root / "events")}
    pcfg = PromptConfig(max_length=512)
    seen = set()
    for split in ("train", "test"):
        src = ds.source(split)
        assert len(src) == len(ds.metadata["index"][split]["event_id"])
        for i in range(len(src)):
            ex = src[i]
            name = ex["event"].decode()
            ci = int(ex["case_index"])
            ev = events[name]
            want = build_example(ev.cases[ci], ev, tok, pcfg)
            np.testing.assert_array_equal(ex["input_ids"], want["input_ids"])
            np.testing.assert_array_equal(ex["loss_mask"], want["loss_mask"])
            for k in ("user_end", "news_end", "prompt_len", "n_truncated_history_chars"):
                assert int(ex[k]) == want[k], k
            rc = raw[(name, ci)]
            assert ex["response"].decode() == rc["weibo"] and ex["user"].decode() == rc["user_name"]
            assert int(ex["label"]) == (CLASSES.index(rc["sentiment"]) if "sentiment" in rc else -1)
            assert ds.metadata["events"][int(ex["event_id"])] == name
            assert ds.metadata["index"][split]["length"][i] == len(want["input_ids"])
            seen.add((name, ci))
    assert seen == set(raw), "every raw case is in exactly one split"
    assert ds.metadata["config"]["max_length"] == 512 and ds.metadata["config"]["source"] == "socialweibo"


def test_event_split_holds_out_whole_events_and_targets_match_raw_counts(built):
    root, cfg, path, ds = built
    split_events = {s: {x["event"].decode() for x in ds.source(s)} for s in ("train", "test")}
    assert not split_events["train"] & split_events["test"]
    assert len(split_events["test"]) == round(0.34 * 6)
    # targets recounted from the raw files
    counts = {}
    for name, _, c in raw_cases(root / "events"):
        counts.setdefault(name, Counter())
        if "sentiment" in c:
            counts[name][c["sentiment"]] += 1
    tj = json.loads((path / "targets.json").read_text(encoding="utf-8"))
    for split in ("train", "test"):
        for x in ds.source(split):
            name = x["event"].decode()
            n = sum(counts[name].values())
            want = [counts[name][c] / n for c in CLASSES] if n else [0.0] * 3
            np.testing.assert_allclose(x["target_dist"], want, rtol=1e-6)
            t = tj[split][str(int(x["event_id"]))]
            assert t["source"] == ("none" if n == 0 else "train" if split == "train" else "heldout")
            np.testing.assert_allclose(t["dist"], want)


def test_user_split_holds_out_whole_users(tmp_path):
    write_events(tmp_path / "events", n_events=4, seed=1)
    cfg = B.SocialConfig(name="u", input=str(tmp_path / "events"), max_length=512, test_fraction=0.4,
                         split_by="user", seed=0)
    ds = B.open_dataset(B.build(tmp_path / "out", cfg))
    users = {s: {x["user"].decode() for x in ds.source(s)} for s in ("train", "test")}
    assert users["test"] and users["train"] and not users["train"] & users["test"]
    # a test row of an event with labelled train rows is scored against the train distribution
    tr = {}
    for x in ds.source("train"):
        if x["label"] >= 0:
            tr.setdefault(int(x["event_id"]), []).append(int(x["label"]))
    for x in ds.source("test"):
        e = int(x["event_id"])
        if e in tr:
            np.testing.assert_allclose(x["target_dist"], np.bincount(tr[e], minlength=3) / len(tr[e]), rtol=1e-6)


def test_pipeline_over_the_built_source_matches_in_memory_examples(built):
    _, _, _, ds = built
    src = ds.source("train")
    mem = [src[i] for i in range(len(src))]
    c = P.BatchConfig(events_per_batch=2, cases_per_event=2, seq_len=ds.max_length, pad_id=ds.pad_id,
                      num_epochs=1, seed=1, read_threads=2)
    a = list(P.TrainIterator(src, c, index=ds.index("train"), process_index=0, process_count=1))
    b = list(P.TrainIterator(mem, c, process_index=0, process_count=1))  # index scanned from records
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for k in P.BATCH_DTYPES:
            np.testing.assert_array_equal(x[k], y[k])
            assert x[k].dtype == P.BATCH_DTYPES[k]
    ev = list(P.eval_batches(ds.source("test"), 4, ds.max_length, ds.pad_id))
    assert sum(int(b["example_mask"].sum()) for b in ev) == len(ds.source("test"))


def test_rebuilding_into_a_used_dir_is_refused(built):
    root, cfg, path, _ = built
    with pytest.raises(records.DataError, match="already there"):
        B.build(root / "out", cfg)


def test_build_runs_without_tensorflow(built):
    assert "tensorflow" not in sys.modules


def test_bundled_sample_builds_in_under_a_minute(tmp_path):
    import time

    from socialalign_jax.data.sample import load_sample_dir

    d = load_sample_dir()
    n_raw = sum(len(json.loads(f.read_text(encoding="utf-8"))["cases"]) for f in sorted(d.glob("*.json")))
    t = time.perf_counter()
    path = B.build(tmp_path / "out", B.SocialConfig(name="sample", input=str(d), max_length=1024))
    elapsed = time.perf_counter() - t
    ds = B.open_dataset(path)
    assert sum(len(ds.source(s)) for s in ds.sources) == n_raw == ds.metadata["stats"]["built"]
    assert elapsed < 60, f"sample build took {elapsed:.1f}s"


def test_stock_tfds_reads_and_builds_by_name(tmp_path, capfd):
    """tfds.data_source / tfds.builder by name (the registered 'default' config, or 'name/config'
    for another config name) give exactly what open_dataset gives; building prints no download
    banner and leaves no downloads/ folder."""
    import tensorflow_datasets as tfds

    write_events(tmp_path / "events")
    for name, by_name in (("default", "socialweibo"), ("mine", "socialweibo/mine")):
        d = tmp_path / name
        B.build(d, B.SocialConfig(name=name, input=str(tmp_path / "events"), max_length=512, test_fraction=0.34,
                                  labels=("negative", "neutral", "positive", "other")))
        ours = B.open_dataset(d)
        src = tfds.data_source(by_name, data_dir=str(d))
        assert sorted(src) == sorted(ours.sources)
        for split in src:
            assert len(src[split]) == len(ours.source(split)) > 0
            for i in range(len(src[split])):
                a, b = src[split][i], ours.source(split)[i]
                assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
            assert a["target_dist"].shape == (4,)  # the built dataset's own features, not the config's
        info = tfds.builder(by_name, data_dir=str(d)).info
        assert {s: info.splits[s].num_examples for s in src} == {s: len(src[s]) for s in src}
        assert info.metadata["classes"] == ["negative", "neutral", "positive", "other"]
        assert not (d / "downloads").exists()
    out = capfd.readouterr()
    assert "Downloading and preparing" not in out.out + out.err and "downloaded and prepared" not in out.out + out.err


def test_source_alpaca_builds_the_same_examples_as_the_raw_events(tmp_path):
    """--source alpaca on records in the authors' format (their template applied by the test's own
    copy, tests/authors_prompt.py) gives the same token ids, spans and loss masks as --source
    socialweibo on the raw events they were made from."""
    from tests.authors_prompt import authors_instruction

    (tmp_path / "raw").mkdir()
    records = []
    for e in range(2):
        cases = [{"user_name": f"用户{e}{c}", "weibo": f"回复{e}{c}，" + "好" * (c + 1), "history_is_selected": True,
                  "history": [{"text": f"帖子{k}"} if k != 2 else {"text": "转发评论", "retweet": {"text": f"原文{e}"}}
                              for k in range(5)],
                  "user_persona": f"画像{c}\n\n喜欢新闻"} for c in range(3)]
        ev = {"topic": f"话题{e}", "news": f"第{e}条新闻：某市发生了一件大事。", "cases": cases}
        (tmp_path / "raw" / f"ev{e}.json").write_text(json.dumps(ev, ensure_ascii=False), encoding="utf-8")
        records += [{"instruction": authors_instruction(c, ev["topic"], ev["news"], "full"), "input": "",
                     "output": c["weibo"]} for c in cases]
    (tmp_path / "alpaca.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    built = {}
    for source, inp in (("socialweibo", tmp_path / "raw"), ("alpaca", tmp_path / "alpaca.json")):
        B.build(tmp_path / source, B.SocialConfig(name="t", source=source, input=str(inp), max_length=512,
                                                  test_fraction=0.0))
        src = B.open_dataset(tmp_path / source).source("train")
        built[source] = [src[i] for i in range(len(src))]
    assert len(built["alpaca"]) == len(built["socialweibo"]) == 6
    for a, b in zip(built["alpaca"], built["socialweibo"]):
        for k in ("input_ids", "loss_mask", "user_end", "news_end", "prompt_len"):
            assert np.array_equal(a[k], b[k]), k
