"""Readers for the raw event files and the authors' Alpaca list, with strict validation.

Every problem is reported as one ``DataError`` line naming the file, the record (case
index) and the field, so a bad file in a large corpus can be fixed without a debugger.
Nothing is dropped or truncated here: cleaning (hashtag-only history posts, the target
post in its own history) is the job of ``bm25.select_history``, and length limits the
job of the prompt builder.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from socialalign_jax.core.jsonl import json_problem, utf8_problem
from socialalign_jax.core.labels import DEFAULT_LABELS


class DataError(ValueError):
    """One-line description of bad input: ``{file}: record {i}: field '{field}': {what}``."""

    def __init__(self, file: str | os.PathLike, what: str, record: int | None = None, field: str | None = None):
        self.file, self.record, self.field = str(file), record, field
        self.what = " ".join(str(what).split())  # keep the message on one line
        parts = [self.file]
        if record is not None:
            parts.append(f"record {record}")
        if field is not None:
            parts.append(f"field '{field}'")
        super().__init__(": ".join(parts + [self.what]))


@dataclass(frozen=True)
class HistoryPost:
    text: str
    retweet: str | None = None  # text of the post this one retweets, if any
    topics: tuple[str, ...] = ()


@dataclass
class Case:
    user_name: str
    # The user's real post about the event: the training target ('' when only the prompt is
    # needed: generation and prediction build prompt-only examples).
    weibo: str = ""
    history: list[HistoryPost] = field(default_factory=list)
    persona: str | None = None
    sentiment: str | None = None
    user_level: str | None = None
    gender: str | None = None
    ip: str | None = None
    # True when `history` is already the selected top-k (Alpaca data); False when it is
    # the user's whole timeline and BM25 selection still has to run.
    history_is_selected: bool = False
    # The verbatim user turn, kept only for Alpaca prompts that do not re-render exactly.
    raw_prompt: str | None = None
    # The template mode an Alpaca prompt was rendered in (None for raw events): a case read
    # from a 'without_persona' prompt cannot be rendered in 'full'.
    prompt_mode: str | None = None


@dataclass
class Event:
    event_id: str
    topic: str
    news: str
    cases: list[Case] = field(default_factory=list)
    source: str = ""  # the file the event came from
    # The event's crowd: how many of its responses carry each label ({label: count}), over a
    # wider sample than the cases (every responder, not only those with a history). When
    # given it is the event's macro target (data/targets.py); None = the cases' own labels.
    crowd: dict[str, int] | None = None


# --------------------------------------------------------------------------- helpers


def load_json(path: Path) -> Any:
    """Parse a UTF-8 JSON file (BOM allowed); any problem is one DataError line naming the file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(path, "file not found") from e
    except OSError as e:
        raise DataError(path, f"cannot read ({e.strerror})") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(path, utf8_problem(raw, e)) from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, json_problem(text, e)) from e
    if _SURROGATE_ESCAPE.search(text):  # "\ud800" escapes decode to text no tokenizer can encode
        _check_unicode(path, data)
    return data


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _check_unicode(path: Path, obj: Any, where: str = "") -> None:
    """DataError naming the record and field of the first string holding a lone surrogate."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            m = re.match(r"^(?:cases)?\[(\d+)\]\.?(.*)$", where)  # a list of records (or an event's cases)
            record, field = (int(m.group(1)), m.group(2) or None) if m else (None, where or None)
            raise DataError(path, f"not valid Unicode text (lone surrogate {obj[e.start]!r} at character "
                                  f"{e.start})", record, field) from None
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_unicode(path, k, where)
            _check_unicode(path, v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_unicode(path, v, f"{where}[{i}]")


class _Fields:
    """Typed field access on one JSON object, raising DataError with full context."""

    def __init__(self, path: Path, obj: Any, record: int | None, prefix: str = ""):
        self.path, self.record, self.prefix = path, record, prefix
        if not isinstance(obj, dict):
            raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", record, prefix.rstrip(".") or None)
        self.obj = obj

    def err(self, name: str, what: str) -> DataError:
        return DataError(self.path, what, self.record, self.prefix + name)

    def text(self, name: str, *, required: bool = True, nonempty: bool = True) -> str | None:
        if name not in self.obj or self.obj[name] is None:
            if required:
                raise self.err(name, "missing")
            return None
        v = self.obj[name]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not required:
            if isinstance(v, float) and v != v or v in (float("inf"), float("-inf")):
                raise self.err(name, f"expected a string or a finite number, got {v}")
            v = str(v)  # user_level etc. are sometimes numbers
        if not isinstance(v, str):
            raise self.err(name, f"expected a string, got {type(v).__name__}")
        if nonempty and not visible(v):
            raise self.err(name, "empty string")
        return v

    def list(self, name: str) -> list:
        if name not in self.obj:
            raise self.err(name, "missing")
        v = self.obj[name]
        if not isinstance(v, list):
            raise self.err(name, f"expected a list, got {type(v).__name__}")
        return v


_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"), None)


def visible(text: str) -> bool:
    """True if text has something besides whitespace and zero-width characters (ZWSP, ZWJ, BOM, ...)."""
    return bool(text.translate(_INVISIBLE).strip())


def _read_history(path: Path, i: int, items: list) -> list[HistoryPost]:
    posts = []
    for j, item in enumerate(items):
        f = _Fields(path, item, i, f"history[{j}].")
        text = f.text("text", nonempty=False)
        retweet = None
        rt = f.obj.get("retweet")
        if isinstance(rt, dict):
            retweet = _Fields(path, rt, i, f"history[{j}].retweet.").text("text", nonempty=False)
        elif isinstance(rt, str):
            retweet = rt
        elif rt is not None:
            raise f.err("retweet", f"expected {{'text': str}}, got {type(rt).__name__}")
        topics = f.obj.get("topics") or []
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise f.err("topics", "expected a list of strings")
        posts.append(HistoryPost(text=text, retweet=retweet, topics=tuple(topics)))
    return posts


def _check_label(path: Path, i: int, value: str | None, labels: Sequence[str]) -> None:
    if value is not None and value not in labels:
        raise DataError(path, f"unknown label {value!r} (expected one of {', '.join(labels)})", i, "sentiment")


def _check_history_len(path: Path, i: int, n: int, min_history: int, allow_short: bool) -> None:
    if n < min_history and not allow_short:
        raise DataError(
            path, f"{n} history posts, need at least {min_history} (set allow_short_history=True to accept)", i, "history"
        )


# --------------------------------------------------------------------------- event files


def read_event_file(
    path: str | os.PathLike,
    labels: Sequence[str] = DEFAULT_LABELS,
    min_history: int = 5,
    allow_short_history: bool = False,
) -> Event:
    """Read one raw event JSON (SPEC section 4); the event id is the file's stem."""
    path = Path(path)
    f = _Fields(path, load_json(path), None)
    topic, news = f.text("topic"), f.text("news")
    event_id = f.text("event_id", required=False) or path.stem
    raw_cases = f.list("cases")
    if not raw_cases:
        raise f.err("cases", "empty list")
    cases = []
    for i, rc in enumerate(raw_cases):
        c = _Fields(path, rc, i)
        history = _read_history(path, i, c.list("history"))
        _check_history_len(path, i, len(history), min_history, allow_short_history)
        weibo = c.text("weibo", nonempty=False)
        if not visible(weibo):
            raise c.err("weibo", "empty response")
        sentiment = c.text("sentiment", required=False)
        _check_label(path, i, sentiment, labels)
        selected = c.obj.get("history_is_selected", False)
        if not isinstance(selected, bool):
            raise c.err("history_is_selected", "expected true or false")
        cases.append(
            Case(
                user_name=c.text("user_name"),
                weibo=weibo,
                history=history,
                persona=c.text("user_persona", required=False, nonempty=False) or None,
                sentiment=sentiment,
                user_level=c.text("user_level", required=False, nonempty=False),
                gender=c.text("gender", required=False, nonempty=False),
                ip=c.text("ip", required=False, nonempty=False),
                history_is_selected=selected,
            )
        )
    return Event(event_id=event_id, topic=topic, news=news, cases=cases, source=str(path),
                 crowd=_read_crowd(f, labels))


def _read_crowd(f: "_Fields", labels: Sequence[str]) -> dict[str, int] | None:
    """The optional 'crowd' object: {label: number of the event's responses with that label}."""
    raw = f.obj.get("crowd")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise f.err("crowd", f"expected an object {{label: count}}, got {type(raw).__name__}")
    out = {}
    for k, v in raw.items():
        if k not in labels:
            raise f.err("crowd", f"unknown label {k!r} (expected one of {', '.join(labels)})")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise f.err("crowd", f"count of {k!r} must be a non-negative integer, got {v!r}")
        out[k] = v
    if not sum(out.values()):
        raise f.err("crowd", "no responses counted (every count is 0)")
    return out


def read_event_dir(
    directory: str | os.PathLike,
    labels: Sequence[str] = DEFAULT_LABELS,
    min_history: int = 5,
    allow_short_history: bool = False,
) -> list[Event]:
    """Read every ``*.json`` under ``directory`` in sorted file-name order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(directory, "not a directory")
    files = sorted(directory.glob("*.json"))
    if not files:
        raise DataError(directory, "no *.json event files")
    events, seen = [], {}
    for p in files:
        ev = read_event_file(p, labels, min_history, allow_short_history)
        if ev.event_id in seen:
            raise DataError(p, f"duplicate event id {ev.event_id!r} (also in {seen[ev.event_id]})", None, "event_id")
        seen[ev.event_id] = p.name
        events.append(ev)
    return events


# --------------------------------------------------------------------------- Alpaca
