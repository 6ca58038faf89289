"""ZS-CSD (Ding et al. 2025, conversational stance detection) -> events.

Published format: a JSON list (train_data.json, dev_data.json, test_data.json) of
``{"id", "target", "target_type", "sentences": [root comment, ..., labelled comment],
"speakers": [int per sentence], "label": int}`` with label.json
``{"favor": 0, "against": 1, "neutral": 2}``: the label is the stance of the last sentence
towards the target.

Mapping (docs/real_data.md):
  * event = one target; news = topic = the target text; event id = the target text;
  * case = one record; response (the target post) = the last sentence; label = its stance;
  * the preceding sentences (the thread it replies to) sit where the user's history posts
    go, most recent first, already selected (no BM25): with num_history=5 the prompt shows
    the five nearest comments of longer threads (counted as `threads_longer_than_5`);
  * user name = a pseudonym of (target, thread root, speaker id): speaker ids are only
    unique within one conversation.
Label set: favor, against, neutral.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from socialalign_jax.data.converters.common import STANCE_LABELS as LABELS
from socialalign_jax.data.converters.common import (SourceEvents, check_max_events, counts, finish, load_json,
                                                    pseudonym)
from socialalign_jax.data.records import Case, DataError, Event, HistoryPost, visible

PUBLISHED_LABEL_IDS = {"favor": 0, "against": 1, "neutral": 2}
SPLIT_FILES = ("train_data.json", "dev_data.json", "test_data.json")


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(path, "no such file or directory")
    named = [path / n for n in SPLIT_FILES if (path / n).exists()]
    others = sorted(p for p in path.glob("*.json") if p.name not in SPLIT_FILES and p.name != "label.json"
                    and not p.name.startswith("target_knowledge"))
    if not named and not others:
        raise DataError(path, f"no ZS-CSD data file ({', '.join(SPLIT_FILES)})")
    return named + others


def _label_names(path: Path) -> dict[int, str]:
    """id -> name from label.json beside the data (the published mapping if absent)."""
    lj = (path if path.is_dir() else path.parent) / "label.json"
    mapping = load_json(lj) if lj.exists() else PUBLISHED_LABEL_IDS
    if (not isinstance(mapping, dict) or set(mapping) != set(LABELS)
            or sorted(mapping.values()) != list(range(len(LABELS)))):
        raise DataError(lj, f"expected a mapping of {', '.join(LABELS)} to 0..{len(LABELS) - 1}, got {mapping!r}")
    return {int(v): k for k, v in mapping.items()}


def _label(file: Path, i: int, value, names: dict[int, str]) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(file, f"expected a label id or name, got {type(value).__name__}", i, "label")
    if isinstance(value, int):
        if value not in names:
            raise DataError(file, f"unknown label id {value} (expected one of {sorted(names)})", i, "label")
        return names[value]
    if value.strip().lower() not in LABELS:
        raise DataError(file, f"unknown label {value!r} (expected one of {', '.join(LABELS)})", i, "label")
    return value.strip().lower()


def read_zs_csd(path: str, max_events: int | None = None) -> list[Event]:
    """Read ZS-CSD files (a data file, or a directory of train/dev/test_data.json)."""
    max_events = check_max_events(max_events)
    root = Path(path)
    names = _label_names(root)
    events: dict[str, Event] = {}
    skipped: Counter = Counter()
    records = long_threads = 0
    seen_ids: dict[str, tuple[Path, int]] = {}
    for file in _files(root):
        data = load_json(file)
        if not isinstance(data, list):
            raise DataError(file, f"expected a JSON list of records, got {type(data).__name__}")
        for i, rec in enumerate(data):
            records += 1
            if not isinstance(rec, dict):
                raise DataError(file, f"expected a JSON object, got {type(rec).__name__}", i)
            for key in ("target", "sentences", "speakers", "label"):
                if key not in rec:
                    raise DataError(file, "missing", i, key)
            rid = rec.get("id")
            if rid is not None:  # a record read twice would count twice in the event's distribution
                key = json.dumps(rid)
                if key in seen_ids:
                    first_file, first_i = seen_ids[key]
                    raise DataError(file, f"duplicate record id {rid!r} (also {first_file.name} record {first_i})",
                                    i, "id")
                seen_ids[key] = (file, i)
            target, sents, spk = rec["target"], rec["sentences"], rec["speakers"]
            if not isinstance(target, str) or not target.strip():
                raise DataError(file, "expected a non-empty string", i, "target")
            if not isinstance(sents, list) or not sents or not all(isinstance(s, str) for s in sents):
                raise DataError(file, "expected a non-empty list of strings", i, "sentences")
            if (not isinstance(spk, list) or len(spk) != len(sents)
                    or not all(isinstance(s, int) and not isinstance(s, bool) for s in spk)):
                raise DataError(file, f"expected {len(sents)} integer speaker ids (one per sentence)", i, "speakers")
            label = _label(file, i, rec["label"], names)
            target = target.strip()
            ev = events.get(target)
            if ev is None:
                if max_events is not None and len(events) >= max_events:
                    skipped["beyond_max_events"] += 1
                    continue
                ev = events[target] = Event(event_id=target, topic=target, news=target, source=str(file))
            if not visible(sents[-1]):  # only whitespace / zero-width characters: no response to learn
                skipped["empty_response"] += 1
                continue
            context = [s for s in sents[:-1] if visible(s)]
            skipped["empty_context_sentences"] += len(sents) - 1 - len(context)
            long_threads += len(context) > 5
            ev.cases.append(Case(
                user_name=pseudonym(f"zs_csd\x00{target}\x00{sents[0]}\x00{spk[-1]}"),
                weibo=sents[-1],
                history=[HistoryPost(text=s) for s in reversed(context)],
                sentiment=label,
                history_is_selected=True,
            ))
    kept = [e for e in events.values() if e.cases]
    skipped["events_without_cases"] += len(events) - len(kept)
    n_cases = sum(len(e.cases) for e in kept)
    return SourceEvents(finish(kept, root), source="zs_csd", records=records, cases=n_cases, events=len(kept),
                        silver_labels=False, labels=list(LABELS), threads_longer_than_5=long_threads,
                        skipped=counts(skipped))
