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


def iter_jsonl(lines: Iterable[str], source: str, error: type[Exception] = UserError) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line of `lines` (text already decoded)."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
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
        raise error(f"{path}: not valid UTF-8 (byte {e.start})") from None


def read_jsonl(path: str | os.PathLike, error: type[Exception] = UserError,
               what: str = "input") -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line of the file at `path`."""
    return iter_jsonl(read_jsonl_text(path, error, what).splitlines(), str(path), error)
