"""Raw event / Alpaca readers: fields read back, and each kind of bad input named precisely."""

import json

import pytest

from socialalign_jax.data.records import DataError, HistoryPost, read_alpaca, read_event_dir, read_event_file


def _case(name="u1", n_hist=5, **kw):
    c = {"user_name": name, "weibo": f"{name}的微博", "history": [{"text": f"帖子{i}"} for i in range(n_hist)]}
    c.update(kw)
    return c


def _write(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def _event(*cases):
    return {"topic": "地震", "news": "某地发生地震", "cases": list(cases)}


def test_reads_all_fields(tmp_path):
    c = _case(user_persona="爱旅游", sentiment="negative", user_level=3, gender="f", ip="北京")
    c["history"][1] = {"text": "转发", "retweet": {"text": "原文"}, "topics": ["t1"]}
    ev = read_event_file(_write(tmp_path / "e7.json", _event(c, _case("u2"))))
    assert ev.event_id == "e7" and ev.topic == "地震" and ev.news == "某地发生地震" and len(ev.cases) == 2
    a = ev.cases[0]
    assert (a.user_name, a.weibo, a.persona, a.sentiment, a.user_level, a.gender, a.ip) == (
        "u1", "u1的微博", "爱旅游", "negative", "3", "f", "北京")
    assert a.history[1] == HistoryPost(text="转发", retweet="原文", topics=("t1",))
    assert a.history_is_selected is False and ev.cases[1].sentiment is None and ev.cases[1].persona is None


def test_malformed_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"topic": "x",', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON at line 1"):
        read_event_file(p)


def test_non_utf8(tmp_path):
    p = tmp_path / "gbk.json"
    p.write_bytes(json.dumps(_event(_case()), ensure_ascii=False).encode("gbk"))
    with pytest.raises(DataError, match=r"gbk\.json: not valid UTF-8"):
        read_event_file(p)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda e: e.pop("news"), r"e\.json: field 'news': missing$"),
        (lambda e: e["cases"][1].pop("weibo"), r"e\.json: record 1: field 'weibo': missing$"),
        (lambda e: e["cases"][1].update(weibo="  "), r"record 1: field 'weibo': empty response$"),
        (lambda e: e["cases"][0].update(sentiment="angry"), r"record 0: field 'sentiment': unknown label 'angry'"),
        (lambda e: e["cases"][1]["history"][2].pop("text"), r"record 1: field 'history\[2\]\.text': missing$"),
        (lambda e: e["cases"][0].update(history=[{"text": "a"}] * 4), r"record 0: field 'history': 4 history posts"),
        (lambda e: e["cases"][0].update(user_name=7), r"record 0: field 'user_name': expected a string, got int$"),
        (lambda e: e.update(cases=[]), r"field 'cases': empty list$"),
    ],
)
def test_bad_fields(tmp_path, mutate, pattern):
    e = _event(_case("u1"), _case("u2"))
    mutate(e)
    with pytest.raises(DataError, match=pattern) as info:
        read_event_file(_write(tmp_path / "e.json", e))
    assert "\n" not in str(info.value)


def test_short_history_allowed_and_custom_labels(tmp_path):
    p = _write(tmp_path / "e.json", _event(_case(n_hist=2, sentiment="favor")))
    with pytest.raises(DataError, match="unknown label 'favor'"):
        read_event_file(p, allow_short_history=True)
    ev = read_event_file(p, labels=("favor", "against", "neutral"), allow_short_history=True)
    assert len(ev.cases[0].history) == 2 and ev.cases[0].sentiment == "favor"
    assert len(read_event_file(p, labels=("favor",), min_history=2).cases) == 1


def test_event_dir_sorted_and_duplicates(tmp_path):
    for name in ["b", "a", "c"]:
        _write(tmp_path / f"{name}.json", _event(_case()))
    (tmp_path / "notes.txt").write_text("ignored", encoding="utf-8")
    assert [e.event_id for e in read_event_dir(tmp_path)] == ["a", "b", "c"]
    _write(tmp_path / "d.json", dict(_event(_case()), event_id="a"))
    with pytest.raises(DataError, match=r"d\.json: field 'event_id': duplicate event id 'a'"):
        read_event_dir(tmp_path)
    with pytest.raises(DataError, match="no \\*.json event files"):
        read_event_dir(_empty(tmp_path))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


# The authors' Alpaca prompt, written out literally.
ALPACA_PROMPT = (
    "你是微博用户小红。以下是你最近发布的几条微博：\n"
    "1. 今天好开心\n"
    "2. 你转发了微博: 原微博内容, 并评论说: 说得对\n"
    "你的用户画像：喜欢猫的大学生\n"
    "现在你看到了一则新闻: 猫咪救主的故事\n"
    "新闻的话题标签是#猫咪#。\n"
    "现在，请发一条关于hashtag#猫咪#的微博，表达你对这则新闻的看法。"
)


def test_alpaca_parses_fields(tmp_path):
    recs = [
        {"instruction": ALPACA_PROMPT, "input": "", "output": "太感人了", "sentiment": "positive"},
        {"instruction": ALPACA_PROMPT.replace("小红", "小蓝"), "input": "", "output": "真的假的"},
        {"instruction": ALPACA_PROMPT.replace("猫咪救主的故事", "别的新闻"), "input": "", "output": "嗯"},
    ]
    events = read_alpaca(_write(tmp_path / "train.json", recs), min_history=2)
    assert [e.event_id for e in events] == ["train-0000", "train-0001"]
    assert [len(e.cases) for e in events] == [2, 1]
    ev, c = events[0], events[0].cases[0]
    assert (ev.news, ev.topic) == ("猫咪救主的故事", "猫咪")
    assert (c.user_name, c.persona, c.weibo, c.sentiment) == ("小红", "喜欢猫的大学生", "太感人了", "positive")
    assert c.history == [HistoryPost("今天好开心"), HistoryPost("说得对", retweet="原微博内容")]
    assert c.history_is_selected and c.raw_prompt is None
    with pytest.raises(DataError, match="record 0: field 'history': 2 history posts, need at least 5"):
        read_alpaca(tmp_path / "train.json")


def test_alpaca_unparsed_prompt_kept_verbatim(tmp_path):
    text = "自由格式的前言。" + ALPACA_PROMPT[ALPACA_PROMPT.index("现在你看到了"):]
    ev = read_alpaca(_write(tmp_path / "a.json", [{"instruction": text, "input": "补充", "output": "好"}]))[0]
    assert ev.cases[0].raw_prompt == text + "\n补充"
    assert (ev.news, ev.topic) == ("猫咪救主的故事", "猫咪")


@pytest.mark.parametrize(
    "rec, pattern",
    [
        ({"instruction": ALPACA_PROMPT.replace("现在你看到了一则新闻", "新闻"), "output": "x"},
         r"record 0: field 'instruction': missing marker '现在你看到了一则新闻'"),
        ({"instruction": ALPACA_PROMPT.replace("，请发一条关于hashtag", "请发"), "output": "x"},
         r"record 0: field 'instruction': missing marker '，请发一条关于hashtag'"),
        ({"instruction": ALPACA_PROMPT, "output": ""}, r"record 0: field 'output': empty response"),
        ({"instruction": ALPACA_PROMPT}, r"record 0: field 'output': missing"),
        ({"instruction": ALPACA_PROMPT, "output": "x", "sentiment": "joy"}, r"field 'sentiment': unknown label"),
    ],
)
def test_alpaca_bad_records(tmp_path, rec, pattern):
    with pytest.raises(DataError, match=pattern):
        read_alpaca(_write(tmp_path / "a.json", [rec]), min_history=2)
