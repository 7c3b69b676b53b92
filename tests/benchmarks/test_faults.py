"""The fault-injection suite (benchmarks/faults.py, issue 15): its kill points inside a record's atomic write land
where they say, its check catches a wrong or extra file, and a few real trials (SIGKILL in each stage, a truncated
cache file and record) leave no record lost or wrong after the rerun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import faults

ROOT = Path(__file__).resolve().parents[2]
WRITER = "import sys\nfrom pathlib import Path\nfrom harness.records import write_json_atomic\n" \
         "write_json_atomic(Path(sys.argv[1]), {'run_id': 'x' * 16, 'status': 'complete', 'pad': 'y' * 4000})\n"


@pytest.mark.parametrize("phase", faults.PHASES)
def test_kill_points_inside_a_record_write(tmp_path, phase):
    (tmp_path / "writer.py").write_text(WRITER)
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "QH_FAULT_KILL": f"{runs}:{phase}"}
    p = subprocess.run([sys.executable, "-m", "benchmarks.fault_inject", "writer", str(runs / ("x" * 16 + ".json"))],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr
    files = {f.name: f.read_bytes() for f in runs.iterdir()}
    if phase == "replaced":
        assert list(files) == ["x" * 16 + ".json"] and json.loads(files["x" * 16 + ".json"])["status"] == "complete"
        return
    (name, blob), = files.items()
    assert name.startswith("." + "x" * 16 + ".json.") and name.endswith(".tmp")
    whole = len(json.dumps({"run_id": "x" * 16, "status": "complete", "pad": "y" * 4000}, indent=2))
    assert len(blob) == {"open": 0, "write": whole // 2, "replace": whole}[phase]


def test_the_check_catches_wrong_metrics_and_leftovers(tmp_path):
    g = faults.Group(tmp_path / "g", tmp_path / "no-cache")
    rec = {"run_id": "a" * 16, "status": "complete", "config": {"results_dir": "x"},
           "metrics": {"perplexity": {"milton": {"token_ppl": 101.25, "tokens_per_s": 30.0, "seconds": 2.0}}}}
    ref = faults.Reference("rtn", rec, {}, None, g)
    runs = g.results / "runs"
    runs.mkdir(parents=True)
    (runs / f"{'a' * 16}.json").write_text(json.dumps({**rec, "config": {"results_dir": "y"}, "metrics": {
        "perplexity": {"milton": {"token_ppl": 101.25, "tokens_per_s": 55.0, "seconds": 1.0}}}}))
    ok = faults.Run(0, 1.0, [])
    assert faults.problems_after_rerun(g, ref, ok) == []  # measured numbers and results_dir may differ
    wrong = json.loads((runs / f"{'a' * 16}.json").read_text())
    wrong["metrics"]["perplexity"]["milton"]["token_ppl"] = 101.25000000000001
    (runs / f"{'a' * 16}.json").write_text(json.dumps(wrong))
    (runs / ".b.json.host-1-0123456789ab.tmp").write_text("")
    (g.cache / "quantized").mkdir()
    (g.cache / "quantized" / ".k.safetensors.host-1-0123456789ab.tmp").write_text("")
    got = faults.problems_after_rerun(g, ref, faults.Run(1, 1.0, [(0.0, "error: x")]))
    assert got[0].startswith("rerun exit 1") and got[1].startswith("runs/ holds")
    assert got[2].startswith("temp files left in") and "metrics differ: .perplexity.milton.token_ppl" in got[3]


@pytest.mark.slow
def test_a_few_trials_lose_nothing(tmp_path):
    """Three SIGKILLs (quantization, evaluation, record writing: one each), a truncated cache file and a truncated
    record; disk faults by the shim, which works without root (about 4 min on 2 shared cores)."""
    out = tmp_path / "out"
    code = faults.main(["--trials", "3", "--faults", "corrupt_files", "--mechanism", "shim", "--seed", "3",
                        "--work", str(tmp_path / "work"), "--out", str(out)])
    result = json.loads((out / "faults.json").read_text())
    s = result["summary"]
    assert [r["problems"] for r in result["trials"]] == [[]] * 4
    assert code == 0 and s["records_lost_or_wrong"] == 0 and s["trials"] == 4
    assert s["kills"] + s["kills_missed"] == 3 and s["kills"] >= 2


# ----------------------------------------------------------------------------------------------- issue 27's scenarios


def test_the_harm_counters_see_a_destroyed_and_an_added_file(tmp_path):
    from benchmarks import faults_integrity as FI

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "thesis.tex").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine")
    before = FI.snapshot(tmp_path)
    (tmp_path / "a" / "thesis.tex").write_text("gone")
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "escaped.tar.gz").write_bytes(b"x")
    after = FI.snapshot(tmp_path)
    assert sorted(FI.destroyed(before, after)) == ["a/thesis.tex", "notes.txt"]
    assert FI.added(before, after) == ["escaped.tar.gz"]
    rows = [FI.row("t", "c", 0.0, ["x"], user_files_destroyed=2), {"trial": "kill", "problems": ["wrong"]},
            {"trial": "kill", "problems": []}]
    assert [faults.counts_of(r)["user_files_destroyed"] for r in rows] == [2, 0, 0]
    assert [faults.counts_of(r)["records_lost_or_wrong"] for r in rows] == [0, 1, 0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_tampering_flips_one_mantissa_bit_and_hides_itself(tmp_path, dtype):
    """A 2^-7 change of 1,024 values of the named tensor only, in place: same size, inode and mtime."""
    import torch
    from safetensors.torch import load_file, save_file

    from benchmarks import faults_integrity as FI

    dt = getattr(torch, dtype)
    t = {"a.weight": torch.full((4, 512), 1.5, dtype=dt), "b.weight": torch.ones(8, dtype=dt)}
    f = tmp_path / "m.safetensors"
    save_file(t, str(f))
    st = f.stat()
    assert FI.flip_mantissa_bits(f, prefix="a.") == "a.weight"
    now, got = f.stat(), load_file(str(f))
    assert (now.st_size, now.st_ino, now.st_mtime_ns) == (st.st_size, st.st_ino, st.st_mtime_ns)
    changed = (got["a.weight"] != t["a.weight"]).flatten()
    assert changed[:1024].all() and not changed[1024:].any() and torch.equal(got["b.weight"], t["b.weight"])
    ratio = (got["a.weight"].float().flatten()[:1024] / 1.5 - 1).abs()
    assert torch.allclose(ratio, torch.full_like(ratio, 2 ** -7 / 1.5))


def test_cheap_scenarios_harm_nothing(tmp_path):
    """The bundle's escapes and a NUL text, through the suite's driver (about 10 s): refused in one line, and every
    counter 0."""
    out = tmp_path / "out"
    code = faults.main(["--trials", "0", "--faults", "bundle_escape,nul_text", "--mechanism", "shim",
                        "--work", str(tmp_path / "work"), "--out", str(out)])
    result = json.loads((out / "faults.json").read_text())
    s = result["summary"]
    assert code == 0 and [r["problems"] for r in result["trials"]] == [[], []], result["trials"]
    assert all(s[k] == 0 for k in faults.COUNTS) and s["trials"] == 2
    assert result["trials"][1]["message"].startswith("error: text source: file:")
