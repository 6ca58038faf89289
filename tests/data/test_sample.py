"""Bundled synthetic sample: reproducible, valid, and carrying user- and event-level signal."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

from socialalign_jax.data.records import read_event_dir, read_event_file
from socialalign_jax.data.sample import DEFAULT_SEED, load_sample_dir, write_sample


def test_regeneration_is_byte_identical(tmp_path):
    a = write_sample(tmp_path / "a", DEFAULT_SEED)
    b = write_sample(tmp_path / "b", DEFAULT_SEED)
    bundled = sorted(load_sample_dir().glob("*.json"))
    assert [p.name for p in a] == [p.name for p in bundled]
    for pa, pb, pc in zip(a, b, bundled):
        assert pa.read_bytes() == pb.read_bytes() == pc.read_bytes(), pc.name
    other = write_sample(tmp_path / "c", DEFAULT_SEED + 1)
    assert other[0].read_bytes() != a[0].read_bytes()
    assert (load_sample_dir().parent / "README.md").read_text(encoding="utf-8").startswith("# Synthetic sample")


def test_counts_validity_and_size():
    files = sorted(load_sample_dir().glob("*.json"))
    assert len(files) >= 12
    assert sum(p.stat().st_size for p in load_sample_dir().parent.rglob("*") if p.is_file()) < 2_000_000
    for p in files:
        ev = read_event_file(p)  # the default validation: 5+ history posts, known labels
        assert len(ev.cases) >= 40 and all(c.persona and c.sentiment for c in ev.cases)
        assert all(10 <= len(c.weibo) <= 30 for c in ev.cases)


def test_event_and_user_signal():
    events = read_event_dir(load_sample_dir())
    pos_frac = [sum(c.sentiment == "positive" for c in e.cases) / len(e.cases) for e in events]
    assert max(pos_frac) - min(pos_frac) > 0.5  # events differ
    by_disposition = Counter()
    totals = Counter()
    for e in events:
        for c in e.cases:
            kind = "opt" if "乐观开朗" in c.persona or "热爱生活" in c.persona or "相信明天会更好" in c.persona \
                or "喜欢给别人点赞" in c.persona else ("pes" if "吐槽" in c.persona or "抱怨" in c.persona
                                                 or "不顺眼" in c.persona or "敏感" in c.persona else "neu")
            totals[kind] += 1
            by_disposition[kind] += c.sentiment == "positive"
    assert by_disposition["opt"] / totals["opt"] > by_disposition["pes"] / totals["pes"] + 0.3


def test_make_sample_cli_check():
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "scripts/make_sample.py", "--check"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
