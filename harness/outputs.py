"""Output directories the harness writes for the user (an exported checkpoint): never over what it did not write.

A directory goes to a fresh path, or replaces (with --force) only a directory this harness wrote itself, recognised by
the manifest it leaves there (MANIFEST: the harness's name, the run_id, every file it wrote) and holding no file the
manifest does not name; any other existing path (a file, a symlink, a directory of the user's) is refused in one line.
Writability and free room are checked before any model loads, at the nearest existing folder above the output (where
the writer makes its temp sibling, renamed into place at the end: a killed writer leaves nothing at the path)."""
from __future__ import annotations

import json
from pathlib import Path

from harness.assets import probe_write
from harness.config import user_error

MANIFEST = "harness_manifest.json"
HARNESS = "quant-harness"
ROOM_MARGIN_BYTES = 32 << 20  # tokenizer and JSON files beside the weights, and slack for the estimate


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a directory this harness wrote, or None (no manifest, not JSON, another writer's)."""
    try:
        m = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("harness") != HARNESS or not isinstance(m.get("files"), list):
        return None
    return m


def _files(folder: Path) -> list[str]:
    """Every entry under `folder`, as a relative POSIX path (directories by their files; a symlink as itself)."""
    out = []
    for p in sorted(Path(folder).rglob("*")):
        if p.is_symlink() or not p.is_dir():
            out.append(p.relative_to(folder).as_posix())
    return out


def write_manifest(folder: Path, info: dict) -> dict:
    """Write MANIFEST into `folder` (not yet at its final path) naming every file there; returns it."""
    m = {"harness": HARNESS, **info, "files": [f for f in _files(folder) if f != MANIFEST]}
    (Path(folder) / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True, default=str) + "\n")
    return m


def replaceable(field: str, out: Path, force: bool) -> None:
    """Refuse `out` unless it is absent, an empty directory, or (with `force`) a directory this harness wrote that
    holds nothing else."""
    out = Path(out)
    fresh = "choose a path that does not exist yet"
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise user_error(field, out, "exists and is not a directory this harness wrote (a file or a link); nothing "
                         "is written over it", fresh)
    if not out.exists() or not any(out.iterdir()):
        return
    m = read_manifest(out)
    if m is None:
        raise user_error(field, out, f"exists and holds files this harness did not write (no {MANIFEST}); nothing "
                         "in it is replaced", fresh)
    foreign = sorted(set(_files(out)) - set(m["files"]) - {MANIFEST})
    if foreign:
        raise user_error(field, out, f"was written by this harness but now also holds {len(foreign)} file(s) it did "
                         f"not write (first: {foreign[0]}); nothing in it is replaced", f"move them out, or {fresh}")
    if not force:
        raise user_error(field, out, f"exists (written by this harness, run_id {m.get('run_id', '?')})",
                         "add --force to replace it, or choose a new path")


def _existing_ancestor(p: Path) -> Path:
    p = Path(p).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(field: str, out: Path, need_bytes: int = 0) -> int:
    """Fail in one line unless the folder that will hold `out` takes a write with `need_bytes` (+ a margin) free;
    nothing is created. Returns the free bytes."""
    where = _existing_ancestor(Path(out).parent)
    fix = "choose a writable place with room (--out), or free space"
    if not where.is_dir():
        raise user_error(field, out, f"{where} is a file, so no directory can be made under it", fix)
    try:
        free = probe_write(where)
    except OSError as e:
        raise user_error(field, out, f"cannot write {where} ({type(e).__name__}: {e.strerror or e})", fix) from None
    if need_bytes and free < need_bytes + ROOM_MARGIN_BYTES:
        raise user_error(field, out, f"{where} has {free / 2**20:.0f} MiB free; the checkpoint needs about "
                         f"{(need_bytes + ROOM_MARGIN_BYTES) / 2**20:.0f} MiB", fix)
    return free


def check_output_dir(field: str, out: Path, force: bool = False, need_bytes: int = 0) -> None:
    """Both checks: `out` may be written (fresh, or a harness-written directory with --force), and there is room."""
    replaceable(field, out, force)
    check_writable(field, out, need_bytes)
