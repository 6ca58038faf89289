"""The crowd to predict for: users written by hand (USERS.jsonl, a request body) or drawn from a built dataset.

A user is what the prompt needs and nothing more: a name, the posts to pick history from
and an optional persona. There is no response and no label (the event has not happened
yet), so the training reader (`records.read_event_file`, which requires `weibo`) is not used;
history items are parsed by the same function it uses, so "posts as in the event format"
means exactly that. Every problem is one `UsersError` line naming the file (or request),
the line and the field.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from socialalign_jax.core.errors import UserError
from socialalign_jax.core.jsonl import iter_jsonl, read_jsonl_text
from socialalign_jax.data import tfds_builders as B
from socialalign_jax.data.records import Case, DataError, Event, HistoryPost, _read_history
from socialalign_jax.runs.restore import load_run_config

# Keys of a case in the event format that a users line may carry and that prediction ignores
# (so a case copied out of an event file is a valid user line).
IGNORED_KEYS = frozenset({"weibo", "sentiment", "user_level", "gender", "ip", "history_is_selected"})
USER_KEYS = ("user_name", "history", "user_persona")


class UsersError(UserError, ValueError):
    """A malformed user: `{source}: line {n}: field '{field}': {what}` on one line."""


@dataclasses.dataclass(frozen=True)
class User:
    """One member of the crowd. `history` is the user's posts (BM25 picks the prompt's few)."""

    user_name: str
    history: tuple[HistoryPost, ...] = ()
    persona: str | None = None

    def to_json(self) -> dict:
        posts = []
        for p in self.history:
            d: dict[str, Any] = {"text": p.text}
            if p.retweet is not None:
                d["retweet"] = {"text": p.retweet}
            if p.topics:
                d["topics"] = list(p.topics)
            posts.append(d)
        out: dict[str, Any] = {"user_name": self.user_name, "history": posts}
        if self.persona:
            out["user_persona"] = self.persona
        return out


def _where(source: str, line: int | None, kind: str) -> str:
    return source if line is None else f"{source}: {kind} {line}"


def parse_user(obj: Any, source: str, line: int | None = None, *, kind: str = "line") -> User:
    """One user from its JSON object; `source`/`line` only name it in errors (`kind`: 'line' or 'users[i]')."""
    where = _where(source, line, kind)
    if not isinstance(obj, dict):
        raise UsersError(f"{where}: expected a JSON object {{\"user_name\": ..., \"history\": [...]}}, "
                         f"got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(USER_KEYS) - IGNORED_KEYS)
    if unknown:
        raise UsersError(f"{where}: field '{unknown[0]}': unknown field (a user has {', '.join(USER_KEYS)})")
    name = obj.get("user_name")
    if not isinstance(name, str) or not name.strip():
        what = "missing" if name is None else ("empty string" if isinstance(name, str)
                                               else f"expected a string, got {type(name).__name__}")
        raise UsersError(f"{where}: field 'user_name': {what}")
    history = obj.get("history", [])
    if not isinstance(history, list):
        raise UsersError(f"{where}: field 'history': expected a list of posts, got {type(history).__name__}")
    try:
        posts = _read_history(Path(source), 0, history)
    except DataError as e:  # the event format's own parser; re-worded to name the line
        raise UsersError(f"{where}: field '{e.field}': {e.what}") from None
    persona = obj.get("user_persona")
    if persona is not None and not isinstance(persona, str):
        raise UsersError(f"{where}: field 'user_persona': expected a string, got {type(persona).__name__}")
    return User(name, tuple(posts), persona or None)


def check_unique(users: Sequence[User], source: str, lines: Sequence[int] | None = None, kind: str = "line") -> None:
    """Results are keyed by user name, so two users with one name are a mistake in the crowd."""
    seen: dict[str, int] = {}
    for i, u in enumerate(users):
        n = lines[i] if lines is not None else i
        if u.user_name in seen:
            raise UsersError(f"{_where(source, n, kind)}: field 'user_name': {u.user_name!r} repeats "
                             f"{kind} {seen[u.user_name]}")
        seen[u.user_name] = n


def read_users(path: str | os.PathLike) -> list[User]:
    """USERS.jsonl: one user per line (blank lines allowed); line numbers in errors count from 1."""
    path = Path(path)
    if path.is_dir():
        raise UsersError(f"{path}: is a directory, expected a users .jsonl file")
    return parse_users_jsonl(read_jsonl_text(path, UsersError, "users file"), str(path))


def parse_users_jsonl(text: str, source: str) -> list[User]:
    """The body of a users .jsonl file (also what the web page uploads)."""
    users, lines = [], []
    for n, obj in iter_jsonl(text.splitlines(), source, UsersError):
        users.append(parse_user(obj, source, n))
        lines.append(n)
    if not users:
        raise UsersError(f"{source}: no users (expected one JSON object per line)")
    check_unique(users, source, lines)
    return users


def parse_users_list(items: Any, source: str = "request") -> list[User]:
    """A JSON list of user objects (the web API's "users")."""
    if not isinstance(items, list):
        raise UsersError(f"{source}: field 'users': expected a list of user objects, got {type(items).__name__}")
    if not items:
        raise UsersError(f"{source}: field 'users': empty list")
    users = [parse_user(obj, f"{source}: users[{i}]", None) for i, obj in enumerate(items)]
    check_unique(users, f"{source}: users", list(range(len(users))), kind="index")
    return users


def as_users(users: Iterable[User | Mapping[str, Any]], source: str = "users") -> list[User]:
    """Accept User objects or their JSON dicts (notebook convenience); dicts are validated."""
    out = [u if isinstance(u, User) else parse_user(u, f"{source}[{i}]", None) for i, u in enumerate(users)]
    check_unique(out, source, list(range(len(out))), kind="index")
    return out


# ----------------------------------------------------------------------------- a crowd from data


def dataset_users(dataset_dir: str | os.PathLike) -> list[User]:
    """Every distinct user of a built dataset, with the history and persona of their first case.

    The built dataset holds token ids, not the users' posts, so the raw input it was built from
    (recorded in its metadata) is read again with the same reader; each user's timeline is kept
    whole, since BM25 picks the history against the *new* news. Alpaca records whose prompt did
    not parse into fields carry no user and are left out.
    """

    try:
        ds = B.open_dataset(_dataset_dir(dataset_dir))
    except DataError as e:
        raise UsersError(f"--users_from {dataset_dir}: {e}") from None
    conf = dict(ds.metadata.get("config") or {})
    if conf.get("source") == "lamp":
        raise UsersError(f"{ds.path}: a LaMP dataset has no Weibo users; --users_from needs a Weibo-style dataset")
    raw = conf.get("input")
    if not raw or not Path(raw).exists():
        raise UsersError(f"{ds.path}: the raw input it was built from ({raw!r}) is not there any more; "
                         "--users_from needs it to read the users' posts")
    fields = {f.name for f in dataclasses.fields(B.SocialConfig)}
    cfg = B.SocialConfig(name="users", **{k: v for k, v in conf.items() if k in fields and k != "name"})
    events: list[Event] = B.read_source(cfg)
    users: dict[str, User] = {}
    for ev in events:
        for case in ev.cases:
            if case.raw_prompt is not None or not case.user_name or case.user_name in users:
                continue
            users[case.user_name] = _user_of(case)
    if not users:
        raise UsersError(f"{ds.path}: no users with a name in {raw}")
    return list(users.values())


def _dataset_dir(path: str | os.PathLike) -> str:
    """A built dataset directory, or a training run's directory (its config names the dataset it used)."""
    if (Path(path) / "config.json").is_file() and (Path(path) / "checkpoints").is_dir():
        data_dir = load_run_config(os.fspath(path)).data.data_dir
        return data_dir or os.path.join(os.fspath(path), "data")
    return os.fspath(path)


def _user_of(case: Case) -> User:
    return User(case.user_name, tuple(case.history), case.persona)


def sample_users(pool: Sequence[User], num_users: int, seed: int, source: str) -> list[User]:
    """`num_users` distinct users drawn without replacement (numpy default_rng(seed)), in pool order."""
    if num_users < 1:
        raise UsersError(f"{source}: the number of users must be >= 1, got {num_users}")
    if num_users > len(pool):
        raise UsersError(f"{source}: has {len(pool)} users, {num_users} were asked for")
    idx = np.sort(np.random.default_rng(seed).choice(len(pool), size=num_users, replace=False))
    return [pool[int(i)] for i in idx]


def prompt_case(user: User) -> Case:
    """The prompt builder's Case for a user who has not responded yet.

    `weibo=""`: there is no response yet (the prompt builder's prompt-only convention); BM25
    picks the history against the news from the user's whole timeline, as in training.
    """
    return Case(user_name=user.user_name, weibo="", history=list(user.history), persona=user.persona,
                history_is_selected=False)
