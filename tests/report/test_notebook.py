"""notebooks/results.ipynb runs top to bottom (nbclient) on records: synthetic ones in a temporary results folder
(through $QH_RESULTS_DIR, as `python -m report` runs it), none at all, and the repo's real results/ when
there are records there."""
from __future__ import annotations

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from harness.assets import REPO_ROOT
from report import build as R
from tests.report.test_report import demo_records, write_records


def _outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _errors(nb) -> list:
    return [o for o in _outputs(nb) if o.output_type == "error"]


def test_notebook_is_built_from_its_script(tmp_path):
    """The committed notebook is what report/notebook.py writes (no stale cells or outputs)."""
    from report import notebook

    built = notebook.build()
    on_disk = nbformat.read(REPO_ROOT / "notebooks" / "results.ipynb", as_version=4)
    assert [c.source for c in on_disk.cells] == [c.source for c in built.cells], \
        "notebooks/results.ipynb is out of date: run python -m report.notebook"
    assert not _outputs(on_disk)


def test_report_executes_the_notebook_on_synthetic_records(tmp_path, capsys):
    write_records(tmp_path, demo_records())
    assert R.main(["--results-dir", str(tmp_path), "--no-figures"]) == 0
    executed = tmp_path / "notebooks" / "results.executed.ipynb"
    assert "results.executed.ipynb" in capsys.readouterr().out.split("notebook:")[1]
    nb = nbformat.read(executed, as_version=4)
    assert not _errors(nb)
    outs = _outputs(nb)
    text = json.dumps([o.get("text", "") for o in outs])
    assert "6 complete run records" in text and str(tmp_path) in text  # it read QH_RESULTS_DIR, not results/
    md = [o["data"]["text/markdown"] for o in outs if "text/markdown" in o.get("data", {})]
    assert md and md[0].startswith("### Table 1") and "AWQ w4 g64 (search+clip) + KV int8" in md[0]
    assert sum("image/png" in o.get("data", {}) for o in outs) == 5  # every figure, for one model


def test_notebook_runs_from_the_repo_root_with_no_records(tmp_path):
    nb = nbformat.read(R.NOTEBOOK, as_version=4)
    env = {**os.environ, R.RESULTS_ENV: str(tmp_path)}
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT)}}).execute(env=env)
    assert not _errors(nb)
    assert "No records yet" in json.dumps([o.get("text", "") for o in _outputs(nb)])


def test_notebook_on_real_results_if_present(tmp_path):
    runs = REPO_ROOT / "results" / "runs"
    if not runs.exists() or not list(runs.glob("*.json")):
        pytest.skip("no records under results/runs (run `make demo` first)")
    nb = nbformat.read(R.execute_notebook(REPO_ROOT / "results", tmp_path / "results.executed.ipynb"), as_version=4)
    assert not _errors(nb)


def test_a_failing_notebook_is_a_clear_error_with_the_partial_copy(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print('ok')"), nbformat.v4.new_code_cell("raise ValueError('boom')")]
    src = tmp_path / "bad.ipynb"
    nbformat.write(nb, src)
    out = tmp_path / "out" / "bad.executed.ipynb"
    with pytest.raises(R.ReportError, match="boom") as e:
        R.execute_notebook(tmp_path, out, src=src)
    assert str(out) in str(e.value) and _errors(nbformat.read(out, as_version=4))
