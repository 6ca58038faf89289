"""One-line user errors and the CLI wrapper that prints them.

A user who points a CLI at a bad file needs to know which file, which record and which
field, not a traceback through our internals. Every module that validates user input
raises `UserError` (or a subclass) with such a message; `cli_main` turns it into
`error: <message>` on stderr and exit status 2. Programming errors keep their traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn, Sequence

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user: message names the file, record (index) and field."""


def is_user_error(exc: BaseException) -> bool:
    """UserError, or a data-validation error from a module that does not import this one.

    Modules written independently may define their own `DataError`/`ConfigError`; anything
    whose class (or a base) is named like that, or sets `user_error = True`, is also a
    user error, so the CLIs agree on one behaviour without a shared import.
    """
    if isinstance(exc, UserError) or getattr(exc, "user_error", False):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"DataError", "ConfigError", "CheckpointError", "AdapterError"})


def one_line(message: object) -> str:
    """Collapse a message to one line so log scrapers and humans see it whole."""
    return " ".join(str(message).split())


def cli_main(fn: Callable[..., int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run `fn(argv)` and exit; user errors become one stderr line and exit status 2."""
    try:
        code = fn(argv) if argv is not None else fn()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - only user errors are caught, others re-raise
        if not is_user_error(exc):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(int(code or 0))
