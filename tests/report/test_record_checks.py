"""The report believes no record unchecked (issue 27, finding 7): records made by the pipeline on the embedded model
(FP16 and RTN, 2 windows of 64 tokens of Milton), then corrupted copies of them. Every bad copy is left out and
listed with its path and reason, on stderr and above the tables; the good records' columns stay; with no valid
record the report stops with one line; two records of one config say which numbers differ."""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest

from harness.record_schema import RECORD_VERSION, RecordSchemaError, parse_record
from report import build as R
from report import tables as T
from tests.experiments.test_pipeline import SMALL, cfg_of


@pytest.fixture(scope="module")
def pipeline_records(tmp_path_factory) -> dict[str, dict]:
    """{"fp16": record, "rtn": record} as experiments.pipeline writes them (about 20 s, less with a warm cache)."""
    from experiments import pipeline

    out = tmp_path_factory.mktemp("pipeline_records")
    return {q: pipeline.run(cfg_of(SMALL + [f"quant={q}", "data.splits=[milton]",
                                            "eval=ppl", f"results_dir={out}"])) for q in ("fp16", "rtn_w4")}


def _write(results: Path, name: str, rec: dict) -> Path:
    runs = results / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    p = runs / f"{name}.json"
    p.write_text(json.dumps(rec, indent=1))  # NaN is written as the JSON extension NaN, as json.dumps allows
    return p


def _corrupt(rec: dict, how: str) -> dict:
    rec = copy.deepcopy(rec)
    ppl = rec["metrics"]["perplexity"]["milton"]
    if how == "future_version":
        rec["record_version"] = RECORD_VERSION + 1
    elif how == "outside_interval":
        ppl["token_ppl"] = ppl["token_ppl_ci95"][1] * 1.5
    elif how == "string_ppl":
        ppl["token_ppl"] = f"{ppl['token_ppl']:.2f}"
    elif how == "nan_ppl":
        ppl["token_ppl"] = float("nan")
    elif how == "run_id_not_hash":
        rec["config"]["quant"]["w_bit"] = 3  # a w3 config filed under the w4 run's id
    elif how == "no_metrics":
        rec["metrics"] = {}
    elif how == "changed_files_not_a_list":
        rec["provenance"]["git_changed"] = "harness/x.py"
    elif how == "load_as_text":  # a throughput section whose load the report could not compare
        rec["metrics"]["throughput"] = {"cpu_count": 2, "load_average_1m": "3.9"}
    return rec


REASONS = {"future_version": f"record_version {RECORD_VERSION + 1} is newer than this code reads ({RECORD_VERSION})",
           "outside_interval": "metrics.perplexity.milton.token_ppl {ppl!r} lies outside its own 95% interval",
           "string_ppl": "metrics.perplexity.milton.token_ppl is a string",
           "nan_ppl": "metrics.perplexity.milton.token_ppl is nan",
           "run_id_not_hash": "run_id {run_id} is not the hash of its config",
           "no_metrics": "no metrics",
           "changed_files_not_a_list": "provenance.git_changed is a string ('harness/x.py'), not a list",
           "load_as_text": "metrics.throughput.load_average_1m is a string ('3.9'), not a list"}


def test_the_pipelines_own_records_pass(pipeline_records):
    for rec in pipeline_records.values():
        r = parse_record(json.loads(json.dumps(rec)))
        assert r.perplexity["milton"].token_ppl == rec["metrics"]["perplexity"]["milton"]["token_ppl"]
        lo, hi = r.perplexity["milton"].token_ppl_ci95
        assert lo <= r.perplexity["milton"].token_ppl <= hi


@pytest.mark.parametrize("how", list(REASONS))
def test_each_corruption_is_refused_with_its_reason(pipeline_records, how):
    bad = _corrupt(pipeline_records["rtn_w4"], how)
    with pytest.raises(RecordSchemaError) as e:
        parse_record(json.loads(json.dumps(bad)), "runs/x.json")
    want = REASONS[how].format(ppl=bad["metrics"].get("perplexity", {}).get("milton", {}).get("token_ppl"),
                               run_id=bad["run_id"])
    assert str(e.value).startswith("runs/x.json: ") and want in str(e.value), str(e.value)


def test_the_report_lists_every_bad_record_and_keeps_the_good_columns(tmp_path, capsys, pipeline_records):
    fp16, rtn = pipeline_records["fp16"], pipeline_records["rtn_w4"]
    _write(tmp_path, fp16["run_id"], fp16)
    _write(tmp_path, rtn["run_id"], rtn)
    bad = {how: _write(tmp_path, f"zz-{how}", _corrupt(rtn, how)) for how in REASONS}
    assert R.main(["--results-dir", str(tmp_path), "--no-figures", "--no-notebook"]) == 0
    out, err = capsys.readouterr()
    table_md = (tmp_path / "tables" / "table1.md").read_text()
    for how, path in bad.items():
        line = next((x for x in err.splitlines() if x.startswith(f"warning: skipping {path}: ")), None)
        assert line is not None, (how, err)
        assert f"- `{path}`: " in table_md and f"- `{path}`: " in out  # above the tables, in the file and printed
    assert f"Warning: {len(REASONS)} records left out" in table_md
    # the valid FP16 and RTN rows are there, with their PPL column, and nothing of the bad copies
    (t,) = T.build_tables(R.load(tmp_path)[0])
    assert [r.text for r in t.rows] == ["FP16", "RTN w4 g64"] and not t.dropped
    col = T.Column("token_ppl", "milton")
    assert t.value(t.rows[1], t.models[0], col) == rtn["metrics"]["perplexity"]["milton"]["token_ppl"]


def test_no_valid_record_is_one_line_and_exit_2(tmp_path, capsys, pipeline_records):
    rtn = pipeline_records["rtn_w4"]
    paths = [_write(tmp_path, f"bad-{how}", _corrupt(rtn, how)) for how in ("future_version", "no_metrics")]
    assert R.main(["--results-dir", str(tmp_path), "--no-figures", "--no-notebook"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"report: no valid complete run record under {tmp_path / 'runs'}: "
                                                   f"2 left out as bad"), err
    assert all(str(p) in lines[0] for p in paths) and not (tmp_path / "tables").exists()


def test_two_records_of_one_config_say_which_numbers_differ(tmp_path, pipeline_records):
    """The same config computed twice with different numbers (say a resumed run after a corrupt checkpoint): the
    newer is shown, and the note under the table gives both numbers."""
    rtn = pipeline_records["rtn_w4"]
    again = copy.deepcopy(rtn)
    ppl = again["metrics"]["perplexity"]["milton"]
    lo, hi = ppl["token_ppl_ci95"]
    ppl["token_ppl"] = lo + 0.25 * (hi - lo)  # still inside its interval: a valid record
    again["provenance"]["created_unix"] += 60
    _write(tmp_path, rtn["run_id"], rtn)
    _write(tmp_path, "rerun", again)
    records, notes = R.load(tmp_path)
    assert len(records) == 2 and not notes
    (t,) = T.build_tables(records)
    (msg,) = t.dropped
    old, new = rtn["metrics"]["perplexity"]["milton"]["token_ppl"], ppl["token_ppl"]
    assert f"numbers PPL milton {old:.6g} -> {new:.6g}" in msg, msg
    assert not math.isclose(old, new)


def test_a_copy_of_results_is_checked_too(tmp_path, pipeline_records):
    """A record copied between results folders keeps its run_id: the check is of the config, not the file name."""
    rtn = pipeline_records["rtn_w4"]
    src = _write(tmp_path / "a", rtn["run_id"], rtn)
    (tmp_path / "b" / "runs").mkdir(parents=True)
    shutil.copy(src, tmp_path / "b" / "runs" / "renamed.json")
    assert [r["run_id"] for r in R.load(tmp_path / "b")[0]] == [rtn["run_id"]]
