"""A sweep killed mid-way resumes: SIGKILL to the sweep's whole process group leaves only complete records (no half
file a reader or the re-run would take for a finished run); the re-run reuses those records byte for byte, without
rewriting them, and runs only the configs that were missing, loading the quantized weights the killed sweep cached.
Also the atomic write every record and cache file goes through, killed in the middle of writing."""
from __future__ import annotations

import pytest

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness.records import load_records, run_id
from tests.experiments.test_pipeline import CONF, SMALL, cfg_of

ROOT = Path(CONF).parent
# three cheap configs: RTN w4 (one quantization, cached by the first) scored on 1, 2 and 3 windows of one split
WINDOWS = (1, 2, 3)
BASE = ["quant=rtn_w4", "data.splits=[milton]", *[o for o in SMALL if not o.startswith("eval.perplexity.max_windows=")]]


def sweep_args(results: Path, sweep_dir: Path) -> list[str]:
    return [sys.executable, "-m", "experiments.run", "-m", *BASE, "eval.perplexity.max_windows=" + ",".join(map(str, WINDOWS)),
            f"results_dir={results}", f"hydra.sweep.dir={sweep_dir}"]


def complete_records(runs: Path) -> dict[str, bytes]:
    """Every file the loaders would read (*.json) must be a whole, complete record; anything else may only be the
    temp file of a write that was killed (ignored by every reader)."""
    found = {}
    for p in runs.iterdir():
        if p.suffix == ".json":
            rec = json.loads(p.read_bytes())
            assert rec["status"] == "complete" and rec["run_id"] == p.stem
            found[p.stem] = p.read_bytes()
        else:
            assert p.name.startswith(".") and p.name.endswith(".tmp"), p
    assert sorted(r["run_id"] for r in load_records(runs.parent)) == sorted(found)
    return found


@pytest.mark.slow
def test_killed_sweep_resumes_reusing_finished_records(tmp_path):
    results, sweep_dir, log = tmp_path / "results", tmp_path / "sweep", tmp_path / "first.log"
    runs = results / "runs"
    expected = {run_id(cfg_of(BASE + [f"eval.perplexity.max_windows={w}"])) for w in WINDOWS}
    assert len(expected) == 3

    # 1. the sweep in its own process group (the basic launcher: configs one after another), killed with SIGKILL as
    # soon as its first record lands, while the next config is being run
    with open(log, "w") as out:
        proc = subprocess.Popen(sweep_args(results, sweep_dir), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not (runs.exists() and any(runs.glob("*.json"))):
                assert proc.poll() is None, f"sweep ended before its first record:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no record after 120 s:\n{log.read_text()[-3000:]}"
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    before = complete_records(runs)
    assert 1 <= len(before) < len(expected), f"{len(before)} of 3 records before the kill: make the runs slower"
    assert set(before) <= expected
    mtimes = {rid: (runs / f"{rid}.json").stat().st_mtime_ns for rid in before}

    # 2. the same command again, to completion
    second = subprocess.run(sweep_args(results, sweep_dir), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    after = complete_records(runs)
    assert set(after) == expected, second.stderr[-3000:]
    for rid, blob in before.items():  # reused: byte-identical and never rewritten
        assert after[rid] == blob
        assert (runs / f"{rid}.json").stat().st_mtime_ns == mtimes[rid]

    # the re-run's log: each finished record reused (experiments.pipeline.run), each missing one run and written
    log2 = second.stderr
    reused = set(re.findall(r"record \S+/(\w+)\.json exists \(run_id \w+\); reusing it", log2))
    wrote = set(re.findall(r"wrote \S+/(\w+)\.json", log2))
    assert reused == set(before), log2[-3000:]
    assert wrote == expected - set(before), log2[-3000:]
    missing = len(expected) - len(before)
    assert log2.count("[run] loading ") == missing  # the model is loaded only for the missing configs
    assert log2.count("quantized weights from cache") == missing  # the killed sweep's quantization was kept


def test_atomic_write_killed_midway_leaves_the_old_file(tmp_path):
    """A process killed inside `atomic_file` leaves the previous record whole and only an ignored temp file."""
    runs = tmp_path / "runs"
    runs.mkdir()
    target = runs / "0123456789abcdef.json"
    old = json.dumps({"run_id": target.stem, "status": "complete"})
    target.write_text(old)
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom harness.assets import atomic_file\n"
            "with atomic_file(Path(sys.argv[1])) as tmp:\n"
            "    tmp.write_text('{\"run_id\": \"0123')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert target.read_text() == old
    leftovers = [p.name for p in runs.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{target.name}.") and leftovers[0].endswith(".tmp")
    assert [r["run_id"] for r in load_records(tmp_path)] == [target.stem]


def test_atomic_write_failure_and_success(tmp_path):
    from harness.assets import atomic_file

    target = tmp_path / "cache" / "x.pt"
    try:
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    except RuntimeError:
        pass
    assert list(target.parent.iterdir()) == []  # neither the target nor the temp file
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and list(target.parent.iterdir()) == [target]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any other file (mkstemp gave 0600)
