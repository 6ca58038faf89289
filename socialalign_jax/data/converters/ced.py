"""CED (Song et al. 2018, Chinese rumour dataset with reposts/comments) -> events.

Published layout (the CED_Dataset folder of thunlp/Chinese_Rumor_Dataset):
  original-microblog/<name>.json   one source microblog {"text", "user", "time", ...}
  rumor-repost/<name>.json, non-rumor-repost/<name>.json
                                   its reposts/comments [{"uid", "text", "mid", "parent",
                                   "kids", "date": "YYYY-mm-dd HH:MM:SS"}]
Mapping (docs/real_data.md):
  * event = one source microblog; news = its text; topic = its first non-empty #hashtag#,
    else its 【title】, else its first clause (up to the first ，。！？；： or 20 characters);
  * a response's own words are the text before the first ``//@`` (what follows is the
    repost chain: other users' words). Not usable, each skip counted by reason:
    ``empty`` (no text: a bare repost), ``repost_chain_only`` (nothing before ``//@``),
    ``repost_marker_only`` (转发微博 / 轉發微博 / Repost, with or without trailing 。！.~),
    ``emoji_or_punctuation_only``
    (no letter or digit once [表情] codes are removed);
  * a case = an author's first usable response to an event (later ones to the same event:
    ``duplicate_author_in_event``) whose author has at least 5 usable responses to other
    events that can be history (not hashtag-only, not identical to the target), else
    ``author_history_under_5``; those other responses are the history, BM25-selected
    against the news at build time (bm25.select_history);
  * the event's crowd (its macro target, data/targets.py) = every author's first usable
    response to it (the cases are a few of these), a seeded sample of at most ``crowd_cap``
    (200) of them, labelled by the same labeller; events whose crowd has fewer than
    ``min_crowd`` (50) responses are left out (``event_crowd_under_min``): their targets would
    be mostly sampling noise (the build records each target's noise floor). ``crowd_cap=0``
    builds without crowds (targets from the cases' labels, as before);
  * labels are silver: the sentiment a labeller gives the response (``labeller``: a name of
    data/labellers.LABELLERS, default SnowNLP; docs/labellers.md measures them on human labels);
  * user name = a salted hash of the uid (pseudonym); uids never reach the data.
Splits are by event as everywhere else. With max_events only the first N events (in
file-number order) are read, so fewer authors reach 5 other responses.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from socialalign_jax.data.bm25 import is_hashtag_only
from socialalign_jax.data.converters.common import (DEFAULT_SALT, SourceEvents, check_max_events, counts, finish,
                                                    load_json, pseudonym)
from socialalign_jax.data.labellers import Labeller, make_labeller
from socialalign_jax.data.records import DEFAULT_LABELS, Case, DataError, Event, HistoryPost

MIN_OTHER = 5
CROWD_CAP = 200  # responses sampled per event for its crowd
MIN_CROWD = 50  # fewer responses than this: the event is left out (its target would be mostly noise)
DEFAULT_LABELLER = "snownlp"
REPOST_MARKERS = {"转发微博", "轉發微博", "repost"}
_TRAILING = "。.！!~～… \t"
_EMOTICON = re.compile(r"\[[^\[\]\s]{1,10}\]")  # Weibo emoticon codes such as [哈哈]
_WORD = re.compile(r"\w")
_HASHTAG = re.compile(r"#([^#\n]{1,40})#")
_TITLE = re.compile(r"【([^【】]{1,40})】")
_CLAUSE = re.compile(r"[，。！？；：,!?;:\n]")
TITLE_CHARS = 20


def derive_topic(news: str) -> str:
    """The event's hashtag: a #tag# of the text, its 【title】, or its first clause."""
    for rx in (_HASHTAG, _TITLE):
        for m in rx.finditer(news):
            if m[1].strip():
                return m[1].strip()
    first = _CLAUSE.split(news.strip(), maxsplit=1)[0].strip() or news.strip()
    return first[:TITLE_CHARS]


def own_words(text: str) -> tuple[str | None, str]:
    """(the author's own words or None, the reason they are unusable)."""
    if not text.strip():
        return None, "empty"
    own = text.split("//@", 1)[0].strip()
    if not own:
        return None, "repost_chain_only"
    if own.lower().rstrip(_TRAILING) in REPOST_MARKERS:  # 转发微博。 / Repost! as well
        return None, "repost_marker_only"
    if not _WORD.search(_EMOTICON.sub("", own)):
        return None, "emoji_or_punctuation_only"
    return own, ""


def _dataset_dir(path: Path) -> Path:
    for d in (path, path / "CED_Dataset"):
        if (d / "original-microblog").is_dir():
            return d
    if path.suffix in (".gz", ".tgz") or path.name.endswith(".tar.gz"):
        raise DataError(path, "extract the archive first (tar xzf ... -C /tmp) and pass the CED_Dataset folder")
    raise DataError(path, "no original-microblog/ folder (expected the CED_Dataset folder)")


def _sort_key(p: Path):
    head = p.stem.split("_", 1)[0]
    return (int(head), p.name) if head.isdigit() else (1 << 62, p.name)


def _responses(file: Path) -> list[tuple[int, str, str, str]]:
    """[(record, uid, text, date)] of one repost file, validated."""
    data = load_json(file)
    if not isinstance(data, list):
        raise DataError(file, f"expected a JSON list of responses, got {type(data).__name__}")
    out = []
    for i, r in enumerate(data):
        if not isinstance(r, dict):
            raise DataError(file, f"expected a JSON object, got {type(r).__name__}", i)
        for key in ("uid", "text"):
            if key not in r:
                raise DataError(file, "missing", i, key)
        uid, text = r["uid"], r["text"]
        if isinstance(uid, bool) or not isinstance(uid, (str, int)) or not str(uid).strip():
            raise DataError(file, "expected a non-empty user id", i, "uid")
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise DataError(file, f"expected a string, got {type(text).__name__}", i, "text")
        date = r.get("date") or ""
        if not isinstance(date, str):
            raise DataError(file, f"expected a date string, got {type(date).__name__}", i, "date")
        out.append((i, str(uid), text, date))
    return out


def crowd_sample(event_id: str, rows: list[tuple[int, str, str, str]], cap: int) -> list[tuple[int, str, str, str]]:
    """The event's crowd: each author's first usable response (earliest date, then record), then a
    sample of at most `cap` of them seeded by the event id alone (the same crowd whatever else is read)."""
    first: dict[str, tuple[int, str, str, str]] = {}
    for r in sorted(rows, key=lambda r: (r[3], r[0])):
        first.setdefault(r[1], r)
    crowd = sorted(first.values(), key=lambda r: r[0])
    if len(crowd) > cap:
        seed = int.from_bytes(hashlib.sha256(f"ced-crowd\x00{event_id}".encode()).digest()[:8], "little")
        keep = np.random.default_rng(seed).choice(len(crowd), size=cap, replace=False)
        crowd = [crowd[i] for i in sorted(keep)]
    return crowd


def read_ced(path: str, max_events: int | None = None, salt: str = DEFAULT_SALT,
             labeller: str | Labeller = DEFAULT_LABELLER, crowd_cap: int = CROWD_CAP,
             min_crowd: int = MIN_CROWD) -> list[Event]:
    """Read the CED_Dataset folder (or its parent) into silver-labelled events.

    `labeller`: a name of `labellers.LABELLERS` or a Labeller over negative/neutral/positive.
    `crowd_cap` > 0: each event gets a crowd of at most that many responses (its target) and
    events with fewer than `min_crowd` are left out; 0: no crowds.
    """
    max_events = check_max_events(max_events)
    if crowd_cap < 0 or min_crowd < 0:
        raise ValueError(f"crowd_cap and min_crowd must be >= 0, got {crowd_cap}, {min_crowd}")
    if crowd_cap and min_crowd > crowd_cap:
        raise ValueError(f"min_crowd ({min_crowd}) cannot exceed crowd_cap ({crowd_cap})")
    root = _dataset_dir(Path(path))
    originals = sorted((root / "original-microblog").glob("*.json"), key=_sort_key)
    if not originals:
        raise DataError(root / "original-microblog", "no *.json source microblogs")
    if max_events is not None:
        originals = originals[:max_events]
    skipped: Counter = Counter()
    news_of: list[tuple[Path, str, str]] = []  # (original file, news, event id)
    usable: list[list[tuple[int, str, str, str]]] = []  # per event: (record, uid, own words, date)
    records = 0
    for orig in originals:
        o = load_json(orig)
        if not isinstance(o, dict):
            raise DataError(orig, f"expected a JSON object, got {type(o).__name__}")
        news = o.get("text")
        if not isinstance(news, str):
            raise DataError(orig, "expected a string" if news is not None else "missing", None, "text")
        reposts = [d / orig.name for d in (root / "rumor-repost", root / "non-rumor-repost") if (d / orig.name).exists()]
        if len(reposts) > 1:
            raise DataError(orig, "responses in both rumor-repost/ and non-rumor-repost/")
        if not news.strip():
            skipped["event_empty_news"] += 1
            continue
        if not reposts:
            skipped["event_without_repost_file"] += 1
            continue
        rows = []
        for i, uid, text, date in _responses(reposts[0]):
            records += 1
            own, why = own_words(text)
            if own is None:
                skipped[why] += 1
            else:
                rows.append((i, uid, own, date))
        news_of.append((reposts[0], news.strip(), orig.stem))
        usable.append(rows)

    by_user: dict[str, list[tuple[int, str, str]]] = defaultdict(list)  # uid -> [(event, date, text)]
    for e, rows in enumerate(usable):
        for _, uid, own, date in rows:
            by_user[uid].append((e, date, own))

    in_event = Counter((uid, e) for e, rows in enumerate(usable) for _, uid, _, _ in rows)
    picked: list[list[tuple[int, str, list[HistoryPost]]]] = []
    for e, rows in enumerate(usable):
        seen, cases = set(), []
        for i, uid, own, date in sorted(rows, key=lambda r: (r[3], r[0])):  # earliest first
            if uid in seen:
                skipped["duplicate_author_in_event"] += 1
                continue
            seen.add(uid)
            if len(by_user[uid]) - in_event[uid, e] < MIN_OTHER:  # cheap necessary condition first
                skipped["author_history_under_5"] += 1
                continue
            others = sorted((d, t) for ev, d, t in by_user[uid] if ev != e)
            hist = [HistoryPost(text=t) for _, t in others]
            if sum(1 for h in hist if not is_hashtag_only(h) and h.text.strip() != own) < MIN_OTHER:
                skipped["author_history_under_5"] += 1
                continue
            cases.append((i, own, uid, hist))
        picked.append(cases)

    # The events kept: with a case, and (with crowds) with a crowd of at least min_crowd.
    kept: list[tuple[int, list]] = []
    for e, ((_, _, eid), cases) in enumerate(zip(news_of, picked)):
        if not cases:
            skipped["event_without_cases"] += 1
            continue
        crowd = crowd_sample(eid, usable[e], crowd_cap) if crowd_cap else []
        if crowd_cap and len(crowd) < min_crowd:
            skipped["event_crowd_under_min"] += 1
            continue
        kept.append((e, crowd))
    labeller = make_labeller(labeller) if isinstance(labeller, str) else labeller
    # One labelling pass over every text (case responses, then crowds): a labeller may batch.
    texts = [own for e, _ in kept for _, own, _, _ in picked[e]] + [r[2] for _, crowd in kept for r in crowd]
    labels = iter(labeller.label(texts) if texts else [])
    events = []
    for e, crowd in kept:
        file, news, eid = news_of[e]
        ev = Event(event_id=eid, topic=derive_topic(news), news=news, source=str(file))
        for _, own, uid, hist in picked[e]:
            ev.cases.append(Case(user_name=pseudonym(f"ced\x00{uid}", salt), weibo=own, history=hist,
                                 sentiment=next(labels), history_is_selected=False))
        events.append(ev)
    for ev, (_, crowd) in zip(events, kept):
        if crowd:
            tally = Counter(next(labels) for _ in crowd)
            ev.crowd = {c: int(tally.get(c, 0)) for c in DEFAULT_LABELS}
    sizes = [sum(ev.crowd.values()) for ev in events if ev.crowd]
    crowd_info = {"crowd_cap": crowd_cap, "min_crowd": min_crowd if crowd_cap else 0,
                  "events_with_crowd": len(sizes), "crowd_responses": int(sum(sizes)),
                  "crowd_size_median": float(np.median(sizes)) if sizes else 0.0}
    return SourceEvents(finish(events, root), source="ced", records=records, events_read=len(originals),
                        events=len(events), cases=sum(len(e.cases) for e in events), silver_labels=True,
                        labeller=getattr(labeller, "name", type(labeller).__name__),
                        label_source=getattr(labeller, "source", type(labeller).__name__), labels=list(DEFAULT_LABELS),
                        **crowd_info, skipped=counts(skipped))
