"""An exported directory is written beside its path and swapped in whole: a writer killed mid-write leaves only a
sibling named by the harness's pattern, which the next write removes (or, killed mid-swap, puts the previous
directory back); nothing the harness did not write, or a live writer's work, is touched."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from harness.assets import _writer_tag, atomic_directory, recover_directory


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _sibling(out, pid: int, suffix: str, host: str | None = None):
    host = host or _writer_tag().rsplit("-", 1)[0]
    d = out.with_name(f".{out.name}.{host}-{pid}-0123456789ab{suffix}")
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"half")
    return d


def test_a_write_swaps_in_whole_and_failures_leave_nothing(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in out.iterdir()) == ["a"] and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with atomic_directory(out) as tmp:  # a replacement: the old directory goes, nothing is left beside it
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c"] and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_leftovers_of_dead_writers_go_and_everything_else_stays(tmp_path):
    out = tmp_path / "ckpt"
    dead = _dead_pid()
    half = _sibling(out, dead, ".tmp")
    live = _sibling(out, os.getppid(), ".tmp")  # a running process (pytest's parent): another writer at work
    other_host = _sibling(out, dead, ".tmp", host="elsewhere")
    user = tmp_path / f".{out.name}.my-notes.tmp"
    user.mkdir()
    moved_aside = _sibling(out, dead, ".old")  # killed between moving the previous directory aside and the swap
    said = recover_directory(out)
    assert (out / "model.safetensors").read_bytes() == b"half" and not moved_aside.exists()  # put back
    assert not half.exists() and live.exists() and other_host.exists() and user.exists()
    assert any("restored" in s for s in said) and any("removed" in s for s in said)
    again = _sibling(out, dead, ".old")  # with the directory in place, a dead writer's .old is removed
    recover_directory(out)
    assert not again.exists() and out.exists()


def test_an_export_killed_mid_write_is_cleaned_up_by_the_next(tmp_path):
    """A real writer SIGKILLed inside the temp directory; the next export to the same path removes its leftover."""
    out = tmp_path / "ckpt"
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(os.getcwd())!r})
        from harness.assets import atomic_directory
        with atomic_directory({str(out)!r}) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == -signal.SIGKILL and not out.exists()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".ckpt.") and left[0].endswith(".tmp")
    with atomic_directory(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"y")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
