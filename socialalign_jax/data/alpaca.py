"""The authors' Alpaca-format files (`[{instruction, input, output}]`) read back into events.

Kept apart from records.py because reading them means parsing the rendered prompt (prompt.py),
and prompt.py itself builds on the record types: records <- prompt <- alpaca, no cycle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from socialalign_jax.data import prompt as _prompt
from socialalign_jax.data.records import (DEFAULT_LABELS, Case, DataError, Event, _check_history_len, _check_label,
                                          _Fields, load_json, visible)


def read_alpaca(
    path: str | os.PathLike,
    labels: Sequence[str] = DEFAULT_LABELS,
    min_history: int = 5,
    allow_short_history: bool = False,
) -> list[Event]:
    """Read the authors' Alpaca list ``[{instruction, input, output}]`` into events.

    The user turn is ``instruction`` (plus ``"\\n" + input`` when input is non-empty). It
    must contain both span markers. Where it parses back into the template's fields (in any
    of the three modes) and re-renders to the identical string, the case gets those fields
    and the mode (so it builds exactly as the raw event would, and ablations that drop a
    block work); otherwise the verbatim text is kept in ``Case.raw_prompt`` and the spans
    come from the markers (``prompt.marker_offsets``). Records are grouped into
    events by news text, in first-appearance order; ids are ``{stem}-{k:04d}``. An optional
    per-record ``sentiment`` key is validated against ``labels``.
    """
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, list):
        raise DataError(path, f"expected a JSON list of records, got {type(data).__name__}")
    events: dict[str, Event] = {}
    for i, rec in enumerate(data):
        f = _Fields(path, rec, i)
        instruction = f.text("instruction")
        extra = f.text("input", required=False, nonempty=False) or ""
        output = f.text("output", nonempty=False)
        if output is None or not visible(output):  # whitespace / zero-width only is no response
            raise f.err("output", "empty response")
        user_text = instruction + ("\n" + extra if extra else "")
        for marker in (_prompt.USER_MARKER, _prompt.NEWS_MARKER):
            if marker not in user_text:
                raise f.err("instruction", f"missing marker {marker!r}")
        if _prompt.marker_offsets(user_text) is None:
            raise f.err("instruction", "news marker precedes the user marker")
        sentiment = f.text("sentiment", required=False)
        _check_label(path, i, sentiment, labels)

        parsed = _prompt.parse_user_prompt(user_text)
        if parsed is not None:
            if parsed.mode != "without_history":
                _check_history_len(path, i, len(parsed.history), min_history, allow_short_history)
            news, topic = parsed.news, parsed.topic
            case = Case(
                user_name=parsed.user_name,
                weibo=output,
                history=list(parsed.history),
                persona=parsed.persona,
                sentiment=sentiment,
                history_is_selected=True,
                prompt_mode=parsed.mode,
            )
        else:
            news, topic = _prompt.news_and_topic_from_markers(user_text)
            case = Case(user_name="", weibo=output, history=[], sentiment=sentiment, history_is_selected=True,
                        raw_prompt=user_text)
        ev = events.get(news)
        if ev is None:
            ev = events[news] = Event(event_id=f"{path.stem}-{len(events):04d}", topic=topic, news=news, source=str(path))
        ev.cases.append(case)
    if not events:
        raise DataError(path, "no records")
    return list(events.values())
