"""Atomic output files: written to `<path>.tmp` and renamed, so a failure never leaves half a file.

One implementation for every CLI (predictions, scores, personas, run summaries); a write that
fails is one UserError line naming the path.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from socialalign_jax.errors import UserError


def _atomic(path: str | os.PathLike, write) -> Any:
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            out = write(f)
        os.replace(tmp, path)
        return out
    except OSError as e:
        raise UserError(f"{path}: cannot write output ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> int:
    """UTF-8 JSONL, one record per line; returns the number of records."""
    def write(f):
        n = 0
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
        return n
    return _atomic(path, write)


def write_json(obj: Any, path: str | os.PathLike, indent: int | None = 1) -> None:
    def write(f):
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")
    _atomic(path, write)
