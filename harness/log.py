"""Progress lines on stderr, one tagged line each (`[run] loading ...`), flushed at once so a log tail or a killed
job's output shows where it was."""
from __future__ import annotations

import sys
from typing import Callable


def logger(tag: str) -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"[{tag}] {msg}", file=sys.stderr, flush=True)

    return log
