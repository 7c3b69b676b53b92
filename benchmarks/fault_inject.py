"""Faults injected at the OS-call level into one child process, for the fault-injection suite (benchmarks/faults.py)
where a real full or read-only filesystem cannot be mounted (not root, no CAP_SYS_ADMIN), and kill points inside a
record's atomic write, which no log line can time:

    python -m benchmarks.fault_inject experiments.run quant=rtn_w4 ...     # hooks installed, then the module runs

Environment (each optional; a `dir` covers everything under it):
  QH_FAULT_ENOSPC=dir   writes under dir fail with ENOSPC: open() succeeds, write() fails (as on a full disk), and
                        the C/Rust writers (torch.save, safetensors save_file) fail before writing
  QH_FAULT_EROFS=dir    creating, writing, renaming or removing under dir fails with EROFS (a read-only mount)
  QH_FAULT_WHEN=path    the two faults above hold only while `path` exists (the driver creates it mid-run)
  QH_FAULT_KILL=dir:phase  SIGKILL inside the first atomic write of a `.json` under dir: `open` (temp file created,
                        empty), `write` (half its bytes written and flushed), `replace` (whole temp file, before the
                        rename), `replaced` (right after the rename, before anything else)

Python-level hooks see Python's own file calls and the two C/Rust writers named above; a library writing through its
own C code elsewhere would not be seen (the suite then says `mechanism: shim`)."""
from __future__ import annotations

import builtins
import errno
import io
import os
import runpy
import signal
import sys

_real_open, _real_os_open = builtins.open, os.open
_real = {n: getattr(os, n) for n in ("mkdir", "replace", "rename", "unlink", "remove", "rmdir")}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _under(path, root: str | None) -> bool:
    if not root or isinstance(path, int):
        return False
    try:
        p = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return False
    return p == root or p.startswith(root.rstrip("/") + "/")


def _active() -> bool:
    when = os.environ.get("QH_FAULT_WHEN")
    return not when or os.path.exists(when)


def _fault(path, kind: str) -> bool:
    root = os.environ.get(f"QH_FAULT_{kind}")
    return bool(root) and _under(path, os.path.abspath(root)) and _active()


def _raise(code: int, path) -> None:
    raise OSError(code, os.strerror(code), os.fsdecode(path))


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _FullDiskFile:
    """A real open file whose writes fail with ENOSPC, as on a full disk (the file itself was created)."""

    def __init__(self, f, path):
        self._f, self._path = f, path

    def write(self, data):
        _raise(errno.ENOSPC, self._path)

    writelines = write

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


class _KillingFile(_FullDiskFile):
    """A real open file that writes half of the first write, flushes it to disk, and SIGKILLs the process."""

    def write(self, data):
        self._f.write(data[: max(1, len(data) // 2)])
        self._f.flush()
        os.fsync(self._f.fileno())
        _die()


def _kill_phase(path) -> str | None:
    spec = os.environ.get("QH_FAULT_KILL")
    if not spec or isinstance(path, int):
        return None
    root, phase = spec.rsplit(":", 1)
    name = os.path.basename(os.fsdecode(path))
    is_record_tmp = name.startswith(".") and ".json." in name and name.endswith(".tmp")
    return phase if is_record_tmp and _under(path, os.path.abspath(root)) else None


def _open(file, mode="r", *args, **kwargs):
    writing = any(c in mode for c in "wax+")
    if writing and _fault(file, "EROFS"):
        _raise(errno.EROFS, file)
    f = _real_open(file, mode, *args, **kwargs)
    if writing and _fault(file, "ENOSPC"):
        return _FullDiskFile(f, file)
    if writing:
        phase = _kill_phase(file)
        if phase == "open":
            _die()
        if phase == "write":
            return _KillingFile(f, file)
    return f


def _os_open(path, flags, *args, **kwargs):
    if flags & WRITE_FLAGS and (_fault(path, "EROFS") or _fault(path, "ENOSPC")):
        _raise(errno.EROFS if _fault(path, "EROFS") else errno.ENOSPC, path)
    return _real_os_open(path, flags, *args, **kwargs)


def _guard(name: str, paths: slice):
    def call(*args, **kwargs):
        for p in args[paths]:
            if _fault(p, "EROFS"):
                _raise(errno.EROFS, p)
        if name == "replace" and _kill_phase(args[0]) == "replace":
            _die()
        out = _real[name](*args, **kwargs)
        if name == "replace" and _kill_phase(args[0]) == "replaced":
            _die()
        return out

    return call


def _c_writer(real, target_arg: int):
    def call(*args, **kwargs):
        target = args[target_arg] if len(args) > target_arg else next(iter(kwargs.values()), None)
        if isinstance(target, (str, bytes, os.PathLike)):
            for kind, code in (("EROFS", errno.EROFS), ("ENOSPC", errno.ENOSPC)):
                if _fault(target, kind):
                    _raise(code, target)
        return real(*args, **kwargs)

    return call


def install() -> None:
    builtins.open = io.open = _open
    os.open = _os_open
    for name in _real:
        setattr(os, name, _guard(name, slice(0, 2) if name in ("replace", "rename") else slice(0, 1)))
    if os.environ.get("QH_FAULT_ENOSPC") or os.environ.get("QH_FAULT_EROFS"):
        import safetensors.torch
        import torch

        torch.save = _c_writer(torch.save, 1)
        safetensors.torch.save_file = _c_writer(safetensors.torch.save_file, 1)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m benchmarks.fault_inject <module> [args ...]")
    install()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
