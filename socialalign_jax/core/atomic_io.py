"""Atomic output files: a unique temporary file in the target directory, fsync, rename.

A crash, a kill or a full disk never leaves a half-written file under the final name: readers
see the old file or the new one. The temporary name is unique (two writers of one path never
share it), lives in the target directory (so the rename never crosses a filesystem), and the
result gets the mode a plain `open(path, "w")` would give (0666 minus the user's umask), not
mkstemp's 0600. A write that fails is one UserError line naming the path; a full disk also
says how much space the file needed.

One implementation for every CLI (predictions, scores, personas, run summaries, reports,
metric logs, the saved tokenizer); `atomic_dir` publishes a directory the same way.
`os_error` recognises the same failures when a library reports them in its own exception
type (the Rust tokenizers, array_record, TensorStore), and `output_name` keeps a name the
user gives (a dataset, a plan row) from becoming a path outside the output directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterable, Iterator

from socialalign_jax.core.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """What open(path, 'w') would create: 0666 minus the process umask."""
    return 0o666 & ~_umask()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def write_error(path: str | os.PathLike, e: OSError, needed: int | None = None,
                left: str = "nothing partial was left under that name") -> UserError:
    """The one-line UserError for a failed write of `path` (ENOSPC: with the space it needed and
    `left`, what the failure left behind)."""
    path = os.fspath(path)
    if e.errno == errno.ENOSPC:
        size = f"; it needs about {_human(needed)}" if needed else ""
        return UserError(f"{path}: no space left on device{size}; free some space and rerun ({left})")
    return UserError(f"{path}: cannot write output ({e.strerror or e})")


# How libraries that do their own I/O report an errno: the Rust standard library ("No space
# left on device (os error 28)", the tokenizers), TensorStore ("[os_error_code='28']") and
# array_record ("write() failed: No space left on device").
_OS_ERROR_CODE = re.compile(r"os[ _]error(?:_code)?[ =]'?(\d+)")
_ERRNO_TEXT = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
               errno.EFBIG: "File too large", errno.EROFS: "Read-only file system",
               errno.EACCES: "Permission denied"}


def os_error(exc: BaseException | None) -> OSError | None:
    """The OSError behind `exc`: itself, one in its cause/context chain, or one a library (which
    raises its own exception types) reports only in its message. None when it is none of those."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        text = str(exc)
        m = _OS_ERROR_CODE.search(text)
        code = int(m.group(1)) if m else next((c for c, t in _ERRNO_TEXT.items() if t.lower() in text.lower()), None)
        if code is not None:
            return OSError(code, os.strerror(code))
        exc = exc.__cause__ or exc.__context__
    return None


_BAD_NAME = re.compile(r"[/\\\x00-\x1f]")


def output_name(name: str, what: str) -> str:
    """`name` when it is one plain path component (it becomes a directory below an output
    directory); else one UserError line naming `what` (the flag or field that gave it)."""
    if (not isinstance(name, str) or not name.strip() or name in (".", "..") or _BAD_NAME.search(name)
            or name != name.strip() or len(name.encode("utf-8")) > 200):
        raise UserError(f"{what}: {name!r} is not a usable name: it becomes a directory name, so it must be "
                        "1-200 bytes without '/', '\\', control characters or surrounding spaces, and not '.' "
                        "or '..'")
    return name


class _CountingWriter:
    """Text file wrapper that counts encoded bytes, so a full disk can say how much was needed."""

    def __init__(self, f):
        self._f = f
        self.bytes = 0

    def write(self, s: str) -> int:
        self.bytes += len(s.encode("utf-8", "surrogatepass"))
        return self._f.write(s)

    def __getattr__(self, name):
        return getattr(self._f, name)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any], *, binary: bool = False,
                 expected_size: int | None = None) -> Any:
    """Run `write(f)` on a temporary file beside `path`, then fsync and rename it to `path`.

    Returns what `write` returns. Any OSError (including one raised by `write`) becomes one
    UserError line naming `path`; the temporary file is removed and `path` is left as it was.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory; expected a file name")
    tmp = None
    counter = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            counter = f if binary else _CountingWriter(f)
            out = write(counter)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(directory)
        return out
    except OSError as e:
        written = getattr(counter, "bytes", None)
        raise write_error(path, e, expected_size or written) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), expected_size=len(text.encode("utf-8", "surrogatepass")))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), binary=True, expected_size=len(data))


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> int:
    """UTF-8 JSONL, one record per line; returns the number of records."""
    def write(f):
        n = 0
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
        return n
    return atomic_write(path, write)


def write_json(obj: Any, path: str | os.PathLike, indent: int | None = 1, *, sort_keys: bool = False) -> None:
    text = json.dumps(obj, ensure_ascii=False, indent=indent, sort_keys=sort_keys, default=_json_default) + "\n"
    write_text(path, text)


def _json_default(o):
    """numpy scalars and arrays (metrics dicts) as plain JSON numbers and lists."""
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _fsync_files(directory: str) -> list[str]:
    """fsync every plain file directly in `directory`; returns their names, sorted."""
    names = sorted(n for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n)))
    for name in names:
        with open(os.path.join(directory, name), "rb") as fh:
            os.fsync(fh.fileno())
    return names


def write_failure(path: str, e: Exception, needed: int | Callable[[], int] | None) -> UserError:
    """write_error for what a writer library raised, when it is an OS error at heart; else re-raise `e`."""
    err = None if isinstance(e, UserError) else os_error(e)
    if err is None:
        raise e
    if callable(needed):
        needed = needed() if err.errno == errno.ENOSPC else None
    return write_error(path, err, needed)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, needed: int | Callable[[], int] | None = None) -> Iterator[str]:
    """Yield a temporary directory beside `path`; on success it is renamed to `path` (which must not exist).

    For writers that produce several files (a tokenizer's save_pretrained): either the whole
    directory appears under its name or nothing does. On failure the temporary is removed; a
    failed write, also one a library reports in its own exception type (os_error), is one
    UserError line naming `path`, and on a full disk the space `needed` (bytes, or a function
    computing them only then).
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        _fsync_files(tmp)
        os.rename(tmp, path)
        tmp = None
        _fsync_dir(parent)
    except Exception as e:  # noqa: BLE001 - write_failure re-raises what is not an OS error
        raise write_failure(path, e, needed) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_files_into(directory: str | os.PathLike, *,
                      needed: int | Callable[[], int] | None = None) -> Iterator[str]:
    """Yield a temporary directory inside `directory`; on success each file written there is
    fsynced and renamed into `directory` (replacing a file of that name).

    For multi-file writers into a directory that already holds other outputs (a tokenizer's
    save_pretrained beside merged weights): a crash or a full disk leaves each file either
    whole or as it was, never truncated. On failure the temporary is removed; failures are
    reported as `atomic_dir` reports them.
    """
    directory = os.fspath(directory)
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=directory, prefix=".partial.", suffix=".tmp")
        yield tmp
        names = _fsync_files(tmp)
        if len(names) != len(os.listdir(tmp)):  # a writer that made subdirectories: not files to move
            raise IsADirectoryError(errno.EISDIR, "the writer created a subdirectory", tmp)
        for name in names:
            os.chmod(os.path.join(tmp, name), default_file_mode())
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
        _fsync_dir(directory)
    except Exception as e:  # noqa: BLE001 - write_failure re-raises what is not an OS error
        raise write_failure(directory, e, needed) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


class AppendLog:
    """An append-only JSONL log that survives crashes: a run that resumes at step S keeps only
    the rows of steps <= S (a killed run may have logged steps it never checkpointed) and never
    appends onto a truncated last line. Rows are flushed as written; a full disk is one line."""

    def __init__(self, path: str | os.PathLike, *, keep_through_step: int | None):
        self.path = os.fspath(path)
        if os.path.exists(self.path):
            self._repair(keep_through_step)
        try:
            self._f = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise write_error(self.path, e) from None

    def _repair(self, keep_through_step: int | None) -> None:
        """Drop a partial last line and rows after `keep_through_step` (None: keep every complete row)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise write_error(self.path, e) from None
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # tail: b"" when the file ends with a newline
        kept = []
        for ln in complete:
            if not ln.strip():
                continue
            try:
                row = json.loads(ln)
            except ValueError:
                continue  # an older crash's damaged row
            if keep_through_step is not None and int(row.get("step", 0)) > keep_through_step:
                continue
            kept.append(ln)
        if tail or len(kept) != len([ln for ln in complete if ln.strip()]):
            write_bytes(self.path, b"".join(ln + b"\n" for ln in kept))

    def append(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        try:
            self._f.write(line)
            self._f.flush()
        except OSError as e:
            raise write_error(self.path, e, len(line.encode("utf-8")),
                              left="the rerun drops a row cut short") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()
