"""Prompt builder: literal template, span boundaries from offsets, truncation rules."""

import numpy as np
import pytest

from socialalign_jax.data.prompt import BuildStats, PromptConfig, PromptTooLong, build_example
from socialalign_jax.data.records import Case, DataError, Event, HistoryPost
from socialalign_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _example(persona="喜欢猫的大学生", history=None, weibo="太感人了！"):
    history = history or [HistoryPost("今天好开心"), HistoryPost("说得对", retweet="原微博内容")]
    case = Case("小红", weibo, history, persona=persona, history_is_selected=True)
    return case, Event("e1", "猫咪", "猫咪救主的故事", [case], "e1.json")


EXPECTED_FULL = (
    "<|im_start|>system\n你是一个微博用户。<|im_end|>\n"
    "<|im_start|>user\n"
    "你是微博用户小红。以下是你最近发布的几条微博：\n"
    "1. 今天好开心\n"
    "2. 你转发了微博: 原微博内容, 并评论说: 说得对\n"
    "你的用户画像：喜欢猫的大学生\n"
    "现在你看到了一则新闻: 猫咪救主的故事\n"
    "新闻的话题标签是#猫咪#。\n"
    "现在，请发一条关于hashtag#猫咪#的微博，表达你对这则新闻的看法。<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_full_prompt_literal_and_spans(tok):
    case, ev = _example()
    ex = build_example(case, ev, tok, PromptConfig())
    ids, n = ex["input_ids"], ex["prompt_len"]
    assert ids.dtype == np.int32 and ex["loss_mask"].dtype == np.int32 and ids.shape == ex["loss_mask"].shape
    assert tok.decode(ids[:n]) == EXPECTED_FULL
    assert tok.decode(ids[n:]) == "太感人了！<|im_end|>"
    assert ids[-1] == 151645 and ex["loss_mask"].tolist() == [0] * n + [1] * (len(ids) - n)
    u, v = ex["user_end"], ex["news_end"]
    user_part = EXPECTED_FULL[: EXPECTED_FULL.index("现在你看到了一则新闻")]
    news_part = "现在你看到了一则新闻: 猫咪救主的故事\n新闻的话题标签是#猫咪#。\n现在"
    assert tok.decode(ids[:u]) == user_part
    assert tok.decode(ids[u:v]) == news_part
    assert ex["n_truncated_history_chars"] == 0


def test_ablation_modes(tok):
    case, ev = _example()
    no_p = build_example(case, ev, tok, PromptConfig(mode="without_persona"))
    assert tok.decode(no_p["input_ids"][: no_p["prompt_len"]]) == EXPECTED_FULL.replace("你的用户画像：喜欢猫的大学生\n", "")
    no_h = build_example(case, ev, tok, PromptConfig(mode="without_history"))
    expected = EXPECTED_FULL.replace("以下是你最近发布的几条微博：\n1. 今天好开心\n2. 你转发了微博: 原微博内容, 并评论说: 说得对\n", "")
    assert tok.decode(no_h["input_ids"][: no_h["prompt_len"]]) == expected
    for ex in (no_p, no_h):
        assert tok.decode(ex["input_ids"][ex["user_end"] : ex["user_end"] + 1]) == "现在"
        assert tok.decode(ex["input_ids"][ex["news_end"] : ex["news_end"] + 1]).startswith("，")
    with pytest.raises(ValueError, match="mode"):
        PromptConfig(mode="no_news")


def test_bm25_selection_used_for_raw_history(tok):
    hist = [HistoryPost(f"日常{i}") for i in range(6)] + [HistoryPost("猫咪好可爱"), HistoryPost("太感人了！")]
    case = Case("小红", "太感人了！", hist, persona=None)
    ev = Event("e1", "猫咪", "猫咪救主的故事", [case], "e1.json")
    text = tok.decode(build_example(case, ev, tok, PromptConfig())["input_ids"])
    lines = text.split("以下是你最近发布的几条微博：\n")[1].split("\n现在你看到了")[0].split("\n")
    assert lines[0] == "1. 猫咪好可爱" and len(lines) == 5 and "1. 太感人了！" not in lines  # target excluded
    assert "你的用户画像" not in text


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
    assert "你的用户画像：喜欢猫的大学生\n" in text and "现在你看到了一则新闻: 猫咪救主的故事\n" in text
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
    assert stats.persona_truncated == 1 and "你的用户画像：一个" in text and "…\n现在你看到了" in text
    assert 0 < stats.persona_chars_cut < 28
    assert ex["input_ids"][ex["prompt_len"] :].tolist() == resp
    # Not even the news + response fit: raise, or skip and count.
    tight = PromptConfig(max_length=len(resp) + 40, on_overflow="raise")
    with pytest.raises(PromptTooLong, match=r"e1\.json: record 0: field 'weibo': .* exceed max_length"):
        build_example(case, ev, tok, tight)
    stats = BuildStats()
    assert build_example(case, ev, tok, PromptConfig(max_length=len(resp) + 40), stats) is None
    assert stats.skipped_too_long == 1 and stats.built == 0 and "e1.json: record 0" in stats.skipped[0]
