"""NLPCC 2016 Task 4 (stance detection in Chinese microblogs) -> events.

Two tab-separated layouts are read, each with its header line:
  * the official task files (evasampledata4-TaskAA.txt, the gold files):
    ``ID  TARGET  TEXT  STANCE``;
  * the combined table ``task  split  orig_id  target  stance  text`` (QUOTE_NONE, ``\\``
    as escape character) that bundles Task A train + Task A/B gold.
Mapping: event = one target (news = topic = the target text, event id = the target);
case = one post, its stance FAVOR/AGAINST/NONE -> favor/against/neutral (an empty stance
is an unlabelled case, kept); no history and no user: each post gets its own pseudonym,
so the prompt is the without_history one whatever the mode.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from socialalign_jax.data.converters.common import STANCE_LABELS as LABELS
from socialalign_jax.data.converters.common import SourceEvents, check_max_events, counts, finish, pseudonym
from socialalign_jax.data.records import Case, DataError, Event

STANCES = {"FAVOR": "favor", "AGAINST": "against", "NONE": "neutral"}
OFFICIAL = ("ID", "TARGET", "TEXT", "STANCE")
COMBINED = ("task", "split", "orig_id", "target", "stance", "text")


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(path, "no such file or directory")
    files = sorted(path.glob("*.tsv")) or sorted(path.glob("*.txt"))
    if not files:
        raise DataError(path, "no *.tsv or *.txt NLPCC 2016 file")
    return files


def _rows(file: Path):
    """(record index, {column: value}) per data line; record 0 is the first line after the header."""
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(file, f"not valid UTF-8 (byte {e.start}); convert GB18030 files to UTF-8 first") from None
    except OSError as e:
        raise DataError(file, f"cannot read ({e.strerror or e})") from None
    lines = text.splitlines()
    if not lines:
        raise DataError(file, "empty file")
    header = tuple(h.strip() for h in lines[0].split("\t"))
    if header == OFFICIAL:
        keys, reader = ("orig_id", "target", "text", "stance"), (line.split("\t") for line in lines[1:])
    elif header == COMBINED:
        keys = COMBINED
        reader = csv.reader(lines[1:], delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
    else:
        raise DataError(file, f"unknown header {list(header)}; expected {list(OFFICIAL)} or {list(COMBINED)}")
    for i, cols in enumerate(reader):
        if not cols or cols == [""]:
            raise DataError(file, "blank line", i)
        if header == OFFICIAL and len(cols) == len(keys) - 1:
            cols = cols + [""]  # unlabelled rows of the official files omit the last column
        if len(cols) != len(keys):
            raise DataError(file, f"{len(cols)} tab-separated columns, expected {len(keys)}", i)
        yield i, dict(zip(keys, cols))


def read_nlpcc2016(path: str, max_events: int | None = None) -> list[Event]:
    """Read NLPCC 2016 stance files (a file, or a directory of *.tsv / *.txt)."""
    max_events = check_max_events(max_events)
    root = Path(path)
    events: dict[str, Event] = {}
    skipped: Counter = Counter()
    records = unlabelled = 0
    for file in _files(root):
        for i, row in _rows(file):
            records += 1
            target = row["target"].strip()
            if not target:
                raise DataError(file, "empty string", i, "target")
            stance = row["stance"].strip().upper()
            if stance and stance not in STANCES:
                raise DataError(file, f"unknown stance {row['stance']!r} (expected FAVOR, AGAINST or NONE)", i, "stance")
            ev = events.get(target)
            if ev is None:
                if max_events is not None and len(events) >= max_events:
                    skipped["beyond_max_events"] += 1
                    continue
                ev = events[target] = Event(event_id=target, topic=target, news=target, source=str(file))
            if not row["text"].strip():
                skipped["empty_text"] += 1
                continue
            unlabelled += not stance
            key = "/".join(row.get(k, "") for k in ("task", "split", "orig_id"))
            ev.cases.append(Case(user_name=pseudonym(f"nlpcc2016\x00{file.name}\x00{key}\x00{i}"),
                                 weibo=row["text"], history=[], sentiment=STANCES.get(stance),
                                 history_is_selected=True))
    kept = [e for e in events.values() if e.cases]
    skipped["events_without_cases"] += len(events) - len(kept)
    return SourceEvents(finish(kept, root), source="nlpcc2016", records=records,
                        cases=sum(len(e.cases) for e in kept), events=len(kept), unlabelled_cases=unlabelled,
                        silver_labels=False, labels=list(LABELS), skipped=counts(skipped))
