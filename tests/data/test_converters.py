"""Public-corpus converters (CED, ZS-CSD, NLPCC 2016) on fixtures written here in each
corpus's published format, then through the dataset builder and the build_dataset CLI.

Expected values are derived by hand from the fixture definitions (counts of each skip
reason, which responses become cases, the stance mapping), not from converter output.
"""

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from socialalign_jax.data import tfds_builders as B
from socialalign_jax.data.converters import ced, nlpcc2016, zs_csd
from socialalign_jax.data.converters.common import pseudonym
from socialalign_jax.data.records import DataError

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "build_dataset.py"


def cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


# ----------------------------------------------------------------------------- ZS-CSD

def zs_records():
    # Two targets; threads grow one comment at a time as in the published files.
    root = "开始也不能理解 后来发现园区里真的超干净"
    return [
        {"id": 0, "target": "迪士尼禁止携带食物", "target_type": "n", "sentences": [root], "speakers": [0], "label": 0},
        {"id": 1, "target": "迪士尼禁止携带食物", "target_type": "n", "sentences": [root, "干不干净和带吃的有什么关系？"],
         "speakers": [0, 1], "label": 1},
        {"id": 2, "target": "迪士尼禁止携带食物", "target_type": "n",
         "sentences": [root, "干不干净和带吃的有什么关系？", "说的好!支持你"], "speakers": [0, 1, 14], "label": 1},
        {"id": 3, "target": "反对彩礼习俗", "target_type": "c", "sentences": ["彩礼就是买卖婚姻", "各地风俗不同吧"],
         "speakers": [0, 1], "label": 2},
    ]


def write_zs(d: Path, records=None, label_map=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / "dev_data.json").write_text(json.dumps(records or zs_records(), ensure_ascii=False, indent=4), "utf-8")
    (d / "label.json").write_text(json.dumps(label_map or {"favor": 0, "against": 1, "neutral": 2}), "utf-8")
    return d


def test_zs_csd_mapping(tmp_path):
    evs = zs_csd.read_zs_csd(str(write_zs(tmp_path / "zs")))
    assert [e.event_id for e in evs] == ["迪士尼禁止携带食物", "反对彩礼习俗"]
    assert all(e.news == e.topic == e.event_id for e in evs)
    c = evs[0].cases[2]
    assert c.weibo == "说的好!支持你" and c.sentiment == "against"
    # preceding comments, most recent first, already selected (no BM25)
    assert [h.text for h in c.history] == ["干不干净和带吃的有什么关系？", "开始也不能理解 后来发现园区里真的超干净"]
    assert c.history_is_selected and evs[0].cases[0].history == []
    assert [x.sentiment for e in evs for x in e.cases] == ["favor", "against", "against", "neutral"]
    # the same speaker id in one thread is one pseudonym; another thread's speaker 1 is another
    assert evs[0].cases[1].user_name != evs[1].cases[0].user_name
    assert evs[0].cases[0].user_name.startswith("用户")
    assert evs.source_info["cases"] == 4 and evs.source_info["records"] == 4
    assert evs.source_info["silver_labels"] is False


def test_zs_csd_label_json_is_honoured_and_max_events(tmp_path):
    evs = zs_csd.read_zs_csd(str(write_zs(tmp_path / "zs", label_map={"against": 0, "neutral": 1, "favor": 2})))
    assert [x.sentiment for e in evs for x in e.cases] == ["against", "neutral", "neutral", "favor"]
    one = zs_csd.read_zs_csd(str(tmp_path / "zs"), max_events=1)
    assert len(one) == 1 and one.source_info["skipped"]["beyond_max_events"] == 1


@pytest.mark.parametrize("patch,field,what", [
    ({"label": 7}, "label", "unknown label id 7"),
    ({"speakers": [0]}, "speakers", "integer speaker ids"),
    ({"sentences": []}, "sentences", "non-empty list"),
])
def test_zs_csd_errors_name_file_record_field(tmp_path, patch, field, what):
    recs = zs_records()
    recs[2].update(patch)
    d = write_zs(tmp_path / "zs", recs)
    with pytest.raises(DataError) as e:
        zs_csd.read_zs_csd(str(d))
    msg = str(e.value)
    assert "dev_data.json: record 2: field '" + field + "'" in msg and what in msg and "\n" not in msg


# ----------------------------------------------------------------------------- NLPCC 2016

def test_nlpcc_combined_tsv(tmp_path):
    rows = ["task\tsplit\torig_id\ttarget\tstance\ttext",
            "A\ttrain\t1\tiPhone SE\tNONE\t3月31日，苹果iPhone SE正式开卖",
            "A\ttrain\t2\tiPhone SE\tFAVOR\t真的被低估了\\\t好用",  # escaped tab inside the text
            "A\ttest\t3\t开放二胎\tAGAINST\t养不起",
            "B\ttest\t4\t转基因食品\tAGAINST\t   "]  # empty text: counted, not a case
    p = tmp_path / "n.tsv"
    p.write_text("\n".join(rows) + "\n", "utf-8")
    evs = nlpcc2016.read_nlpcc2016(str(p))
    assert [e.event_id for e in evs] == ["iPhone SE", "开放二胎"]
    assert [c.sentiment for c in evs[0].cases] == ["neutral", "favor"]
    assert evs[0].cases[1].weibo == "真的被低估了\t好用"
    assert all(c.history == [] for e in evs for c in e.cases)
    assert len({c.user_name for e in evs for c in e.cases}) == 3
    info = evs.source_info
    assert info["records"] == 4 and info["cases"] == 3
    assert info["skipped"] == {"empty_text": 1, "events_without_cases": 1}


def test_nlpcc_official_layout_and_errors(tmp_path):
    p = tmp_path / "evasampledata4-TaskAA.txt"
    p.write_text("ID\tTARGET\tTEXT\tSTANCE\n1\t深圳禁摩限电\t支持\tFAVOR\n2\t深圳禁摩限电\t没标注的\n", "utf-8")
    evs = nlpcc2016.read_nlpcc2016(str(p))
    assert [c.sentiment for c in evs[0].cases] == ["favor", None]  # unlabelled kept
    assert evs.source_info["unlabelled_cases"] == 1
    p.write_text("ID\tTARGET\tTEXT\tSTANCE\n1\t深圳禁摩限电\t支持\tMAYBE\n", "utf-8")
    with pytest.raises(DataError, match=r"TaskAA.txt: record 0: field 'stance': unknown stance 'MAYBE'"):
        nlpcc2016.read_nlpcc2016(str(p))
    p.write_bytes("ID\tTARGET\tTEXT\tSTANCE\n1\t深圳\t支持\tFAVOR\n".encode("gb18030"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        nlpcc2016.read_nlpcc2016(str(p))


# ----------------------------------------------------------------------------- CED

class FixedLabeller:
    """Labels by a keyword so expected labels are known without snownlp."""

    def label(self, texts):
        return ["positive" if "好" in t else "negative" if "坏" in t else "neutral" for t in texts]


def write_ced(root: Path) -> dict:
    """7 events; 'alice' answers all 7 (usable), 'bob' 6 (one reply is emoji only), 'carol' 2.

    Returns the expected counts, derived from the definitions below.
    """
    d = root / "CED_Dataset"
    for sub in ("original-microblog", "rumor-repost", "non-rumor-repost"):
        (d / sub).mkdir(parents=True)
    news = ["#地铁停运#今天地铁全线停运", "【暴雨预警】本市发布暴雨红色预警", "某地发生地震，暂无伤亡",
            "#高考#今年高考报名人数创新高", "明天起油价上调，每升涨两毛", "某明星宣布退出娱乐圈", "动物园新来了熊猫"]
    for e, text in enumerate(news):
        name = f"{e}_mid{e}_{1000 + e}.json"
        (d / "original-microblog" / name).write_text(json.dumps({"text": text, "user": {}, "time": 1}), "utf-8")
        rows = [{"uid": "alice", "text": f"alice说这事好{e}//@别人: 转发内容", "mid": f"a{e}", "parent": "",
                 "kids": [], "date": f"2012-09-1{e} 10:00:00"},
                {"uid": "alice", "text": f"alice又说{e}", "mid": f"a2{e}", "parent": "", "kids": [],
                 "date": f"2012-09-1{e} 11:00:00"}]  # duplicate author in the event
        if e < 6:
            rows.append({"uid": 1234567, "text": "[哈哈][哈哈]！！" if e == 5 else f"bob觉得坏{e}", "mid": f"b{e}",
                         "parent": "", "kids": [], "date": f"2012-09-1{e} 12:00:00"})
        if e < 2:
            rows += [{"uid": "carol", "text": "", "mid": f"c{e}", "parent": "", "kids": [], "date": ""},
                     {"uid": "carol", "text": "转发微博", "mid": f"d{e}", "parent": "", "kids": [], "date": ""},
                     {"uid": "dave", "text": "//@carol: 原文", "mid": f"e{e}", "parent": "", "kids": [], "date": ""}]
        sub = "rumor-repost" if e % 2 else "non-rumor-repost"
        (d / sub / name).write_text(json.dumps(rows, ensure_ascii=False), "utf-8")
    # alice: 7 events x 2 usable responses -> 7 cases (other responses: 12 >= 5), 7 duplicates.
    # bob: usable in events 0..4 (5) -> each has only 4 others -> 5 under-5 skips; event 5 emoji only.
    return {"cases": 7, "skipped": {"author_history_under_5": 5, "duplicate_author_in_event": 7,
                                    "emoji_or_punctuation_only": 1, "empty": 2, "repost_chain_only": 2,
                                    "repost_marker_only": 2},
            "records": 7 * 2 + 6 + 2 * 3}


def test_ced_cases_history_skips_and_pseudonyms(tmp_path):
    want = write_ced(tmp_path)
    evs = ced.read_ced(str(tmp_path), labeller=FixedLabeller(), crowd_cap=0)
    info = evs.source_info
    assert info["cases"] == want["cases"] and info["records"] == want["records"]
    assert info["skipped"] == want["skipped"]
    # every response is either a case or counted under exactly one reason
    assert info["records"] == info["cases"] + sum(info["skipped"].values())
    assert info["silver_labels"] is True
    assert [e.topic for e in evs] == ["地铁停运", "暴雨预警", "某地发生地震", "高考", "明天起油价上调", "某明星宣布退出娱乐圈",
                                      "动物园新来了熊猫"]
    for e, ev in enumerate(evs):
        (c,) = ev.cases
        assert c.weibo == f"alice说这事好{e}"  # own words: the //@ chain is cut, earliest reply kept
        assert c.sentiment == "positive"
        assert c.user_name == pseudonym("ced\x00alice") and "alice" not in c.user_name
        hist = {h.text for h in c.history}
        assert len(c.history) == 12 and not any(str(e) == t[-1] for t in hist)  # no post of its own event
    assert ced.read_ced(str(tmp_path / "CED_Dataset"), max_events=6, labeller=FixedLabeller(),
                        crowd_cap=0).source_info["events_read"] == 6
    assert all(ev.crowd is None for ev in evs) and info["events_with_crowd"] == 0


def test_ced_crowds_are_every_responders_first_usable_reply(tmp_path):
    """Crowd = each author's first usable response (not only authors with a history), capped, labelled;
    events under min_crowd are left out and counted."""
    write_ced(tmp_path)
    evs = ced.read_ced(str(tmp_path), labeller=FixedLabeller(), crowd_cap=3, min_crowd=2)
    # events 0-4: alice's first reply ('好': positive) and bob's ('坏': negative); carol and dave never say
    # anything of their own; event 5: bob's reply is emoji only, event 6: bob is absent -> crowd of 1 < 2.
    assert [e.event_id for e in evs] == [f"{e}_mid{e}_{1000 + e}" for e in range(5)]
    assert all(ev.crowd == {"negative": 1, "neutral": 0, "positive": 1} for ev in evs)
    info = evs.source_info
    assert info["skipped"]["event_crowd_under_min"] == 2
    assert info["events_with_crowd"] == 5 and info["crowd_responses"] == 10 and info["crowd_size_median"] == 2
    assert info["crowd_cap"] == 3 and info["min_crowd"] == 2
    # the cap samples, seeded by the event alone: the same crowd on every read and with fewer events read
    one = ced.read_ced(str(tmp_path), labeller=FixedLabeller(), crowd_cap=1, min_crowd=1)
    again = ced.read_ced(str(tmp_path), labeller=FixedLabeller(), crowd_cap=1, min_crowd=1, max_events=6)
    assert all(sum(ev.crowd.values()) == 1 for ev in one)
    assert len(one) == 7 and [ev.crowd for ev in again] == [ev.crowd for ev in one[:6]]
    with pytest.raises(ValueError, match="min_crowd"):
        ced.read_ced(str(tmp_path), labeller=FixedLabeller(), crowd_cap=3, min_crowd=4)


def test_ced_crowd_sample_is_seeded_and_capped():
    rows = [(i, f"u{i % 40}", f"text{i}", f"2012-01-01 00:00:{i % 60:02d}") for i in range(100)]
    a = ced.crowd_sample("ev1", rows, 25)
    assert len(a) == 25 and len({r[1] for r in a}) == 25  # one response per author
    assert a == ced.crowd_sample("ev1", list(reversed(rows)), 25)  # input order does not matter
    assert a != ced.crowd_sample("ev2", rows, 25)
    full = ced.crowd_sample("ev1", rows, 1000)
    assert len(full) == 40
    for r in full:  # each author's earliest reply (date, then record)
        assert r == min((x for x in rows if x[1] == r[1]), key=lambda x: (x[3], x[0]))


def test_ced_bad_input_is_one_line(tmp_path):
    write_ced(tmp_path)
    f = tmp_path / "CED_Dataset" / "rumor-repost" / "1_mid1_1001.json"
    rows = json.loads(f.read_text("utf-8"))
    rows[2]["text"] = 5
    f.write_text(json.dumps(rows), "utf-8")
    with pytest.raises(DataError, match=r"1_mid1_1001.json: record 2: field 'text': expected a string"):
        ced.read_ced(str(tmp_path), labeller=FixedLabeller(), crowd_cap=0)
    # a response that could only ever be in a crowd (no case) is validated all the same
    rows[2]["text"] = "fine"
    rows.append({"uid": None, "text": "路人甲的评论", "date": ""})
    f.write_text(json.dumps(rows), "utf-8")
    with pytest.raises(DataError, match=r"1_mid1_1001.json: record 6: field 'uid': expected a non-empty user id"):
        ced.read_ced(str(tmp_path), labeller=FixedLabeller(), crowd_cap=3, min_crowd=2)
    with pytest.raises(DataError, match="no original-microblog"):
        ced.read_ced(str(tmp_path / "nowhere"))


def test_ced_helpers():
    assert ced.own_words("  ") == (None, "empty")
    assert ced.own_words("[泪][蜡烛]") == (None, "emoji_or_punctuation_only")
    assert ced.own_words("Repost") == (None, "repost_marker_only")
    assert ced.own_words("转发微博。//@a: 原文") == (None, "repost_marker_only")  # 5.8% of CED's replies look like this
    assert ced.own_words("转发微博！！") == (None, "repost_marker_only")
    assert ced.own_words("转发微博，太可怕了") == ("转发微博，太可怕了", "")  # words of its own follow
    assert ced.own_words("真的吗//@a: b//@c: d") == ("真的吗", "")
    assert ced.derive_topic("今天#天气#不错") == "天气"
    assert ced.derive_topic("# #【标题】正文") == "标题"  # a blank tag is no topic
    assert ced.derive_topic("一二三四五六七八九十一二三四五六七八九十一二三") == "一二三四五六七八九十一二三四五六七八九十"


# ----------------------------------------------------------------------------- builder + CLI

def test_build_zs_csd_records_classes(tmp_path):
    d = write_zs(tmp_path / "zs")
    r = cli("--source", "zs_csd", "--input", d, "--out", tmp_path / "out", "--max_length", "256",
            "--test_fraction", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    ds = B.open_dataset(tmp_path / "out")
    m = ds.metadata
    assert m["classes"] == ["favor", "against", "neutral"] and m["silver_labels"] is False
    assert m["source_info"]["source"] == "zs_csd"
    got = Counter()
    for split in ds.sources:
        src = ds.source(split)
        for i in range(len(src)):
            ex = src[i]
            got[(ex["response"].decode() if isinstance(ex["response"], bytes) else ex["response"])] = int(ex["label"])
            assert ex["target_dist"].shape == (3,)
    # the label ids follow the configured class order favor=0, against=1, neutral=2
    assert got == {"开始也不能理解 后来发现园区里真的超干净": 0, "干不干净和带吃的有什么关系？": 1, "说的好!支持你": 1,
                   "各地风俗不同吧": 2}


def test_build_ced_silver_and_wrong_label_set_is_one_line(tmp_path):
    write_ced(tmp_path / "raw")
    cfg = B.SocialConfig(name="t", source="ced", input=str(tmp_path / "raw"), max_length=400, test_fraction=0.3,
                         labels=("negative", "neutral", "positive", "mixed"), crowd_cap=0)
    path = B.build(tmp_path / "out", cfg)
    m = B.open_dataset(path).metadata
    assert m["silver_labels"] is True and m["classes"] == ["negative", "neutral", "positive", "mixed"]
    assert m["source_info"]["skipped"]["duplicate_author_in_event"] == 7
    assert sum(len(v) for v in m["labels"].values()) == 7
    # stance labels against the default sentiment classes: one line naming the flag, before reading
    r = cli("--source", "zs_csd", "--input", write_zs(tmp_path / "zs"), "--out", tmp_path / "o2",
            "--labels", "negative,neutral,positive")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("error: --labels 'negative,neutral,positive': ") and "favor,against,neutral" in r.stderr
    with pytest.raises(DataError, match="does not support max_events"):
        B.read_source(B.SocialConfig(name="t", source="socialweibo", input=str(tmp_path), max_events=2))


def _hand_jsd(p, q):
    """JSD in nats from its definition, written out with math.log (independent of core.divergence)."""
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda x: sum(a * math.log(a / c) for a, c in zip(x, m) if a > 0)  # noqa: E731
    return kl(p) / 2 + kl(q) / 2


def test_build_ced_crowd_targets_noise_floor_and_summary(tmp_path, monkeypatch):
    from socialalign_jax.data import labellers, summary

    monkeypatch.setitem(labellers.LABELLERS, "fixed", FixedLabeller)
    write_ced(tmp_path / "raw")
    cfg = B.SocialConfig(name="t", source="ced", input=str(tmp_path / "raw"), max_length=400, test_fraction=0.4,
                         labeller="fixed", crowd_cap=3, min_crowd=2)
    m = B.open_dataset(B.build(tmp_path / "out", cfg)).metadata
    assert m["config"]["labeller"] == "fixed" and m["config"]["crowd_cap"] == 3
    # Each kept event's crowd: one positive (alice), one negative (bob) -> target [1/2, 0, 1/2] in every
    # split, although each event's only case (alice) is positive.
    # Noise floor by hand: n = 2 draws from [1/2, 0, 1/2]; both draws alike (prob 1/2) is JSD([1/2,0,1/2], [1,0,0]).
    floor = 0.5 * _hand_jsd([0.5, 0, 0.5], [1, 0, 0])
    for split in ("train", "test"):
        for t in m["targets"][split].values():
            assert t["source"] == "crowd" and t["count"] == 2 and t["dist"] == [0.5, 0.0, 0.5]
            assert t["noise_floor"] == pytest.approx(floor, rel=1e-12)
    s = summary.summarize(m)
    assert s["splits"]["train"]["targets"]["sources"] == {"crowd": s["splits"]["train"]["events"]}
    table = summary.format_table(s)
    assert f"noise floor (mean JSD of a perfect forecast to its target) {floor:.4f}" in table
    assert "silver labels: FixedLabeller" in table


def test_build_dataset_cli_refuses_an_unknown_labeller_in_one_line(tmp_path):
    write_ced(tmp_path / "raw")
    r = cli("--source", "ced", "--input", tmp_path / "raw", "--out", tmp_path / "out", "--labeller", "magic")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "--labeller" in r.stderr and "snownlp" in r.stderr and "ngram" in r.stderr
    r = cli("--source", "zs_csd", "--input", write_zs(tmp_path / "zs"), "--out", tmp_path / "o2", "--crowd_cap", "10")
    assert r.returncode == 2 and "does not support crowd_cap" in r.stderr and r.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out").exists() and not (tmp_path / "o2").exists()
