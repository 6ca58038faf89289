"""experiments/near_duplicates.py: trigram Jaccard by hand, the last rerun of a cell counts, and the
table keeps only held-out events without a twin."""

import json

import numpy as np
import pytest
from tests.script_loader import load_script



@pytest.fixture(scope="module")
def nd():
    return load_script("experiments/near_duplicates.py", "near_duplicates")


def test_max_similarity_by_hand(nd):
    # abcd: {abc, bcd}; abce: {abc, bce} -> 1/3; xyz shares nothing; ab is its own set.
    got = nd.max_similarity(["abcd", "abce", "xyz", "ab"])
    np.testing.assert_allclose(got, [1 / 3, 1 / 3, 0.0, 0.0])
    assert nd.max_similarity(["同一条新闻", "同一条新闻"]).tolist() == [1.0, 1.0]


def _cell(row, fold, seed, jsds):
    return {"row": row, "fold": fold, "seed": seed, "events": [{"event": e, "jsd": j} for e, j in jsds.items()]}


def test_table_drops_twins_and_reads_the_last_rerun(nd, tmp_path, capsys):
    feats = tmp_path / "f"
    feats.mkdir()
    names = ["a", "b", "c", "d"]
    news = ["北京地铁今天停运了吗", "北京地铁今天停运了吗？", "上海下雪", "广州台风登陆"]  # a and b are twins
    (feats / "events.json").write_text(json.dumps({"events": [{"name": n} for n in names], "classes": []}))
    (feats / "texts.json").write_text(json.dumps([{"news": t, "user": "", "response": ""} for t in news]))
    np.savez(feats / "examples.npz", event=np.arange(4))
    cells = [_cell("prior", 0, 0, {"a": 0.02, "b": 0.02, "c": 0.04, "d": 0.02}),
             _cell("m", 0, 0, {"a": 0.0, "b": 0.0, "c": 0.04, "d": 0.02}),   # replaced by the rerun below
             _cell("m", 0, 0, {"a": 0.0, "b": 0.0, "c": 0.01, "d": 0.02})]
    (tmp_path / "cells.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cells))
    assert nd.main(["--features", str(feats), "--cells", str(tmp_path / "cells.jsonl"), "--rows", "m",
                    "--n_resamples", "50"]) == 0
    out = capsys.readouterr().out
    assert "4 held-out events; 2 have a near-duplicate" in out and "2 kept" in out
    row = next(line for line in out.splitlines() if line.startswith("| m |"))
    # all four: (0 + 0 + 0.01 + 0.02) / 4; kept c, d: 0.015 against the prior's 0.03 -> +50%
    assert row.startswith("| m | 0.0075 | 0.0150 [") and "| +50.0% [" in row
