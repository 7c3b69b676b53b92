"""The committed tables tell the truth about the committed records (issue 28): every record under results/runs/ that
the report reads is checked against the code of this checkout (eval.code_version: the check `make demo` reuses records
by), and the generated tables under results/tables/ must mark exactly the records made by other code (‡, and the
`made_by_other_code` column) and list exactly the records there are. So a table made before the code changed, or
before its records were recomputed, fails here instead of shipping silently.

The same holds for the demo's decode records and their tables (results/decode/, docs/demo.md).

When it fails: run the records' configs again (`make demo` reuses the current ones and recomputes the rest), then
`python -m report` and `python -m report.readme_excerpt`, and commit records and tables together. The failure lists the
committed records this code would recompute (stale_reason: other code, other weights, or throughput measured on
another machine) and every mismatch between the tables and the records.

The check itself is shown to catch a stale row shown unmarked on records the pipeline made on a tiny model, one of
them then altered as older code would have written it."""
from __future__ import annotations

import copy
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
# the generated files that name records: one row per shown cell (paper tables), one per record (records.csv)
RUN_ID_CSVS = ("paper.csv", "paper_accuracy.csv", "records.csv")
STALE_NOTE = re.compile(r"^- ‡ .*?: record ([0-9a-f]{16}) \(", re.M)


def committed_record_paths(results: Path = RESULTS) -> list[Path]:
    """The run records git tracks under results/runs/ (every one on disk outside a git checkout): what a fresh clone
    reports, whatever a sweep has added here since."""
    runs = results / "runs"
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--full-name", "--", str(runs)], cwd=results, capture_output=True, text=True,
                             check=True).stdout
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=results, capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return sorted(runs.glob("*.json"))
    return sorted(Path(top) / p for p in out.split("\0") if p.endswith(".json"))


def reported_records(paths: list[Path], tmp: Path) -> list[dict]:
    """The records among `paths` that the report shows (complete, valid: report.build.load_checked)."""
    from report.build import load_checked

    runs = tmp / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for p in paths:
        shutil.copy(p, runs / p.name)
    return load_checked(tmp).records


def recomputed(records: list[dict]) -> dict[str, str]:
    """{run_id: why} of the records that this checkout's code would recompute rather than reuse for their configs
    (eval.code_version.stale_reason, as experiments.stages.reusable_record asks it)."""
    from eval.code_version import stale_reason
    from harness.config import to_run_config

    out = {}
    for rec in records:
        try:
            why = stale_reason(rec, to_run_config(rec["config"]))
        except Exception as e:  # noqa: BLE001  (a config this code no longer loads: it would not be reused either)
            why = f"its config does not load now ({type(e).__name__}: {e})"
        if why:
            out[rec["run_id"]] = why
    return out


def mark_errors(records: list[dict], tables: Path) -> list[str]:
    """Every way the tables under `tables` disagree with `records` on which records were made by other code
    (report.record_view.code_change) and on which records there are; [] when they agree."""
    import pandas as pd

    from report.record_view import code_change

    by_id = {rec["run_id"]: rec for rec in records}
    stale = {rid for rid, rec in by_id.items() if code_change(rec)}
    errors = []
    for name in RUN_ID_CSVS:
        path = tables / name
        if not path.exists():
            errors.append(f"{name}: missing (python -m report writes it)")
            continue
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        for _, row in frame.iterrows():
            rid, marked = row["run_id"], bool(row["made_by_other_code"])
            if rid not in by_id:
                errors.append(f"{name}: names record {rid}, which is not among the records")
            elif rid in stale and not marked:
                errors.append(f"{name}: record {rid} is shown unmarked, but it was {code_change(by_id[rid])}")
            elif marked and rid not in stale:
                errors.append(f"{name}: record {rid} is marked as made by other code, but this code makes it")
        if name == "records.csv":
            missing = sorted(set(by_id) - set(frame["run_id"]))
            errors += [f"records.csv: record {rid} is not in the tables" for rid in missing]
    paper = tables / "paper.md"
    if paper.exists():
        shown = set(pd.read_csv(tables / "paper.csv", dtype=str)["run_id"]) if (tables / "paper.csv").exists() else set()
        noted = set(STALE_NOTE.findall(paper.read_text()))
        errors += [f"paper.md: record {rid} is shown without its ‡ note ({code_change(by_id[rid])})"
                   for rid in sorted((shown & stale) - noted)]
        errors += [f"paper.md: a ‡ note names record {rid}, which is not made by other code now"
                   for rid in sorted(noted - stale)]
    return list(dict.fromkeys(errors))  # one line per disagreement, however many cells show it


@pytest.mark.parametrize("results", [RESULTS, RESULTS / "decode"], ids=["results", "results/decode"])
def test_the_committed_tables_mark_exactly_the_records_this_code_would_recompute(results, tmp_path):
    paths = committed_record_paths(results)
    if not paths:
        pytest.skip(f"no committed records under {results.relative_to(ROOT)}/runs")
    records = reported_records(paths, tmp_path)
    again = recomputed(records)
    errors = mark_errors(records, results / "tables")
    listing = "\n".join(f"  {rid}: {why}" for rid, why in sorted(again.items())) or "  (none)"
    assert not errors, ("the committed tables disagree with the committed records:\n  " + "\n  ".join(errors)
                        + f"\ncommitted records this code would recompute ({len(again)} of {len(records)}):\n{listing}"
                        + "\nrecompute them (make demo), run python -m report and python -m report.readme_excerpt, "
                          "and commit records and tables together")


# ------------------------------------------------------------------------------------------------ the check itself


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory, smollm2_resolved):
    """FP16 and RTN w4 records of a tiny random Llama (2 windows of 32 tokens of Milton), as the pipeline writes
    them, and their report."""
    from experiments import pipeline
    from report import build as R
    from tests.experiments.test_pipeline import SMALL, cfg_of
    from tests.experiments.tiny import tiny_checkpoint

    tmp = tmp_path_factory.mktemp("committed_tables")
    d = tiny_checkpoint(tmp / "tiny", smollm2_resolved.directory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QH_CACHE", str(tmp / "cache"))
        base = SMALL + ["eval.perplexity.seqlen=32", "data.splits=[milton]", f"model.path={d}",
                        "model.dtype=float32", f"results_dir={tmp / 'results'}"]
        records = [pipeline.run(cfg_of(base + [f"quant={q}"])) for q in ("fp16", "rtn_w4")]
    R.report(tmp / "results", figures=False, notebook=False, out=io.StringIO())
    return tmp / "results", records


def _older_code(rec: dict) -> dict:
    rec = copy.deepcopy(rec)
    rec["code_version"]["parts"]["quant.rtn"] = "0123456789ab"
    rec["code_version"]["hash"] = "older0000000"
    return rec


def _report_again(results: Path, records: list[dict], out: Path) -> Path:
    from report import build as R

    (out / "runs").mkdir(parents=True)
    for rec in records:
        (out / "runs" / f"{rec['run_id']}.json").write_text(json.dumps(rec))
    R.report(out, figures=False, notebook=False, out=io.StringIO())
    return out / "tables"


def test_fresh_records_and_their_tables_agree(tiny_results):
    results, records = tiny_results
    assert recomputed(records) == {} and mark_errors(records, results / "tables") == []


def test_a_stale_record_shown_unmarked_fails_the_check(tiny_results, tmp_path):
    results, (fp16, rtn) = tiny_results
    old = _older_code(rtn)
    # the tables made while the record was current, the record now made by other code: the row is shown unmarked
    assert recomputed([fp16, old]) == {rtn["run_id"]: "made by other code (quant.rtn changed)"}
    errors = mark_errors([fp16, old], results / "tables")
    unmarked = f"record {rtn['run_id']} is shown unmarked, but it was made by other code (quant.rtn changed)"
    assert f"paper.csv: {unmarked}" in errors and f"records.csv: {unmarked}" in errors
    assert any(e.startswith(f"paper.md: record {rtn['run_id']} is shown without its ‡ note") for e in errors)
    # the report run again marks it, and then the check passes; the same tables against the recomputed record fail
    tables = _report_again(results, [fp16, old], tmp_path / "again")
    assert mark_errors([fp16, old], tables) == []
    assert any("is marked as made by other code, but this code makes it" in e for e in mark_errors([fp16, rtn], tables))


def test_a_table_naming_a_record_there_is_not_fails_the_check(tiny_results):
    results, (fp16, rtn) = tiny_results
    errors = mark_errors([fp16], results / "tables")
    assert f"paper.csv: names record {rtn['run_id']}, which is not among the records" in errors


def test_a_late_field_at_its_default_splits_no_row(tiny_results):
    """A record from before a late field existed (backend.w4a16_kernel, harness.config.LATE_FIELDS) is the same row
    as one that holds the field's default: the report replaces the older by the newer instead of showing both."""
    from report.tables import _row_identity

    _, (_, rtn) = tiny_results
    older = copy.deepcopy(rtn)
    assert older["config"]["backend"].pop("w4a16_kernel") == "engine"
    assert _row_identity(older) == _row_identity(rtn)
