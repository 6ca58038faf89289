"""The authors' prompt, its span boundaries, and length-limited tokenisation.

The user turn is the authors' template (``dataset_construction/organize_alphca_dataset.py``
in Znull-1220/SocialAlign, the format of every released Alpaca record and of every adapter
they trained), character for character, after their ``.format(...).strip()``. Mode
``full``::

    你的用户名为{user_name}, 以下是你的五条历史博文: ⏎1. {h1}⏎2. {h2}⏎...5. {h5}⏎
    以下是你的用户画像：⏎{user_persona}⏎
    现在你看到了一则新闻: ⏎{news}⏎
    关于这个新闻的hashtag #{topic}# 登上了微博热搜，请发一条关于hashtag #{topic}# 的微博，请注意：⏎
        - 可以参考你的个人信息、历史博文、用户画像和这则新闻，用自己的风格和立场发表观点⏎
        - 这条微博的长度应与你的历史博文相似⏎
        - 不要强行参考历史信息⏎
        - 仅输出你发表的微博内容

(⏎ = newline; the pieces join with nothing between them; note the space after the colons
before a newline and the four leading spaces of the rule lines). ``without_persona`` drops
the persona line and reads 历史博文和这则新闻 in the first rule; ``without_history`` drops
the history lines and reads 用户画像和这则新闻. As in the authors' code, a history item is
its text stripped, a retweet ``你转发了微博: {retweet}, 并评论说: {text}`` stripped, runs of
newlines in the persona collapse to one, a literal backslash-n in the news becomes a
newline, and the mode (not the data) decides which blocks appear: a case without a persona
renders an empty persona line in ``full``. Where the authors' code needs exactly five
history posts, fewer are rendered as fewer numbered lines.

The turn is wrapped in ChatML with the system turn ``你是一个微博用户。``; the training text
ends with the post's closing ``<|im_end|>``. PAC-LoRA's routing needs two token
boundaries: ``user_end`` = the token holding the first character of ``USER_MARKER`` and
``news_end`` = the token holding the first character of ``NEWS_MARKER``. They are read off
the tokenizer's character offsets of the *whole* rendered text, so they are exactly the
tokens the model sees; re-tokenising prefixes would disagree whenever BPE merges across the
boundary. When BPE merges the marker's first character with the character before it, the
boundary token is that merged token: the span then starts a character early but still
covers the whole marker.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from socialalign_jax.data.bm25 import select_history
from socialalign_jax.data.records import Case, DataError, Event, HistoryPost
from socialalign_jax.runs.run_config import DataSection, PAPER_MAX_LENGTH
from socialalign_jax.weights.tokenizer import IM_END, chat_template

SYSTEM_PROMPT = "你是一个微博用户。"
USER_MARKER = "现在你看到了一则新闻"
NEWS_MARKER = "，请发一条关于hashtag"

# The authors' template, cut at its optional blocks (joined with nothing between them).
HEADER = "你的用户名为{user_name}, "
HISTORY_HEADER = "以下是你的五条历史博文: \n"
HISTORY_LINE = "{n}. {post}\n"
PERSONA_BLOCK = "以下是你的用户画像：\n{user_persona}\n"
NEWS_BLOCK = USER_MARKER + ": \n{news}\n"
HASHTAG_HEAD = "关于这个新闻的hashtag #{topic}# 登上了微博热搜"  # NEWS_MARKER starts right after it
HASHTAG_TAIL = NEWS_MARKER + " #{topic}# 的微博，请注意：\n"
RULES = (
    "    - 可以参考{sources}，用自己的风格和立场发表观点\n"
    "    - 这条微博的长度应与你的历史博文相似\n"
    "    - 不要强行参考历史信息\n"
    "    - 仅输出你发表的微博内容"
)
RULE_SOURCES = {
    "full": "你的个人信息、历史博文、用户画像和这则新闻",
    "without_persona": "你的个人信息、历史博文和这则新闻",
    "without_history": "你的个人信息、用户画像和这则新闻",
}
RETWEET = "你转发了微博: {retweet}, 并评论说: {text}"

MODES = ("full", "without_persona", "without_history")
TRUNCATION_MARK = "…"


class PromptTooLong(DataError):
    """The prompt plus response exceeds max_length even with history and persona cut."""


_RUN_DATA = DataSection()


@dataclass(frozen=True)
class PromptConfig:
    """How one example is built: the run config's `data` settings of the same names (their
    defaults are the run's, declared once in runs/run_config.DataSection), except max_length: a
    prompt built without a run config (a Predictor on exported adapters, the prompt's own tests)
    gets the paper's length; a run passes its data.max_length."""
    mode: Literal["full", "without_persona", "without_history"] = _RUN_DATA.mode
    max_length: int = PAPER_MAX_LENGTH
    on_overflow: Literal["skip", "raise"] = _RUN_DATA.on_overflow
    num_history: int = _RUN_DATA.num_history

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


def clean_persona(persona: str | None) -> str:
    """The authors' persona cleaning: runs of newlines become one (a missing persona is '')."""
    return re.sub(r"\n{2,}", "\n", persona or "")


def clean_news(news: str) -> str:
    """The authors' news cleaning: a literal backslash-n (escaped in scraped text) is a newline."""
    return news.replace("\\n", "\n")


def _cap(s: str, cap: int | None) -> str:
    return s if cap is None or len(s) <= cap else s[:cap] + TRUNCATION_MARK


def format_post(post: HistoryPost, cap: int | None = None) -> str:
    """One history item as the authors render it (stripped), each piece capped at ``cap`` chars."""
    text = _cap(post.text, cap)
    if post.retweet:
        return RETWEET.format(retweet=_cap(post.retweet, cap), text=text).strip()
    return text.strip()


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
    """The user turn in ``mode``; the mode alone decides which blocks appear.

    Marker offsets are computed structurally, so a news text or post that happens to
    contain a marker string cannot move the span boundaries.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    out = HEADER.format(user_name=user_name)
    if mode != "without_history":
        out += HISTORY_HEADER + "".join(
            HISTORY_LINE.format(n=i + 1, post=format_post(p, history_cap)) for i, p in enumerate(history))
    if mode != "without_persona":
        out += PERSONA_BLOCK.format(user_persona=_cap(clean_persona(persona), persona_cap))
    user_char = len(out)
    out += NEWS_BLOCK.format(news=clean_news(news)) + HASHTAG_HEAD.format(topic=topic)
    news_char = len(out)
    out += HASHTAG_TAIL.format(topic=topic) + RULES.format(sources=RULE_SOURCES[mode])
    return RenderedPrompt(out, user_char, news_char)


@dataclass(frozen=True)
class ParsedPrompt:
    user_name: str
    history: tuple[HistoryPost, ...]
    persona: str | None  # None in mode without_persona
    news: str
    topic: str
    mode: str


_PARSE = re.compile(
    r"^你的用户名为(?P<user_name>.*?), "
    r"(?P<history_block>以下是你的五条历史博文: \n(?P<history>.*?))?"
    r"(?:以下是你的用户画像：\n(?P<persona>.*?)\n)?"
    + re.escape(USER_MARKER)
    + r": \n(?P<news>.*)\n关于这个新闻的hashtag #(?P<topic>.*)# 登上了微博热搜"
    + re.escape(NEWS_MARKER)
    + r" #(?P=topic)# 的微博，请注意：\n    - 可以参考(?P<sources>[^\n]*)，用自己的风格和立场发表观点\n"
    r"    - 这条微博的长度应与你的历史博文相似\n    - 不要强行参考历史信息\n    - 仅输出你发表的微博内容$",
    re.DOTALL,
)
_RT = re.compile(r"^你转发了微博: (.*), 并评论说:(?: (.*))?$", re.DOTALL)


def _parse_history(block: str) -> list[HistoryPost] | None:
    """Items of the numbered history lines (an item may hold newlines); None if the numbering breaks."""
    if not block:
        return []
    if not block.startswith("1. ") or not block.endswith("\n"):
        return None
    body, starts, n = block[:-1], [0], 2
    while (at := body.find(f"\n{n}. ", starts[-1])) >= 0:
        starts.append(at + 1)
        n += 1
    posts = []
    for k, (a, b) in enumerate(zip(starts, starts[1:] + [len(body) + 1])):
        item = body[a + len(f"{k + 1}. ") : b - 1]
        rt = _RT.match(item)
        posts.append(HistoryPost(text=rt[2] or "", retweet=rt[1]) if rt else HistoryPost(text=item))
    return posts


def _parse(text: str) -> tuple[ParsedPrompt, RenderedPrompt] | None:
    m = _PARSE.match(text)
    if m is None:
        return None
    mode = next((k for k, v in RULE_SOURCES.items() if v == m["sources"]), None)
    has_history, has_persona = m["history_block"] is not None, m["persona"] is not None
    if mode is None or (has_history, has_persona) != (mode != "without_history", mode != "without_persona"):
        return None
    posts = _parse_history(m["history"] or "")
    if posts is None:
        return None
    parsed = ParsedPrompt(m["user_name"], tuple(posts), m["persona"], m["news"], m["topic"], mode)
    again = render_user_prompt(parsed.user_name, parsed.history, parsed.persona, parsed.news, parsed.topic, mode)
    return (parsed, again) if again.text == text else None


def parse_user_prompt(text: str) -> ParsedPrompt | None:
    """Invert render_user_prompt (any mode); None unless re-rendering gives back ``text`` exactly."""
    got = _parse(text)
    return None if got is None else got[0]


def marker_offsets(text: str) -> tuple[int, int] | None:
    """(user_char, news_char): character offsets of the two markers in a user turn.

    The one rule every consumer of a rendered SocialAlign prompt uses (training on Alpaca
    records, scoring, generation, prediction). A user turn in the authors' template (any
    mode) gets the offsets of its structure, so a marker string quoted inside a post or the
    news cannot move them; any other text gets the news marker's last occurrence and the user
    marker's last occurrence before it (the template's own text follows the user-written
    fields). None if either marker is missing or they are out of order.
    """
    got = _parse(text)
    if got is not None:
        return got[1].user_char, got[1].news_char
    nc = text.rfind(NEWS_MARKER)
    if nc < 0:
        return None
    uc = text.rfind(USER_MARKER, 0, nc)
    return None if uc < 0 else (uc, nc)


def news_and_topic_from_markers(text: str) -> tuple[str, str]:
    """Best-effort (news, topic) of a prompt that does not parse (groups Alpaca records)."""
    offsets = marker_offsets(text)
    if offsets is None:
        return "", ""
    seg = text[offsets[0] + len(USER_MARKER) : offsets[1]]
    seg = seg[3:] if seg.startswith(": \n") else seg
    m = re.search(r"\n关于这个新闻的hashtag #(.*)# 登上了微博热搜$", seg, re.DOTALL)
    return (seg[: m.start()], m[1]) if m else (seg, "")


def chat_prompt(user_content: str, system: str | None = SYSTEM_PROMPT) -> str:
    """System (if any) + user turns and the assistant generation prompt, in ChatML."""
    turns = [] if system is None else [{"role": "system", "content": system}]
    return chat_template(turns + [{"role": "user", "content": user_content}], add_generation_prompt=True)


# --------------------------------------------------------------------------- tokenising


def token_at(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the first token whose character span contains ``char``."""
    for i, (a, b) in enumerate(offsets):
        if a <= char < b:
            return i
    raise ValueError(f"no token covers character {char}")


def encode_with_spans(tokenizer, text: str, user_char: int, news_char: int) -> tuple[list[int], int, int]:
    """(token ids of ``text``, user_end, news_end): the tokens holding the two character offsets.

    One tokenisation of the whole text (never of prefixes), so the spans index exactly the
    tokens the model sees. Shared by the dataset builder and the scorer.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    return list(enc["input_ids"]), token_at(offsets, user_char), token_at(offsets, news_char)


# The modes a case parsed from a prompt in mode k can be rendered in (it holds what they show).
_RENDERABLE_FROM = {"full": MODES, "without_persona": ("without_persona",), "without_history": ("without_history",)}


NEWS_BOUNDARY_SLACK = 8  # tokens the news may lose to merges across its boundaries inside the prompt


@functools.lru_cache(maxsize=16)
def news_token_count(tokenizer, news: str) -> int:
    """Tokens of the news text on its own (cached: every case of an event shares its news)."""
    return len(tokenizer(news, add_special_tokens=False)["input_ids"])


def _case_index(case: Case, event: Event) -> int | None:
    return next((i for i, c in enumerate(event.cases) if c is case), None)


def select_case_history(case: Case, events: Sequence[Event], num_history: int) -> list[HistoryPost]:
    """The posts the prompt shows: as given when pre-selected, else BM25 against the news of the
    events, the wordings of one news item (`bm25.select_history`'s summed score; one event: plain BM25)."""
    if case.history_is_selected:
        return list(case.history[:num_history])
    return select_history(case.history, [e.news for e in events], k=num_history, exclude_text=case.weibo)


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
    out = build_examples(case, [event], tokenizer, cfg, stats, include_response)
    return None if out is None else out[0]


def build_examples(
    case: Case,
    events: Sequence[Event],
    tokenizer,
    cfg: PromptConfig = PromptConfig(),
    stats: BuildStats | None = None,
    include_response: bool = True,
) -> list[dict] | None:
    """One example per event for one user, every one with the same user span: `build_example`
    for W wordings of one news item (a framing comparison: each `Event` holds one wording).

    Why one user span: the wordings' crowds should differ by the wording alone, so the user's
    history is chosen once (BM25 against all wordings, summed) and cut once, to the tightest cut
    that lets every wording fit (the largest caps under which all of them fit). The prompts are
    then equal token for token up to the news marker, so a generator can prefill that head once
    for all W (`generation.sample_rows(group_size=W)`). A user's prompts fit together or not at
    all: an overflow raises for the wording that does not fit, or (``on_overflow="skip"``)
    returns None and counts one skip per wording. One event is exactly `build_example`.
    """
    events = list(events)
    if not events:
        raise ValueError("build_examples needs at least one event")
    if case.raw_prompt is not None:
        if len(events) > 1:
            raise ValueError("a record's own prompt has one wording; give one event")
        if cfg.mode != "full":
            event = events[0]
            raise DataError(event.source, f"mode {cfg.mode!r} needs a prompt that parses into fields",
                            _case_index(case, event), "instruction")
        posts, persona = [], None
    else:
        if case.prompt_mode is not None and cfg.mode not in _RENDERABLE_FROM[case.prompt_mode]:
            event = events[0]
            raise DataError(event.source, f"the record's prompt is in mode {case.prompt_mode!r}, which lacks what mode "
                            f"{cfg.mode!r} shows", _case_index(case, event), "instruction")
        posts = [] if cfg.mode == "without_history" else select_case_history(case, events, cfg.num_history)
        persona = None if cfg.mode == "without_persona" else case.persona

    resp_ids: list[int] = []
    if include_response:
        resp_ids = tokenizer(case.weibo + IM_END, add_special_tokens=False)["input_ids"]
    budget = cfg.max_length - len(resp_ids)
    # Bounded work (issue 19): the news is never cut, so a news text whose tokens alone exceed the
    # budget overflows at once (tokenised once per event), without the cap searches below, each of
    # which re-tokenises the whole prompt (minutes for a 1 MB news text over an event's cases).
    # The words of an error: a built example has a response and a build setting (on_overflow) that
    # may skip it; a prompt alone (prediction) has neither.
    with_response = f" + {len(resp_ids)} response" if include_response else ""
    for event in events:
        if case.raw_prompt is None and news_token_count(tokenizer, event.news) > budget + NEWS_BOUNDARY_SLACK:
            what = (f"the news alone has {news_token_count(tokenizer, event.news)} tokens"
                    + (f"; with the {len(resp_ids)} response tokens it" if include_response else ", which")
                    + f" exceeds max_length {cfg.max_length} (the news is never cut)")
            err = PromptTooLong(event.source, what, _case_index(case, event), "news")
            return overflow(err, cfg, stats, include_response, count=len(events))

    def encode(event: Event, h_cap: int | None, p_cap: int | None):
        if case.raw_prompt is not None:
            chars = marker_offsets(case.raw_prompt)
            if chars is None:
                raise DataError(event.source, f"prompt lacks the markers {USER_MARKER!r} and {NEWS_MARKER!r} "
                                "(in that order)", _case_index(case, event), "instruction")
            r = RenderedPrompt(case.raw_prompt, *chars)
        else:
            r = render_user_prompt(case.user_name, posts, persona, event.news, event.topic, cfg.mode, h_cap, p_cap)
        full = chat_prompt(r.text)
        base = full.rindex(r.text + IM_END)  # where the user turn starts (not a copy in the system turn)
        return encode_with_spans(tokenizer, full, base + r.user_char, base + r.news_char)

    encoded = [encode(e, None, None) for e in events]
    pieces = [len(s) for p in posts for s in (p.text, p.retweet) if s]
    p_len = len(clean_persona(persona)) if cfg.mode != "without_persona" else 0
    h_cap = p_cap = None

    def fits(h, p) -> bool:  # every wording fits under these caps
        return all(len(encode(e, h, p)[0]) <= budget for e in events)

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

    need_persona_cut = any(len(ids) > budget for ids, _, _ in encoded)
    if need_persona_cut and pieces:
        h_cap = largest_fitting(max(pieces), lambda c: fits(c, None))
        need_persona_cut = h_cap is None
        h_cap = 0 if h_cap is None else h_cap
    if need_persona_cut and p_len:
        p_cap = largest_fitting(p_len, lambda c: fits(h_cap, c))
        p_cap = 0 if p_cap is None else p_cap
    if h_cap is not None or p_cap is not None:
        encoded = [encode(e, h_cap, p_cap) for e in events]

    for event, (ids, _, _) in zip(events, encoded):
        if len(ids) > budget:
            err = PromptTooLong(
                event.source,
                f"{len(ids)} prompt{with_response} tokens exceed max_length {cfg.max_length} "
                f"even with history and persona cut",
                _case_index(case, event),
                "weibo" if include_response else "news",
            )
            return overflow(err, cfg, stats, include_response, count=len(events))

    h_cut = sum(max(0, n - h_cap) for n in pieces) if h_cap is not None else 0
    p_cut = max(0, p_len - p_cap) if p_cap is not None else 0
    if stats is not None:
        n_ex = len(events)
        stats.built += n_ex
        stats.history_truncated += n_ex * int(h_cut > 0)
        stats.history_chars_cut += n_ex * h_cut
        stats.persona_truncated += n_ex * int(p_cut > 0)
        stats.persona_chars_cut += n_ex * p_cut

    return [dict(
        input_ids=np.asarray(list(ids) + list(resp_ids), dtype=np.int32),  # [n]
        loss_mask=np.asarray([0] * len(ids) + [1] * len(resp_ids), dtype=np.int32),  # [n]
        user_end=user_end,
        news_end=news_end,
        prompt_len=len(ids),
        n_truncated_history_chars=h_cut,
    ) for ids, user_end, news_end in encoded]


def overflow(err: "PromptTooLong", cfg: PromptConfig, stats: "BuildStats | None", building: bool = True,
             count: int = 1):
    """An example that cannot fit even after cutting what may be cut: raise it, or count the skip
    (on_overflow='skip'; `count` examples, a user's wordings skipped together) so the build summary
    reports it; returns None for the caller to return. `building`: a dataset build, whose error says
    how to go on (a prompt alone raises `err` as is: its caller knows what to advise)."""
    if cfg.on_overflow == "raise":  # say how to go on: a longer max_length, or skip and count such cases
        if not building:
            raise err
        raise PromptTooLong(err.file, f"{err.what} (raise max_length, or set on_overflow to skip to leave such "
                            "cases out and count them)", err.record, err.field)
    if stats is not None:
        stats.skipped_too_long += count
        stats.skipped.append(str(err))
    return None
