"""Local lm-eval datasets, built reproducibly from the embedded evaluation texts (no hub; seeded where random).

LAMBADA-style last-word prediction (Paperno et al. 2016 format, as lm-eval's `lambada_openai` scores it): each
document is one passage whose final word is the target; the model scores " <word>" after the rest of the passage.
Passages are consecutive, non-overlapping runs of whole lines of the split's text, at least MIN_WORDS words long,
ending at the first line end after that whose last word (trailing punctuation removed) is a plain word of 3+ letters
that is not all capitals (Milton sets proper names in capitals; Shakespeare's stage directions are bracketed).
Whitespace inside a passage is collapsed to single spaces, so `text.split(' ')` gives its words.
Unlike LAMBADA, nothing filters passages for "needs the broad context": these are easier and harder in other ways;
the task names say `_local` so no result reads as LAMBADA.

Four-way multiple choice (lm-eval `output_type: multiple_choice`, scored like piqa/hellaswag: the choice with the
highest log-likelihood after the context, `acc`, and per byte, `acc_norm`), built with a seeded generator so the
same text always gives the same items, the answer's position drawn uniformly (chance = 25%):
- `next_line_milton_mc4`: context = four consecutive verse lines of Paradise Lost that stop mid-sentence; choices =
  the true next line and three other lines of the same poem within 15% of its length (line length is no clue).
- `word_choice_shakespeare_mc4`: context = the previous lines of the held-out tragedies and the current line up to a
  lowercase word of 4+ letters; choices = that word and three words of the nearest corpus frequencies (word
  frequency is no clue), each followed by the rest of the line, so the right context counts too.
Items come from evaluation splits only (harness/corpus.py roles; `_eval_text` refuses a calibration split).

The JSONL goes to the cache, keyed by the source text's sha256 and the task's builder version:
    python -m eval.tasks.build          # writes every local task's JSONL and prints its path, size and sha256
The task YAML next to this file loads it through `custom_dataset: !function build.<task>`.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

# lm-eval imports this file by path (for `!function`); make the repository importable when run from elsewhere
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from harness.assets import atomic_file, cache_dir  # noqa: E402
from harness.corpus import EMBEDDED_SPLITS  # noqa: E402
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
    "next_line_milton_mc4": "milton",
    "word_choice_shakespeare_mc4": "shakespeare_heldout",
}
MC_ITEMS = 500  # items per multiple-choice task
MC_SEED = 0


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


_VERSE_WORDS = (4, 14)  # words of a line that counts as a verse line (not a heading, not a fragment)


def _verse_line(line: str) -> bool:
    words = line.split()
    return _VERSE_WORDS[0] <= len(words) <= _VERSE_WORDS[1] and not line.isupper() and not line.startswith("[")


def next_line_items(text: str, n_items: int = MC_ITEMS, seed: int = MC_SEED, context_lines: int = 4,
                    length_tol: float = 0.15) -> list[dict]:
    """The true next line among four lines of the same text; see the module docstring."""
    lines = [ln.strip() for ln in text.split("\n")]
    pool = sorted({ln for ln in lines if _verse_line(ln)})
    by_len = sorted(pool, key=lambda ln: (len(ln), ln))
    lens = [len(ln) for ln in by_len]
    # items where the context stops mid-sentence (no . ; : ! ? at the end of its last line): the next line must
    # continue that sentence, which a language model can check; after a full stop any line could follow
    eligible = [i for i in range(context_lines, len(lines))
                if all(_verse_line(ln) for ln in lines[i - context_lines : i + 1])
                and lines[i - 1].rstrip()[-1:] not in ".;:!?"]
    rng = random.Random(seed)
    items = []
    for i in sorted(rng.sample(eligible, min(n_items, len(eligible)))):
        true = lines[i]
        lo, hi = bisect.bisect_left(lens, len(true) * (1 - length_tol)), bisect.bisect_right(lens, len(true) * (1 + length_tol))
        near = [ln for ln in by_len[lo:hi] if ln != true and ln not in lines[i - context_lines : i]]
        choices = rng.sample(near, 3)
        label = rng.randrange(4)
        choices.insert(label, true)
        items.append({"id": len(items), "line": i, "context": "\n".join(lines[i - context_lines : i]),
                      "choices": choices, "label": label})
    return items


_WORD = re.compile(r"([a-z]{4,})([,.;:!?'\-]*)")


def word_choice_items(text: str, n_items: int = MC_ITEMS, seed: int = MC_SEED, context_lines: int = 3,
                      neighbours: int = 10, min_count: int = 3) -> list[dict]:
    """The right word among four of similar corpus frequency; see the module docstring."""
    lines = [ln.strip() for ln in text.split("\n")]
    # words as the text sets them in lower case (names and speaker prefixes are capitalised: never candidates)
    counts = Counter(re.findall(r"(?<![A-Za-z])[a-z]{4,}(?![A-Za-z])", text))
    # ties in count in a fixed pseudo-random order (alphabetical order would give neighbours one shared prefix)
    vocab = sorted((w for w, c in counts.items() if c >= min_count),
                   key=lambda w: (-counts[w], hashlib.sha256(w.encode()).hexdigest()))
    rank = {w: r for r, w in enumerate(vocab)}
    slots = []  # (line index, word index) of lowercase words with enough corpus frequency, not the first two words
    for i, ln in enumerate(lines):
        words = ln.split()
        if i < context_lines or len(words) < 6 or not _verse_line(ln):
            continue
        for j, w in enumerate(words[2:], start=2):
            m = _WORD.fullmatch(w)
            if m and m.group(1) in rank:
                slots.append((i, j))
    rng = random.Random(seed)
    by_line: dict[int, list[int]] = {}
    for i, j in slots:
        by_line.setdefault(i, []).append(j)
    items = []
    for i in sorted(rng.sample(sorted(by_line), min(n_items, len(by_line)))):
        words = lines[i].split()
        j = rng.choice(by_line[i])
        m = _WORD.fullmatch(words[j])
        target, punct = m.group(1), m.group(2)
        r = rank[target]
        near = [w for w in vocab[max(0, r - neighbours) : r + neighbours + 1] if w != target]
        cands = rng.sample(near, 3)
        label = rng.randrange(4)
        cands.insert(label, target)
        rest = " ".join(words[j + 1 :])
        choices = [f"{c}{punct}" + (f" {rest}" if rest else "") for c in cands]
        context = "\n".join([ln for ln in lines[i - context_lines : i] if ln] + [" ".join(words[:j])])
        items.append({"id": len(items), "line": i, "context": context, "choices": choices, "label": label})
    return items


# task -> (version of its builder, rows of its JSONL from the source text)
BUILDERS = {
    "lambada_milton_local": (BUILDER_VERSION, lambda t: [{"id": i, "text": p} for i, p in enumerate(last_word_passages(t))]),
    "lambada_shakespeare_heldout_local": (BUILDER_VERSION,
                                          lambda t: [{"id": i, "text": p} for i, p in enumerate(last_word_passages(t))]),
    "next_line_milton_mc4": (2, next_line_items),
    "word_choice_shakespeare_mc4": (1, word_choice_items),
}
DESCRIPTIONS = {
    "lambada_milton_local": "LAMBADA-style",
    "lambada_shakespeare_heldout_local": "LAMBADA-style",
    "next_line_milton_mc4": "4-way multiple choice: the true next line",
    "word_choice_shakespeare_mc4": "4-way multiple choice: the right word among words of similar frequency",
}


def _eval_text(task: str) -> str:
    """The source text of a task: an embedded evaluation split, never calibration text."""
    split = LOCAL_SOURCES[task]
    if EMBEDDED_SPLITS[split][1] != "evaluation":
        raise ValueError(f"local task {task!r}: split {split!r} is a {EMBEDDED_SPLITS[split][1]} split, not evaluation")
    return load_text(split)


def jsonl_path(task: str) -> Path:
    """Build the task's JSONL once (atomically) and return its path."""
    text = _eval_text(task)
    version, build = BUILDERS[task]
    path = cache_dir() / "tasks" / f"{task}-{text_sha256(text)[:16]}-v{version}.jsonl"
    if not path.exists():
        with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for row in build(text):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def manifest(task: str) -> dict:
    """What a record needs to name the data exactly."""
    path = jsonl_path(task)
    data = path.read_bytes()
    return {"source_split": LOCAL_SOURCES[task], "n_docs": data.count(b"\n"), "builder_version": BUILDERS[task][0],
            "jsonl_sha256": hashlib.sha256(data).hexdigest()[:16], "jsonl": str(path)}


def _loader(task: str):
    def load(**_kwargs):
        import datasets

        import pyarrow as pa

        data = jsonl_path(task).read_bytes()
        rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line]
        # the dataset's fingerprint is the file's content hash: `Dataset.from_list` would pickle the arrow schema to
        # make one, which fails under Python 3.12 with pyarrow 26 (PicklingError on MonthDayNano; seen on the GPU)
        table = pa.Table.from_pylist(rows)
        fingerprint = hashlib.sha256(data).hexdigest()[:16]
        return datasets.DatasetDict({"test": datasets.Dataset(table, fingerprint=fingerprint)})

    load.__name__ = task
    return load


lambada_milton_local = _loader("lambada_milton_local")
lambada_shakespeare_heldout_local = _loader("lambada_shakespeare_heldout_local")
next_line_milton_mc4 = _loader("next_line_milton_mc4")
word_choice_shakespeare_mc4 = _loader("word_choice_shakespeare_mc4")


if __name__ == "__main__":
    for name in LOCAL_SOURCES:
        m = manifest(name)
        print(f"{name}: {m['n_docs']} documents from {m['source_split']}, sha256 {m['jsonl_sha256']}, {m['jsonl']}")
