"""What the public-corpus converters share: the list type that carries conversion counts,
pseudonyms, file reading with one-line errors, and event ordering.

Converters never write raw files: they return `Event` objects straight to the dataset
builder, so the real corpora are read in place and nothing derived from them lands on disk
except the built dataset itself.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

from socialalign_jax.data.records import DataError, Event, load_json  # noqa: F401 (re-exported for the converters)

DEFAULT_SALT = "socialalign-jax"
# The stance label set (ZS-CSD and NLPCC-2016), in class-id order: a concept of its own, not the
# sentiment labels, but shared by both stance converters and the builder's per-source defaults.
STANCE_LABELS = ("favor", "against", "neutral")
PSEUDONYM_HEX = 8  # 16^8 names: collisions among ~1M CED uids stay rare (about 1 in 4k users)


class SourceEvents(list):
    """A list of events plus `source_info` (counts of everything read, kept and skipped).

    The dataset builder stores `source_info` in the metadata, so every record a converter
    did not turn into a case is accounted for by reason, next to the build's own counts.
    """

    def __init__(self, items=(), /, **info: Any):
        super().__init__(items)
        self.source_info: dict[str, Any] = dict(info)


def pseudonym(key: str, salt: str = DEFAULT_SALT) -> str:
    """A stable display name for a user id: real ids and screen names never reach a prompt."""
    h = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).hexdigest()[:PSEUDONYM_HEX]
    return f"用户{h}"


def check_max_events(max_events: int | None) -> int | None:
    if max_events is not None and int(max_events) < 0:
        raise ValueError(f"max_events must be >= 0, got {max_events}")
    return int(max_events) if max_events else None


def counts(c: Counter) -> dict[str, int]:
    """JSON-able, sorted skip counts."""
    return {k: int(v) for k, v in sorted(c.items())}


def finish(events: list[Event], path: Path) -> list[Event]:
    if not events:
        raise DataError(path, "no events with at least one usable case")
    return events
