"""Raw event / Alpaca readers: fields read back, and each kind of bad input named precisely."""

import json

import pytest

from socialalign_jax.data.alpaca import read_alpaca
from socialalign_jax.data.records import DataError, HistoryPost, read_event_dir, read_event_file

from tests.authors_prompt import authors_instruction  # the independent reference


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


def test_an_events_crowd_is_read_and_becomes_its_target(tmp_path):
    """'crowd' {label: count} (optional) is the event's macro target in every split."""
    from socialalign_jax.data import targets as T
    from socialalign_jax.data.tfds_builders import SocialConfig, event_crowds

    ev = read_event_file(_write(tmp_path / "e.json", dict(_event(_case(sentiment="negative")),
                                                           crowd={"positive": 6, "negative": 2})))
    assert ev.crowd == {"positive": 6, "negative": 2}
    assert read_event_file(_write(tmp_path / "f.json", _event(_case()))).crowd is None
    crowds = event_crowds([ev], SocialConfig(name="t"))
    assert crowds[0].tolist() == [2, 0, 6]
    t = T.macro_targets({"train": ([0], [0])}, 3, crowds=crowds)["train"][0]
    assert t["dist"] == [0.25, 0.0, 0.75] and t["count"] == 8 and t["source"] == "crowd"
    t = T.macro_targets({"train": ([0], [0])}, 3)["train"][0]  # without it: the case's own label
    assert t["dist"] == [1.0, 0.0, 0.0] and t["source"] == "train" and t["noise_floor"] == 0.0


def test_malformed_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"topic": "x",, "news": "y"}', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON at line 1 column 15"):
        read_event_file(p)


@pytest.mark.parametrize("cut", ["mid_character", "mid_value"])
def test_a_file_cut_short_says_so(tmp_path, cut):
    """An interrupted copy ends inside a character or inside the JSON: that is a truncated file, not an
    encoding or syntax problem to hunt for."""
    raw = json.dumps(_event(_case()), ensure_ascii=False).encode("utf-8")
    end = raw.index("微".encode()) + 1 if cut == "mid_character" else raw.index("微".encode()) + 3
    p = tmp_path / "cut.json"
    p.write_bytes(raw[:end])
    with pytest.raises(DataError) as e:
        read_event_file(p)
    where = f"(byte {end - 1} of {end})" if cut == "mid_character" else "(line 1 column"
    assert str(e.value).startswith(f"{p}: the file ends in the middle of a "
                                   + ("character " if cut == "mid_character" else "JSON value ")), str(e.value)
    assert where in str(e.value) and str(e.value).endswith("it was cut short (an interrupted copy or download?): "
                                                           "copy it again")


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
        (lambda e: e.update(crowd=[3, 4]), r"e\.json: field 'crowd': expected an object \{label: count\}, got list$"),
        (lambda e: e.update(crowd={"angry": 3}), r"field 'crowd': unknown label 'angry'"),
        (lambda e: e.update(crowd={"negative": -1}), r"field 'crowd': count of 'negative' must be a non-negative"),
        (lambda e: e.update(crowd={"negative": 2.5}), r"field 'crowd': count of 'negative' must be a non-negative"),
        (lambda e: e.update(crowd={"negative": 0}), r"field 'crowd': no responses counted"),
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


# An Alpaca record as the authors' organize_alphca_dataset.py writes it (their format string,
# their .format().strip()), from tests/authors_prompt.py.
ALPACA_CASE = {"user_name": "小红", "user_persona": "喜欢猫的大学生",
               "history": [{"text": "今天好开心"}, {"text": "说得对", "retweet": {"text": "原微博内容"}},
                           {"text": "三"}, {"text": "四"}, {"text": "五"}]}
ALPACA_PROMPT = authors_instruction(ALPACA_CASE, "猫咪", "猫咪救主的故事", "full")


def test_alpaca_parses_fields(tmp_path):
    recs = [
        {"instruction": ALPACA_PROMPT, "input": "", "output": "太感人了", "sentiment": "positive"},
        {"instruction": ALPACA_PROMPT.replace("小红", "小蓝"), "input": "", "output": "真的假的"},
        {"instruction": ALPACA_PROMPT.replace("猫咪救主的故事", "别的新闻"), "input": "", "output": "嗯"},
    ]
    events = read_alpaca(_write(tmp_path / "train.json", recs))
    assert [e.event_id for e in events] == ["train-0000", "train-0001"]
    assert [len(e.cases) for e in events] == [2, 1]
    ev, c = events[0], events[0].cases[0]
    assert (ev.news, ev.topic) == ("猫咪救主的故事", "猫咪")
    assert (c.user_name, c.persona, c.weibo, c.sentiment) == ("小红", "喜欢猫的大学生", "太感人了", "positive")
    assert c.history == [HistoryPost("今天好开心"), HistoryPost("说得对", retweet="原微博内容"),
                         HistoryPost("三"), HistoryPost("四"), HistoryPost("五")]
    assert c.history_is_selected and c.raw_prompt is None and c.prompt_mode == "full"
    short = ALPACA_PROMPT.replace("3. 三\n4. 四\n5. 五\n", "")
    _write(tmp_path / "short.json", [{"instruction": short, "input": "", "output": "x"}])
    with pytest.raises(DataError, match="record 0: field 'history': 2 history posts, need at least 5"):
        read_alpaca(tmp_path / "short.json")
    assert len(read_alpaca(tmp_path / "short.json", min_history=2)[0].cases[0].history) == 2


def test_alpaca_unparsed_prompt_kept_verbatim(tmp_path):
    text = "自由格式的前言。" + ALPACA_PROMPT[ALPACA_PROMPT.index("现在你看到了"):]
    assert read_alpaca(_write(tmp_path / "b.json", [{"instruction": text, "input": "", "output": "好"}]))[0].news \
        == "猫咪救主的故事"
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
        ({"instruction": ALPACA_PROMPT, "output": "\u200b \ufeff\n"}, r"record 0: field 'output': empty response"),
        ({"instruction": ALPACA_PROMPT}, r"record 0: field 'output': missing"),
        ({"instruction": ALPACA_PROMPT, "output": "x", "sentiment": "joy"}, r"field 'sentiment': unknown label"),
    ],
)
def test_alpaca_bad_records(tmp_path, rec, pattern):
    with pytest.raises(DataError, match=pattern):
        read_alpaca(_write(tmp_path / "a.json", [rec]), min_history=2)


@pytest.mark.parametrize("mode", ["full", "without_persona", "without_history"])
def test_alpaca_builds_exactly_as_the_raw_event(tmp_path, mode):
    """The authors' released record (their template, applied by the test's own copy) read with
    --source alpaca gives the same token ids, spans and loss mask as the raw event it came from."""
    from socialalign_jax.data.prompt import PromptConfig, build_example
    from socialalign_jax.weights.tokenizer import load_tokenizer

    tok = load_tokenizer()
    raw_case = dict(ALPACA_CASE, weibo="太感人了！", user_persona="喜欢猫\n\n的大学生",
                    history=[{"text": " 今天好开心"}, {"text": "说得对", "retweet": {"text": "原微博内容"}},
                             {"text": "三\n行"}, {"text": "四"}, {"text": "五"}, {"text": "第六条不会显示"}])
    news = "猫咪救主的故事\\n后续"  # a literal backslash-n, as in the authors' scraped news
    # history_is_selected: the authors' intermediate format already holds the five posts to show.
    event = {"topic": "猫咪", "news": news, "cases": [dict(raw_case, history_is_selected=True)]}
    raw = read_event_file(_write(tmp_path / "e.json", event))
    record = {"instruction": authors_instruction(raw_case, "猫咪", news, mode), "input": "", "output": "太感人了！"}
    ev = read_alpaca(_write(tmp_path / "alpaca.json", [record]), allow_short_history=True)[0]
    cfg = PromptConfig(mode=mode)
    want = build_example(raw.cases[0], raw, tok, cfg)
    got = build_example(ev.cases[0], ev, tok, cfg)
    assert ev.cases[0].raw_prompt is None and ev.cases[0].prompt_mode == mode
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert got["loss_mask"].tolist() == want["loss_mask"].tolist()
    for k in ("user_end", "news_end", "prompt_len"):
        assert got[k] == want[k], k
    # A record in an ablation mode cannot be rendered with the block it lacks.
    if mode != "full":
        with pytest.raises(DataError, match=r"alpaca\.json: record 0: field 'instruction': .*mode 'full'"):
            build_example(ev.cases[0], ev, tok, PromptConfig(mode="full"))
