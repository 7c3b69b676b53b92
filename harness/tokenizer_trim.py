"""A byte-level BPE tokenizer cut down to its first N ids, so that its every id has a row in a smaller vocabulary.

A synthetic checkpoint at Llama-2's shape has 32,000 embedding rows; the embedded SmolLM2 tokenizer makes ids up to
49,151, so free text through it could index past the table (harness.synthetic.check_tokenizer_fits refuses it). Its
BPE vocabulary is ordered by merge rank, so keeping the ids below N (and only the merges whose two parts and result
all survive) leaves a smaller tokenizer of the same kind: every byte is still a base token, so any text encodes; the
special tokens (ids 0-16) stay. The text it makes from random weights is noise either way: this only lets a
chat request reach such a model (app.serve) with ids it can look up.

    python -m harness.tokenizer_trim .device/tokenizers/smollm2-135m-instruct .device/tokenizers/smollm2-32k --vocab 32000
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def trim_tokenizer_json(tok: dict, vocab_size: int) -> dict:
    """tokenizer.json (a dict) with ids >= vocab_size and the merges that need them removed."""
    model = tok["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only BPE tokenizers can be trimmed, got {model.get('type')!r}")
    if any(a["id"] >= vocab_size for a in tok.get("added_tokens", [])):
        raise ValueError(f"an added (special) token has an id >= {vocab_size}")
    vocab = {t: i for t, i in model["vocab"].items() if i < vocab_size}
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError("the kept ids are not contiguous from 0")
    merges = []
    for m in model["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    out = dict(tok)
    out["model"] = {**model, "vocab": vocab, "merges": merges}
    return out


def trim(src: Path, dst: Path, vocab_size: int) -> int:
    """Copy the tokenizer files of `src` to `dst`, tokenizer.json trimmed; returns the new tokenizer's length."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "tokenizer.json":
            shutil.copy(f, dst / f.name)
    tok = json.loads((src / "tokenizer.json").read_text())
    (dst / "tokenizer.json").write_text(json.dumps(trim_tokenizer_json(tok, vocab_size), ensure_ascii=False))
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(str(dst)))
    if n > vocab_size:
        raise ValueError(f"trimmed tokenizer still has {n} ids")
    return n


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args(argv)
    print(f"{a.dst}: {trim(Path(a.src), Path(a.dst), a.vocab)} ids")


if __name__ == "__main__":
    main(sys.argv[1:])
