"""The real public corpora in ../shared/data, when present (skipped otherwise).

Counts are re-derived here straight from the raw files (json / line splitting), not taken
from converter output. CED is extracted to a temporary directory (never into the repo) and
read with max_events to keep the test short.
"""

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from socialalign_jax.data import tfds_builders as B
from socialalign_jax.data.converters import ced, nlpcc2016, zs_csd

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def need(p: Path) -> Path:
    if not p.exists():
        pytest.skip(f"{p} not present")
    return p


def test_zs_csd_counts_match_the_raw_file():
    d = need(DATA / "zs_csd")
    raw = json.loads((d / "dev_data.json").read_text("utf-8"))
    names = {v: k for k, v in json.loads((d / "label.json").read_text("utf-8")).items()}
    evs = zs_csd.read_zs_csd(str(d))
    assert len(evs) == len({r["target"].strip() for r in raw})
    assert sum(len(e.cases) for e in evs) == len(raw)
    assert Counter(c.sentiment for e in evs for c in e.cases) == Counter(names[r["label"]] for r in raw)
    assert sum(len(e.cases) for e in evs if len(e.cases)) == evs.source_info["cases"]
    first = {e.event_id: e for e in evs}[raw[1]["target"].strip()].cases[1]
    assert first.weibo == raw[1]["sentences"][-1] and first.history[0].text == raw[1]["sentences"][-2]


def test_nlpcc_counts_match_the_raw_file():
    f = need(DATA / "nlpcc2016_stance" / "nlpcc2016_stance_labeled.tsv")
    lines = f.read_text("utf-8").splitlines()[1:]
    stance = Counter(line.split("\t")[4] for line in lines)
    targets = {line.split("\t")[3] for line in lines}
    evs = nlpcc2016.read_nlpcc2016(str(f))
    assert {e.event_id for e in evs} == targets
    got = Counter(c.sentiment for e in evs for c in e.cases)
    assert got == Counter({"favor": stance["FAVOR"], "against": stance["AGAINST"], "neutral": stance["NONE"]})


@pytest.fixture(scope="module")
def ced_dir(tmp_path_factory):
    tgz = need(DATA / "ced" / "CED_Dataset.tar.gz")
    out = tmp_path_factory.mktemp("ced")
    with tarfile.open(tgz) as t:
        t.extractall(out, filter="data")
    return out / "CED_Dataset"


def test_ced_first_events_account_for_every_response(ced_dir):
    n = 150
    evs = ced.read_ced(str(ced_dir), max_events=n)
    info = evs.source_info
    files = sorted((ced_dir / "original-microblog").glob("*.json"), key=ced._sort_key)[:n]
    raw_uid, total = {}, 0
    for f in files:
        for sub in ("rumor-repost", "non-rumor-repost"):
            if (ced_dir / sub / f.name).exists():
                rows = json.loads((ced_dir / sub / f.name).read_text("utf-8"))
                total += len(rows)
                raw_uid[f.stem] = {str(r["uid"]) for r in rows}
    assert info["records"] == total
    event_level = {k: v for k, v in info["skipped"].items() if k.startswith("event")}
    assert info["records"] == info["cases"] + sum(info["skipped"].values()) - sum(event_level.values())
    assert info["silver_labels"] and info["cases"] > 0
    for ev in evs:
        assert ev.event_id in raw_uid
        for c in ev.cases:
            assert c.sentiment in ("negative", "neutral", "positive")
            assert c.user_name.startswith("用户") and not any(u in c.user_name for u in raw_uid[ev.event_id])
            assert "//@" not in c.weibo and len(c.history) >= 5


def test_zs_csd_builds_with_stance_classes(tmp_path):
    d = need(DATA / "zs_csd")
    cfg = B.SocialConfig(name="real", source="zs_csd", input=str(d), max_length=512, test_fraction=0.34,
                         labels=zs_csd.LABELS, max_events=3)
    ds = B.open_dataset(B.build(tmp_path, cfg))
    m = ds.metadata
    assert m["classes"] == list(zs_csd.LABELS) and len(m["events"]) == 3
    n = sum(len(v) for v in m["labels"].values())
    assert n + m["stats"]["skipped_too_long"] == m["source_info"]["cases"]
