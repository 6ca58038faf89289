"""Prompt builder: literal template, span boundaries from offsets, truncation rules."""

import numpy as np
import pytest

from socialalign_jax.data.prompt import (MODES, BuildStats, PromptConfig, PromptTooLong, build_example,
                                         build_examples, marker_offsets, parse_user_prompt, render_user_prompt)
from socialalign_jax.data.records import Case, DataError, Event, HistoryPost
from socialalign_jax.weights.tokenizer import load_tokenizer

from tests.authors_prompt import authors_chat, authors_instruction  # the independent reference


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


RAW_CASE = {  # the raw event format of SPEC section 4, with the authors' quirks exercised
    "user_name": "小红",
    "weibo": "太感人了！",
    "history": [{"text": " 今天好开心 ", "topics": []}, {"text": "说得对", "retweet": {"text": "原微博内容"}},
                {"text": "第三条\n两行"}, {"text": "第四条"}, {"text": "第五条"}],
    "user_persona": "喜欢猫的大学生\n\n\n每天撸猫",
}
TOPIC, NEWS = "猫咪", "猫咪救主的故事\\n后续报道"  # a literal backslash-n, as in the authors' scraped news


def _example(persona="喜欢猫的大学生", history=None, weibo="太感人了！"):
    history = history or [HistoryPost("今天好开心"), HistoryPost("说得对", retweet="原微博内容")]
    case = Case("小红", weibo, history, persona=persona, history_is_selected=True)
    return case, Event("e1", "猫咪", "猫咪救主的故事", [case], "e1.json")


def _raw_event_case():
    history = [HistoryPost(h["text"], retweet=(h.get("retweet") or {}).get("text")) for h in RAW_CASE["history"]]
    case = Case(RAW_CASE["user_name"], RAW_CASE["weibo"], history, persona=RAW_CASE["user_persona"],
                history_is_selected=True)
    return case, Event("e1", TOPIC, NEWS, [case], "e1.json")


@pytest.mark.parametrize("mode", MODES)
def test_prompt_is_the_authors_template(tok, mode):
    case, ev = _raw_event_case()
    ex = build_example(case, ev, tok, PromptConfig(mode=mode))
    ids, n = ex["input_ids"], ex["prompt_len"]
    want = authors_chat(authors_instruction(RAW_CASE, TOPIC, NEWS, mode), RAW_CASE["weibo"])
    assert tok.decode(ids) == want  # the whole training text, closing <|im_end|>, no trailing newline
    assert ids.tolist() == tok(want, add_special_tokens=False)["input_ids"]  # one tokenisation of the whole
    assert ids.dtype == np.int32 and ex["loss_mask"].dtype == np.int32 and ids.shape == ex["loss_mask"].shape
    assert tok.decode(ids[n:]) == "太感人了！<|im_end|>" and ids[-1] == 151645
    assert ex["loss_mask"].tolist() == [0] * n + [1] * (len(ids) - n)
    # Spans from the markers' character offsets in the whole rendered text.
    u, v = ex["user_end"], ex["news_end"]
    assert tok.decode(ids[:u]) == want[: want.index("现在你看到了一则新闻")]
    assert tok.decode(ids[u:v]) == want[want.index("现在你看到了一则新闻"): want.index("，请发一条关于hashtag")]
    prompt_only = build_example(case, ev, tok, PromptConfig(mode=mode), include_response=False)
    assert tok.decode(prompt_only["input_ids"]) == authors_chat(authors_instruction(RAW_CASE, TOPIC, NEWS, mode))
    assert (prompt_only["user_end"], prompt_only["news_end"], prompt_only["prompt_len"]) == (u, v, n)
    assert prompt_only["loss_mask"].sum() == 0


def test_render_parse_round_trip_in_every_mode():
    case, ev = _raw_event_case()
    for mode in MODES:
        r = render_user_prompt(case.user_name, case.history, case.persona, ev.news, ev.topic, mode)
        assert r.text == authors_instruction(RAW_CASE, TOPIC, NEWS, mode)
        assert marker_offsets(r.text) == (r.user_char, r.news_char)
        p = parse_user_prompt(r.text)
        assert p is not None and p.mode == mode and p.topic == TOPIC and p.news == "猫咪救主的故事\n后续报道"
        assert render_user_prompt(p.user_name, p.history, p.persona, p.news, p.topic, mode).text == r.text
    assert parse_user_prompt(r.text.replace("请注意", "注意")) is None


def test_prompt_only_case_without_response(tok):
    # Generation / prediction: a Case needs no real response.
    case = Case("小红", history=[HistoryPost("今天好开心")], persona="大学生")
    ev = Event("e1", "猫咪", "猫咪救主的故事", [case], "e1.json")
    ex = build_example(case, ev, tok, PromptConfig(), include_response=False)
    text = tok.decode(ex["input_ids"])
    assert text.endswith("<|im_start|>assistant\n") and ex["prompt_len"] == len(ex["input_ids"])
    assert tok.decode(ex["input_ids"][ex["user_end"]: ex["user_end"] + 1]) == "现在"


def test_missing_persona_renders_the_authors_empty_line(tok):
    case, ev = _example(persona=None)
    text = tok.decode(build_example(case, ev, tok, PromptConfig())["input_ids"])
    assert "以下是你的用户画像：\n\n现在你看到了一则新闻: \n" in text  # the authors' .get('user_persona', '')


def test_bm25_selection_used_for_raw_history(tok):
    hist = [HistoryPost(f"日常{i}") for i in range(6)] + [HistoryPost("猫咪好可爱"), HistoryPost("太感人了！")]
    case = Case("小红", "太感人了！", hist, persona=None)
    ev = Event("e1", "猫咪", "猫咪救主的故事", [case], "e1.json")
    text = tok.decode(build_example(case, ev, tok, PromptConfig())["input_ids"])
    lines = text.split("以下是你的五条历史博文: \n")[1].split("\n以下是你的用户画像：")[0].split("\n")
    assert lines[0] == "1. 猫咪好可爱" and len(lines) == 5 and "1. 太感人了！" not in lines  # target excluded
    assert all(line.startswith(f"{i}. ") for i, line in enumerate(lines, 1))


def test_merged_marker_boundary(tok):
    # A space before 现在 makes BPE emit " 现" as one token: the boundary token starts one
    # character early but the span still covers the whole marker.
    raw = "你是微博用户小红。喜欢猫 现在你看到了一则新闻: 猫咪救主的故事\n现在，请发一条关于hashtag#猫咪#的微博。"
    case = Case("", "好", [], raw_prompt=raw, history_is_selected=True)
    ev = Event("e1", "猫咪", "猫咪救主的故事", [case], "a.json")
    ex = build_example(case, ev, tok, PromptConfig())
    ids, u, v = ex["input_ids"], ex["user_end"], ex["news_end"]
    assert tok.convert_ids_to_tokens(int(ids[u])) == tok.convert_ids_to_tokens(tok(" 现")["input_ids"][0])
    assert tok.decode(ids[:u]).endswith("喜欢猫")
    assert tok.decode(ids[u:v]) == " 现在你看到了一则新闻: 猫咪救主的故事\n现在"
    with pytest.raises(DataError, match=r"a\.json: record 0: field 'instruction': mode 'without_history'"):
        build_example(case, ev, tok, PromptConfig(mode="without_history"))
    case.raw_prompt = "没有标记的提示"
    with pytest.raises(DataError, match=r"a\.json: record 0: field 'instruction': prompt lacks the markers"):
        build_example(case, ev, tok, PromptConfig())


def test_truncation_longest_history_first(tok):
    long_post = "这是一条非常非常长的历史微博" * 4  # 56 chars
    case, ev = _example(history=[HistoryPost(long_post), HistoryPost("短帖子"), HistoryPost("中等长度的帖子内容")])
    full = build_example(case, ev, tok, PromptConfig())
    stats = BuildStats()
    ex = build_example(case, ev, tok, PromptConfig(max_length=len(full["input_ids"]) - 20), stats)
    assert len(ex["input_ids"]) <= len(full["input_ids"]) - 20
    text = tok.decode(ex["input_ids"])
    line1 = text.split("\n1. ")[1].split("\n")[0]
    assert line1.endswith("…") and long_post.startswith(line1[:-1]) and len(line1) - 1 >= 9
    assert "\n2. 短帖子\n" in text and "\n3. 中等长度的帖子内容\n" in text  # shorter posts untouched
    assert ex["n_truncated_history_chars"] == 56 - (len(line1) - 1)
    assert "以下是你的用户画像：\n喜欢猫的大学生\n" in text and "现在你看到了一则新闻: \n猫咪救主的故事\n" in text
    assert stats.built == 1 and stats.history_truncated == 1 and stats.history_chars_cut == ex["n_truncated_history_chars"]


def test_persona_cut_after_history_and_response_never(tok):
    weibo = "响应" * 30
    case, ev = _example(persona="一个非常喜欢猫咪而且每天都会在微博上分享猫咪照片的大学生", weibo=weibo)
    minimal = build_example(case, ev, tok, PromptConfig(max_length=10_000))
    resp = tok(weibo + "<|im_end|>")["input_ids"]
    # Room for the history reduced to "…" but not the whole persona.
    stats = BuildStats()
    ex = build_example(case, ev, tok, PromptConfig(max_length=len(minimal["input_ids"]) - 22), stats)
    text = tok.decode(ex["input_ids"][: ex["prompt_len"]])
    assert "1. …\n2. 你转发了微博: …, 并评论说: …\n" in text
    assert stats.persona_truncated == 1 and "以下是你的用户画像：\n一个" in text and "…\n现在你看到了" in text
    assert 0 < stats.persona_chars_cut < 28
    assert ex["input_ids"][ex["prompt_len"] :].tolist() == resp
    # Not even the news + response fit: raise, or skip and count.
    tight = PromptConfig(max_length=len(resp) + 40, on_overflow="raise")
    with pytest.raises(PromptTooLong, match=r"e1\.json: record 0: field 'weibo': .* exceed max_length"):
        build_example(case, ev, tok, tight)
    stats = BuildStats()
    assert build_example(case, ev, tok, PromptConfig(max_length=len(resp) + 40), stats) is None
    assert stats.skipped_too_long == 1 and stats.built == 0 and "e1.json: record 0" in stats.skipped[0]


def test_wordings_share_one_user_span_chosen_and_cut_once(tok):
    """Several wordings of one news (a framing comparison): one history for all (BM25 summed over
    the wordings) and one cut, the largest that lets every wording fit, so the prompts agree token
    for token up to the news marker. Reference: the authors' template over capped posts, the cap
    found by a linear search here."""
    from socialalign_jax.data.bm25 import select_history

    posts = [HistoryPost("周末去爬山看日出，山顶的风景真美" * 2), HistoryPost("地震预警系统又一次提前响了"),
             HistoryPost("今天的火锅特别好吃，推荐给大家" * 2), HistoryPost("暴雨导致地铁停运，上班迟到了"),
             HistoryPost("学校门口新开了一家书店"), HistoryPost("猫咪今天学会了开门")]
    short = Event("e", "地震", "某地发生地震", source="news")
    long = Event("e", "地震", "某地今晨发生5级地震，地铁暂时停运，预警系统提前响起，目前没有人员伤亡的报告" * 2,
                 source="variants[0]")
    case = Case("小红", "", posts, persona="喜欢旅行的上班族")
    chosen = select_history(posts, [short.news, long.news], k=5)
    assert chosen != select_history(posts, short.news, k=5)  # the long wording's words change the choice

    def reference(event, cap):  # the authors' prompt with every post capped at `cap` characters
        raw = {"user_name": "小红", "user_persona": "喜欢旅行的上班族",
               "history": [{"text": p.text if len(p.text) <= cap else p.text[:cap] + "…"} for p in chosen]}
        return tok(authors_chat(authors_instruction(raw, event.topic, event.news, "full")))["input_ids"]

    longest = max(len(p.text) for p in chosen)
    budget = len(reference(long, longest)) - 30  # the long wording needs a cut; the short one alone does not
    assert len(reference(short, longest)) <= budget
    cfg = PromptConfig(max_length=budget, on_overflow="raise")
    cap = next(c for c in range(longest, -1, -1) if len(reference(long, c)) <= budget)
    assert cap < longest
    stats = BuildStats()
    exs = build_examples(case, [short, long], tok, cfg, stats, include_response=False)
    for ex, event in zip(exs, (short, long)):
        assert ex["input_ids"].tolist() == reference(event, cap)
        assert ex["n_truncated_history_chars"] == sum(max(0, len(p.text) - cap) for p in chosen)
    assert exs[0]["user_end"] == exs[1]["user_end"]
    u = exs[0]["user_end"]
    assert exs[0]["input_ids"][:u].tolist() == exs[1]["input_ids"][:u].tolist()
    assert tok.decode(exs[0]["input_ids"][u:u + 1]).startswith("现")
    assert stats.built == 2 and stats.history_truncated == 2
    # Built alone, the short wording keeps every post whole (so a separate cut would differ), and
    # the order of the wordings changes nothing.
    alone = build_example(case, short, tok, cfg, include_response=False)
    assert alone["n_truncated_history_chars"] == 0 and alone["user_end"] > u
    swapped = build_examples(case, [long, short], tok, cfg, include_response=False)
    assert [e["input_ids"].tolist() for e in swapped] == [exs[1]["input_ids"].tolist(), exs[0]["input_ids"].tolist()]
    # One wording that cannot fit even fully cut: the user's prompts fit together or not at all.
    huge = Event("e", "地震", "新闻" * 400, source="variants[1]")
    with pytest.raises(PromptTooLong, match=r"^variants\[1\]: field 'news': the news alone has"):
        build_examples(case, [short, huge], tok, cfg, include_response=False)
    stats = BuildStats()
    skip = PromptConfig(max_length=budget, on_overflow="skip")
    assert build_examples(case, [short, huge], tok, skip, stats, include_response=False) is None
    assert stats.skipped_too_long == 2 and stats.built == 0
