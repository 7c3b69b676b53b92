"""Progress lines on stderr, one tagged line each (`[run] loading ...`), flushed at once so a log tail or a killed
job's output shows where it was."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator


def logger(tag: str) -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"[{tag}] {msg}", file=sys.stderr, flush=True)

    return log


DEBUG_ENV = "HARNESS_DEBUG"


@contextlib.contextmanager
def one_line_errors(*user_errors: type[BaseException]) -> Iterator[None]:
    """A user error (one of `user_errors`: bad config, missing file, unusable input) prints `error: <message>` on one
    line and exits with status 2, without a traceback; HARNESS_DEBUG=1 lets it raise with its traceback."""
    try:
        yield
    except user_errors as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
