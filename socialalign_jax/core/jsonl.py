"""Reading JSON Lines inputs (predictions, scoring inputs, users files, web uploads).

One implementation of the per-line checks every JSONL input gets, so each reports a bad line
the same way: `<source>: line <n>: invalid JSON (<why> at column <c>)` or `... expected a
JSON object, got <type>`. Blank lines carry no record. The error class is the caller's (each
is a UserError subclass), so every CLI prints it as one line and exits 2.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

from socialalign_jax.core.errors import UserError


CUT_SHORT = "it was cut short (an interrupted copy or download?): copy it again"


def utf8_problem(raw: bytes, e: UnicodeDecodeError) -> str:
    """What a UTF-8 decoding error means: a file that ends inside a character was cut short
    (a copy or download that stopped mid-character), anything else is another encoding."""
    if e.reason == "unexpected end of data" and e.end >= len(raw):
        return f"the file ends in the middle of a character (byte {e.start} of {len(raw)}): {CUT_SHORT}"
    return f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})"


def _ends_early(text: str, e: json.JSONDecodeError) -> bool:
    """The decoder ran out of text: it failed at the end, or in a string that never closes
    (json reports those at the opening quote; a string cannot span lines, so it ran to the end)."""
    return e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")


def json_problem(text: str, e: json.JSONDecodeError) -> str:
    """What a JSON decoding error means: one where the text runs out is a file that was cut
    short; anything else is malformed JSON at that place."""
    if _ends_early(text, e):
        return f"the file ends in the middle of a JSON value (line {e.lineno} column {e.colno}): {CUT_SHORT}"
    return f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"


def iter_jsonl(lines: Iterable[str], source: str, error: type[Exception] = UserError) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line of `lines` (text already decoded)."""
    lines = list(lines)
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == last and _ends_early(line, e):
                raise error(f"{source}: line {lineno}: invalid JSON: the file ends in the middle of a record: {CUT_SHORT}") from None
            raise error(f"{source}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise error(f"{source}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def read_jsonl_text(path: str | os.PathLike, error: type[Exception] = UserError, what: str = "input") -> str:
    """A JSONL file's text (UTF-8, a BOM dropped); unreadable or undecodable is one line."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: {utf8_problem(raw, e)}") from None


def read_jsonl(path: str | os.PathLike, error: type[Exception] = UserError,
               what: str = "input") -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line of the file at `path`."""
    return iter_jsonl(read_jsonl_text(path, error, what).splitlines(), str(path), error)
