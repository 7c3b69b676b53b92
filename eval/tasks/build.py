"""Local lm-eval datasets, built reproducibly from the embedded evaluation texts (no hub, no randomness).

LAMBADA-style last-word prediction (Paperno et al. 2016 format, as lm-eval's `lambada_openai` scores it): each
document is one passage whose final word is the target; the model scores " <word>" after the rest of the passage.
Passages are consecutive, non-overlapping runs of whole lines of the split's text, at least MIN_WORDS words long,
ending at the first line end after that whose last word (trailing punctuation removed) is a plain word of 3+ letters
that is not all capitals (Milton sets proper names in capitals; Shakespeare's stage directions are bracketed).
Whitespace inside a passage is collapsed to single spaces, so `text.split(' ')` gives its words.
Unlike LAMBADA, nothing filters passages for "needs the broad context": these are easier and harder in other ways;
the task names say `_local` so no result reads as LAMBADA.

The JSONL goes to the cache, keyed by the source text's sha256 and BUILDER_VERSION:
    python -m eval.tasks.build          # writes every local task's JSONL and prints its path, size and sha256
The task YAML next to this file loads it through `custom_dataset: !function build.<task>`.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

# lm-eval imports this file by path (for `!function`); make the repository importable when run from elsewhere
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from harness.assets import atomic_file, cache_dir  # noqa: E402
from harness.data import load_text, text_sha256  # noqa: E402

BUILDER_VERSION = 1
MIN_WORDS = 60
MAX_WORDS = 200  # a run that finds no valid last word by then is dropped
_TRAILING = ".,;:!?'\"()[]-_"
_TARGET = re.compile(r"[A-Za-z]{3,}")

# local task name -> embedded evaluation split it is built from (the YAML files carry the same names)
LOCAL_SOURCES = {
    "lambada_milton_local": "milton",
    "lambada_shakespeare_heldout_local": "shakespeare_heldout",
}


def last_word_passages(text: str, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> list[str]:
    passages, cur = [], []
    for line in text.split("\n"):
        words = line.split()
        if not words:
            continue
        cur.extend(words)
        if len(cur) > max_words:
            cur = []
            continue
        if len(cur) < min_words:
            continue
        last = cur[-1].rstrip(_TRAILING)
        if _TARGET.fullmatch(last) and not last.isupper():
            passages.append(" ".join(cur[:-1] + [last]))
            cur = []
    return passages


def jsonl_path(task: str) -> Path:
    """Build the task's JSONL once (atomically) and return its path."""
    text = load_text(LOCAL_SOURCES[task])
    path = cache_dir() / "tasks" / f"{task}-{text_sha256(text)[:16]}-v{BUILDER_VERSION}.jsonl"
    if not path.exists():
        with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for i, p in enumerate(last_word_passages(text)):
                f.write(json.dumps({"id": i, "text": p}, ensure_ascii=False) + "\n")
    return path


def manifest(task: str) -> dict:
    """What a record needs to name the data exactly."""
    path = jsonl_path(task)
    data = path.read_bytes()
    return {"source_split": LOCAL_SOURCES[task], "n_docs": data.count(b"\n"), "builder_version": BUILDER_VERSION,
            "jsonl_sha256": hashlib.sha256(data).hexdigest()[:16], "jsonl": str(path)}


def _loader(task: str):
    def load(**_kwargs):
        import datasets

        with open(jsonl_path(task), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

    load.__name__ = task
    return load


lambada_milton_local = _loader("lambada_milton_local")
lambada_shakespeare_heldout_local = _loader("lambada_shakespeare_heldout_local")


if __name__ == "__main__":
    for name in LOCAL_SOURCES:
        m = manifest(name)
        print(f"{name}: {m['n_docs']} passages from {m['source_split']}, sha256 {m['jsonl_sha256']}, {m['jsonl']}")
