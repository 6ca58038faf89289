"""The authors' Chinese prompt, its span boundaries, and length-limited tokenisation.

The user turn (mode ``full``) is, character for character::

    你是微博用户{user_name}。以下是你最近发布的几条微博：
    1. {post}
    ...
    你的用户画像：{persona}
    现在你看到了一则新闻: {news}
    新闻的话题标签是#{topic}#。
    现在，请发一条关于hashtag#{topic}#的微博，表达你对这则新闻的看法。

wrapped in ChatML with the system turn ``你是一个微博用户。``. PAC-LoRA's routing needs two
token boundaries: ``user_end`` = the token holding the first character of
``USER_MARKER`` and ``news_end`` = the token holding the first character of
``NEWS_MARKER``. They are read off the tokenizer's character offsets of the *whole*
prompt, so they are exactly the tokens the model sees; re-tokenising prefixes would
disagree whenever BPE merges across the boundary. When BPE merges the marker's first
character with the character before it (e.g. a space before 现在), the boundary token is
that merged token: the span then starts one or two characters early but still covers
the whole marker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from socialalign_jax.data.bm25 import select_history
from socialalign_jax.data.records import Case, DataError, Event, HistoryPost
from socialalign_jax.tokenizer import IM_END, chat_template

SYSTEM_PROMPT = "你是一个微博用户。"
USER_MARKER = "现在你看到了一则新闻"
NEWS_MARKER = "，请发一条关于hashtag"

HEADER = "你是微博用户{user_name}。"
HISTORY_BLOCK = "以下是你最近发布的几条微博：\n{history}\n"
HISTORY_LINE = "{n}. {post}"
RETWEET = "你转发了微博: {retweet}, 并评论说: {text}"
PERSONA_BLOCK = "你的用户画像：{persona}\n"
NEWS_BLOCK = USER_MARKER + ": {news}\n新闻的话题标签是#{topic}#。\n"
INSTRUCTION = "现在" + NEWS_MARKER + "#{topic}#的微博，表达你对这则新闻的看法。"
FULL_TEMPLATE = HEADER + HISTORY_BLOCK + PERSONA_BLOCK + NEWS_BLOCK + INSTRUCTION

MODES = ("full", "without_persona", "without_history")
TRUNCATION_MARK = "…"


class PromptTooLong(DataError):
    """The prompt plus response exceeds max_length even with history and persona cut."""


@dataclass(frozen=True)
class PromptConfig:
    mode: Literal["full", "without_persona", "without_history"] = "full"
    max_length: int = 1024
    on_overflow: Literal["skip", "raise"] = "skip"
    num_history: int = 5

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"PromptConfig.mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.on_overflow not in ("skip", "raise"):
            raise ValueError(f"PromptConfig.on_overflow: {self.on_overflow!r} is not 'skip' or 'raise'")
        if self.max_length < 1 or self.num_history < 0:
            raise ValueError("PromptConfig: max_length must be >= 1 and num_history >= 0")


@dataclass
class BuildStats:
    """What build_example did to a dataset: every skip and cut is counted here."""

    built: int = 0
    skipped_too_long: int = 0
    history_truncated: int = 0  # examples whose history was shortened
    history_chars_cut: int = 0
    persona_truncated: int = 0
    persona_chars_cut: int = 0
    skipped: list[str] = field(default_factory=list)  # one DataError line per skip

    def summary(self) -> str:
        return (
            f"built {self.built}, skipped (too long) {self.skipped_too_long}, history truncated in "
            f"{self.history_truncated} ({self.history_chars_cut} chars), persona truncated in "
            f"{self.persona_truncated} ({self.persona_chars_cut} chars)"
        )


# --------------------------------------------------------------------------- rendering


def _one_line(s: str) -> str:
    """History posts and the persona are one line each in the template."""
    return " ".join(s.splitlines()) if ("\n" in s or "\r" in s) else s


def _cap(s: str, cap: int | None) -> str:
    return s if cap is None or len(s) <= cap else s[:cap] + TRUNCATION_MARK


def format_post(post: HistoryPost, cap: int | None = None) -> str:
    text = _cap(_one_line(post.text), cap)
    if post.retweet:
        return RETWEET.format(retweet=_cap(_one_line(post.retweet), cap), text=text)
    return text


@dataclass(frozen=True)
class RenderedPrompt:
    text: str  # the user turn content
    user_char: int  # offset of USER_MARKER in text
    news_char: int  # offset of NEWS_MARKER in text


def render_user_prompt(
    user_name: str,
    history: Sequence[HistoryPost],
    persona: str | None,
    news: str,
    topic: str,
    mode: str = "full",
    history_cap: int | None = None,
    persona_cap: int | None = None,
) -> RenderedPrompt:
    """The user turn. Empty history or a missing persona drop their block, as in ablations.

    Marker offsets are computed structurally, so a news text or post that happens to
    contain a marker string cannot move the span boundaries.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    out = HEADER.format(user_name=user_name)
    if mode != "without_history" and history:
        lines = "\n".join(HISTORY_LINE.format(n=i + 1, post=format_post(p, history_cap)) for i, p in enumerate(history))
        out += HISTORY_BLOCK.format(history=lines)
    if mode != "without_persona" and persona:
        out += PERSONA_BLOCK.format(persona=_cap(_one_line(persona), persona_cap))
    user_char = len(out)
    out += NEWS_BLOCK.format(news=news, topic=topic)
    news_char = len(out) + len("现在")
    out += INSTRUCTION.format(topic=topic)
    return RenderedPrompt(out, user_char, news_char)


@dataclass(frozen=True)
class ParsedPrompt:
    user_name: str
    history: tuple[HistoryPost, ...]
    persona: str | None
    news: str
    topic: str


_PARSE = re.compile(
    r"^你是微博用户(?P<user_name>.*?)。"
    r"(?:以下是你最近发布的几条微博：\n(?P<history>.*?)\n)?"
    r"(?:你的用户画像：(?P<persona>[^\n]*)\n)?"
    + re.escape(USER_MARKER)
    + r": (?P<news>.*)\n新闻的话题标签是#(?P<topic>[^\n]*)#。\n现在"
    + re.escape(NEWS_MARKER)
    + r"#(?P=topic)#的微博，表达你对这则新闻的看法。$",
    re.DOTALL,
)
_LINE = re.compile(r"^(\d+)\. (.*)$")
_RT = re.compile(r"^你转发了微博: (.*), 并评论说: (.*)$", re.DOTALL)


def parse_user_prompt(text: str) -> ParsedPrompt | None:
    """Invert render_user_prompt; None unless re-rendering gives back ``text`` exactly."""
    m = _PARSE.match(text)
    if m is None:
        return None
    posts = []
    if m["history"] is not None:
        for n, line in enumerate(m["history"].split("\n"), 1):
            lm = _LINE.match(line)
            if lm is None or int(lm[1]) != n:
                return None
            rt = _RT.match(lm[2])
            posts.append(HistoryPost(text=rt[2], retweet=rt[1]) if rt else HistoryPost(text=lm[2]))
    parsed = ParsedPrompt(m["user_name"], tuple(posts), m["persona"], m["news"], m["topic"])
    again = render_user_prompt(parsed.user_name, parsed.history, parsed.persona, parsed.news, parsed.topic)
    return parsed if again.text == text else None


def news_and_topic_from_markers(text: str) -> tuple[str, str]:
    """Best-effort (news, topic) of a prompt that does not parse (groups Alpaca records)."""
    end = text.rfind(NEWS_MARKER)
    seg = text[text.rfind(USER_MARKER, 0, end) + len(USER_MARKER) : end]
    seg = seg[2:] if seg.startswith(": ") else seg
    m = re.search(r"\n新闻的话题标签是#([^\n]*)#。", seg)
    return (seg[: m.start()], m[1]) if m else (seg, "")


def chat_prompt(user_content: str) -> str:
    """System + user turns and the assistant generation prompt, in ChatML."""
    return chat_template(
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_content}],
        add_generation_prompt=True,
    )


# --------------------------------------------------------------------------- tokenising


def _token_at(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the first token whose character span contains ``char``."""
    for i, (a, b) in enumerate(offsets):
        if a <= char < b:
            return i
    raise ValueError(f"no token covers character {char}")


def _case_index(case: Case, event: Event) -> int | None:
    return next((i for i, c in enumerate(event.cases) if c is case), None)


def select_case_history(case: Case, event: Event, num_history: int) -> list[HistoryPost]:
    """The posts the prompt shows: as given when pre-selected, else BM25 against the news."""
    if case.history_is_selected:
        return list(case.history[:num_history])
    return select_history(case.history, event.news, k=num_history, exclude_text=case.weibo)


def build_example(
    case: Case,
    event: Event,
    tokenizer,
    cfg: PromptConfig = PromptConfig(),
    stats: BuildStats | None = None,
    include_response: bool = True,
) -> dict | None:
    """Token ids, loss mask and span boundaries for one case (DESIGN.md batch fields).

    Over-long examples lose history characters first (every post capped at the same
    length, so the longest posts shrink first, each cut marked with ``…``), then persona
    characters; news, markers and response are never cut. If that is not enough the
    example raises ``PromptTooLong`` or, with ``on_overflow="skip"``, returns None and is
    counted in ``stats``. ``include_response=False`` gives the prompt alone (generation).
    """
    record = _case_index(case, event)
    if case.raw_prompt is not None:
        if cfg.mode != "full":
            raise DataError(event.source, f"mode {cfg.mode!r} needs a prompt that parses into fields", record, "instruction")
        posts, persona = [], None
    else:
        posts = [] if cfg.mode == "without_history" else select_case_history(case, event, cfg.num_history)
        persona = None if cfg.mode == "without_persona" else case.persona

    resp_ids: list[int] = []
    if include_response:
        resp_ids = tokenizer(case.weibo + IM_END, add_special_tokens=False)["input_ids"]
    budget = cfg.max_length - len(resp_ids)

    def encode(h_cap: int | None, p_cap: int | None):
        if case.raw_prompt is not None:
            content = case.raw_prompt
            nc = content.rfind(NEWS_MARKER)
            r = RenderedPrompt(content, content.rfind(USER_MARKER, 0, nc), nc)
        else:
            r = render_user_prompt(case.user_name, posts, persona, event.news, event.topic, cfg.mode, h_cap, p_cap)
        full = chat_prompt(r.text)
        base = full.index(r.text)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"], base + r.user_char, base + r.news_char

    ids, offsets, uc, nc = encode(None, None)
    pieces = [len(_one_line(s)) for p in posts for s in (p.text, p.retweet) if s]
    p_len = len(_one_line(persona)) if persona else 0
    h_cap = p_cap = None

    def fits(h, p) -> bool:
        return len(encode(h, p)[0]) <= budget

    def largest_fitting(hi: int, probe) -> int | None:
        """Largest cap in [0, hi) that fits (binary search); None if even 0 does not."""
        if not probe(0):
            return None
        lo, hi = 0, hi - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if probe(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    need_persona_cut = len(ids) > budget
    if need_persona_cut and pieces:
        h_cap = largest_fitting(max(pieces), lambda c: fits(c, None))
        need_persona_cut = h_cap is None
        h_cap = 0 if h_cap is None else h_cap
    if need_persona_cut and p_len:
        p_cap = largest_fitting(p_len, lambda c: fits(h_cap, c))
        p_cap = 0 if p_cap is None else p_cap
    if h_cap is not None or p_cap is not None:
        ids, offsets, uc, nc = encode(h_cap, p_cap)

    if len(ids) > budget:
        err = PromptTooLong(
            event.source,
            f"{len(ids)} prompt + {len(resp_ids)} response tokens exceed max_length {cfg.max_length} "
            f"even with history and persona cut",
            record,
            "weibo" if include_response else "news",
        )
        return overflow(err, cfg, stats)

    h_cut = sum(max(0, n - h_cap) for n in pieces) if h_cap is not None else 0
    p_cut = max(0, p_len - p_cap) if p_cap is not None else 0
    if stats is not None:
        stats.built += 1
        stats.history_truncated += int(h_cut > 0)
        stats.history_chars_cut += h_cut
        stats.persona_truncated += int(p_cut > 0)
        stats.persona_chars_cut += p_cut

    n_prompt = len(ids)
    return dict(
        input_ids=np.asarray(list(ids) + list(resp_ids), dtype=np.int32),  # [n]
        loss_mask=np.asarray([0] * n_prompt + [1] * len(resp_ids), dtype=np.int32),  # [n]
        user_end=_token_at(offsets, uc),
        news_end=_token_at(offsets, nc),
        prompt_len=n_prompt,
        n_truncated_history_chars=h_cut,
    )


def overflow(err: "PromptTooLong", cfg: PromptConfig, stats: "BuildStats | None"):
    """An example that cannot fit even after cutting what may be cut: raise it, or count the skip
    (on_overflow='skip') so the build summary reports it; returns None for the caller to return."""
    if cfg.on_overflow == "raise":
        raise err
    if stats is not None:
        stats.skipped_too_long += 1
        stats.skipped.append(str(err))
    return None
