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
