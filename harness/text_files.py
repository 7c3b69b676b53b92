"""Local text files as text sources: `file:<path>` wherever a split or calibration source is named
(`data.splits=[file:notes.txt]`, `quant.calib.dataset=file:docs.jsonl`).

Plain text (any extension but .jsonl) is read as UTF-8; `.jsonl` holds one JSON object per line with a string
field `text`, and the texts are joined with blank lines (as the hub sources join documents). A missing or empty
file, a JSONL line that is not JSON or has no `text`, bytes that are not UTF-8 or a text of control characters (NUL
bytes: check_is_text) fail with one line naming the file, before any model loads.
A run is identified by the file's content, not its path (harness.data.source_identity).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from harness.config import ConfigError, user_error

FILE_PREFIX = "file:"
JSONL_FIELD = "text"


def is_file_source(name: str) -> bool:
    return isinstance(name, str) and name.startswith(FILE_PREFIX)


# control characters that are not layout (tab, newline, carriage return, form feed, vertical tab are): NUL, escape,
# DEL, C1 controls, ... A text where they pass this share is a binary file or a broken decode, not text
CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
MAX_CONTROL_SHARE = 0.01


def check_is_text(text: str, source: str) -> None:
    """A ConfigError in one line when control characters (NUL, ...) make up more than MAX_CONTROL_SHARE of `text`, or
    it holds no letter or digit at all: its PPL would be recorded as a text's (a file of NUL bytes scores 1.4e9)."""
    n = len(CONTROL.findall(text))
    if n > MAX_CONTROL_SHARE * len(text) or not any(c.isalnum() for c in text):
        first = CONTROL.search(text)
        what = (f"{n} of {len(text)} characters are control characters (first: {ord(first.group()):#04x} at "
                f"character {first.start()})" if first else f"no letter or digit in its {len(text)} characters")
        raise user_error("text source", source, f"not text: {what}; at most {MAX_CONTROL_SHARE:.0%} may be control "
                         f"characters", "give a UTF-8 text file (.txt) or JSONL with a string field "
                         f"{JSONL_FIELD!r}; a binary file is never scored")


def read_text_file(path: str | Path) -> str:
    """The text of a local file (see the module docstring), or a ConfigError in one line."""
    p = Path(path).expanduser()
    where = f"text source {FILE_PREFIX}{path}"
    if not p.is_file():
        raise ConfigError(f"{where}: no such file")
    try:
        raw = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text (byte {e.start})") from None
    raw = raw.replace("\r\n", "\n")
    if p.suffix.lower() == ".jsonl":
        parts = []
        for i, line in enumerate(raw.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: line {i} is not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(JSONL_FIELD), str):
                raise ConfigError(f"{where}: line {i} has no string field {JSONL_FIELD!r}")
            parts.append(obj[JSONL_FIELD])
        text = "\n\n".join(parts)
    else:
        text = raw
    if not text.strip():
        raise ConfigError(f"{where}: is empty")
    check_is_text(text, f"{FILE_PREFIX}{path}")
    return text
