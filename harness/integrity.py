"""Tensor files the harness writes and later reads back as truth (block checkpoints, quantized-weight cache entries)
carry the sha256 of their bytes, which the caller records in the JSON sidecar it writes after them; a reader hashes the
bytes once and loads them only when they are the recorded ones (issue 27: a checkpoint with one low mantissa bit
flipped resumed silently, and its weights went on into the cache). The cost is one sha256 pass over the file on each
write and each read (about 0.2 s per 256 MiB here), against a load that reads the same bytes anyway."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from harness.assets import atomic_file


class IntegrityError(ValueError):
    """A file is not the one its sidecar describes: no recorded sha256, other bytes, or replaced while read."""


def _sha256_open(f) -> str:
    return hashlib.file_digest(f, "sha256").hexdigest()


def save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> str:
    """Write `tensors` as a safetensors file at `path` atomically (a temp file renamed into place); the sha256 of the
    bytes written, hashed from the temp file before the rename, for the sidecar the caller writes next."""
    from safetensors.torch import save_file

    with atomic_file(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            return _sha256_open(f)


def load_tensors(path: Path, sha256) -> dict:
    """The tensors of the safetensors file at `path` when its bytes have the sha256 its sidecar recorded;
    IntegrityError (a ValueError) when none is recorded, the bytes differ, or the file was replaced meanwhile;
    OSError when it cannot be read."""
    from safetensors.torch import load_file

    if not (isinstance(sha256, str) and len(sha256) == 64):
        raise IntegrityError("its sidecar records no sha256 of its bytes (written by an older harness?)")
    with open(path, "rb") as f:
        inode = os.fstat(f.fileno()).st_ino
        got = _sha256_open(f)
    if got != sha256:
        raise IntegrityError(f"its bytes have sha256 {got[:16]}..., its sidecar recorded {sha256[:16]}... "
                             "(changed or damaged since it was written)")
    tensors = load_file(str(path))
    if os.stat(path).st_ino != inode:  # another writer renamed a new file in between: not the bytes hashed
        raise IntegrityError("replaced by another writer while it was read")
    return tensors
