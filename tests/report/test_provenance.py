"""Stale rows are never silently mixed, and no ratio comes from two machines or a loaded one (issue 28). Records made
by the pipeline on the embedded model (FP16 and RTN w4, 2 windows of 64 tokens of Milton, a 4-token decode), then
altered as older code, another machine or a busy one would have left them:

- a record whose code_version is not what this checkout computes for its config (eval.code_version, the check the
  pipeline reuses records by) is marked ‡ on its row in every table form and figure legend, with a note naming the
  parts that changed, and the report prints one line listing the stale records;
- a decode ratio (× FP16) is formed only when both records come from one machine (host, CPU, GPU) and neither run's
  load average exceeded the core count; otherwise the figure is shown alone (§) and the note says why."""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest

from report import build as R
from report import plots as P
from report import render as M
from report import tables as T
from tests.experiments.test_pipeline import SMALL, cfg_of

THROUGHPUT = ["eval.throughput.enabled=true", "eval.throughput.batch_sizes=[1]", "eval.throughput.prompt_len=8",
              "eval.throughput.gen_len=4", "eval.throughput.warmup=0", "eval.throughput.repeats=1"]


@pytest.fixture(scope="module")
def pipeline_records(tmp_path_factory) -> dict[str, dict]:
    """{"fp16": record, "rtn_w4": record} with perplexity and decode throughput, as experiments.pipeline writes
    them, their loads set to a quiet machine's (this one may be busy: the tests below choose the load)."""
    from experiments import pipeline

    out = tmp_path_factory.mktemp("provenance_records")
    recs = {q: pipeline.run(cfg_of(SMALL + [f"quant={q}", "data.splits=[milton]", "eval=ppl", *THROUGHPUT,
                                            f"results_dir={out}"])) for q in ("fp16", "rtn_w4")}
    for rec in recs.values():
        tp = rec["metrics"]["throughput"]
        assert len(tp["load_average_1m"]) == 2 and tp["cpu_count"] >= 1  # eval/throughput.py keeps them
        tp["load_average_1m"] = [0.5 * tp["cpu_count"], 0.9 * tp["cpu_count"]]
    return recs


def _report(tmp_path: Path, records: list[dict], capsys) -> tuple[dict, str, str]:
    runs = tmp_path / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for rec in records:
        (runs / f"{rec['run_id']}.json").write_text(json.dumps(rec))
    capsys.readouterr()
    out = R.report(tmp_path, figures=False, notebook=False, out=io.StringIO())
    err = capsys.readouterr().err
    return out, out["markdown"], err


def _older_code(rec: dict, part: str = "quant.rtn") -> dict:
    """The record as code older in `part` would have written it."""
    rec = copy.deepcopy(rec)
    rec["code_version"]["parts"][part] = "0123456789ab"
    rec["code_version"]["hash"] = "older0000000"
    return rec


def _rows(md: str) -> dict[str, str]:
    return {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ") and " | " in line}


# ---------------------------------------------------------------------------------------------- stale rows


def test_fresh_records_carry_no_mark(pipeline_records, tmp_path, capsys):
    out, md, err = _report(tmp_path, list(pipeline_records.values()), capsys)
    assert "‡" not in md and "stale" not in err.lower()
    assert set(_rows(md)) >= {"FP16", "RTN w4 g64"}


def test_a_record_of_older_code_is_marked_everywhere(pipeline_records, tmp_path, capsys):
    fp16, rtn = pipeline_records["fp16"], _older_code(pipeline_records["rtn_w4"])
    out, md, err = _report(tmp_path, [fp16, rtn], capsys)
    why = "made by other code (quant.rtn changed)"
    # the console and the markdown: one summary line listing the stale record
    line = "1 of 2 records shown were made by other code than this checkout's"
    assert line in err and f"{rtn['run_id']} (RTN w4 g64, smollm2-135m-instruct): {why}" in err
    assert md.startswith(f"> **Stale:** {line}")
    # the markdown table: a mark on the row, and a note naming what changed; FP16 stays unmarked
    rows = _rows(md)
    assert "RTN w4 g64 ‡" in rows and "FP16" in rows
    assert f"- ‡ RTN w4 g64 (smollm2-135m-instruct): record {rtn['run_id']}" in md and f"was {why}" in md
    # the written files: markdown, LaTeX, CSV
    tables = tmp_path / "tables"
    assert "| RTN w4 g64 ‡ |" in (tables / "table1.md").read_text()
    tex = (tables / "table1.tex").read_text()
    assert r"RTN w4 g64 $^\ddagger$ &" in tex and "quant.rtn changed" in tex
    import pandas as pd

    csv = pd.read_csv(tables / "table1.csv").set_index("config")
    assert csv.loc["RTN w4 g64", "made by other code"] == f"smollm2-135m-instruct: {why}"
    assert pd.isna(csv.loc["FP16", "made by other code"])
    flat = pd.read_csv(tables / "records.csv").set_index("run_id")
    assert flat.loc[rtn["run_id"], "made_by_other_code"] == why and pd.isna(flat.loc[fp16["run_id"], "made_by_other_code"])


def test_a_stale_row_is_marked_in_figure_legends_and_never_best(pipeline_records):
    import matplotlib

    matplotlib.use("Agg")
    t = T.build_tables([pipeline_records["fp16"], _older_code(pipeline_records["rtn_w4"])])[0]
    (row,) = [r for r in t.rows if not r.reference]
    mid = t.models[0]
    legends = []
    for fig in P.figures(t).values():
        legends += [x.get_text() for lg in fig.legends for x in lg.get_texts()]
        legends += [x.get_text() for ax in fig.axes if ax.get_legend() for x in ax.get_legend().get_texts()]
    assert any(x.startswith("RTN") and "‡ made by other code" in x for x in legends), legends
    assert not any(x.startswith("FP16") and "‡" in x for x in legends), legends
    col = next(c for m, c in t.columns if c.metric == "token_ppl")
    assert t.best(mid, col) == set()  # the only quantized row is stale: nothing is "best"


def test_a_record_of_older_evaluator_code_names_that_part(pipeline_records, tmp_path, capsys):
    rec = _older_code(pipeline_records["fp16"], "eval.perplexity")
    _, md, _ = _report(tmp_path, [rec, pipeline_records["rtn_w4"]], capsys)
    assert "FP16 ‡" in _rows(md) and "made by other code (eval.perplexity changed)" in md


# ---------------------------------------------------------------------------------------------- comparable speed


def _decode_cells(t: T.Table, row):
    mid = t.models[0]
    return [(mid, c) for m, c in t.columns if c.metric == "decode_tok_s" and t.value(row, mid, c) is not None]


def _rtn_row(t: T.Table):
    return next(r for r in t.rows if r.text.startswith("RTN"))


def test_one_quiet_machine_gives_a_ratio(pipeline_records):
    t = T.build_tables(list(pipeline_records.values()))[0]
    cells = _decode_cells(t, _rtn_row(t))
    assert cells and not t.no_ratio
    for mid, c in cells:
        ref = t.reference_row(mid)
        want = t.value(_rtn_row(t), mid, c) / t.value(ref, mid, c)
        assert t.delta(_rtn_row(t), mid, c) == pytest.approx(want)
        assert " §" not in M.cell(t, _rtn_row(t), mid, c, str)


def test_no_ratio_across_machines_or_under_load(pipeline_records, tmp_path, capsys):
    fp16 = pipeline_records["fp16"]
    other_host = copy.deepcopy(pipeline_records["rtn_w4"])  # same CPU model, another host
    other_host["provenance"]["hardware"]["hostname"] = "elsewhere"
    busy = copy.deepcopy(pipeline_records["rtn_w4"])  # this machine, while other work held the cores
    cpus = busy["metrics"]["throughput"]["cpu_count"]
    busy["metrics"]["throughput"]["load_average_1m"] = [1.5 * cpus, 1.95 * cpus]
    for rec, why in ((other_host, "FP16 measured on another machine ("),
                     (busy, f"load {1.95 * cpus:.1f} on {cpus} cores during the run")):
        t = T.build_tables([fp16, rec])[0]
        row = _rtn_row(t)
        cells = _decode_cells(t, row)
        assert cells
        for mid, c in cells:
            assert t.value(row, mid, c) is not None  # the figure is printed ...
            assert t.delta(row, mid, c) is None  # ... without the ratio
            assert why in t.no_ratio[(row.key, mid, c)]
            assert M.cell(t, row, mid, c, str) == f"{t.display(c, t.value(row, mid, c)):,.1f} §"
        assert any(n.startswith("§ decode tok/s b1") and f"of RTN w4 g64 (smollm2-135m-instruct): {why}" in n
                   and n.endswith("so no ratio to FP16 is formed.") for n in M.notes(t)), M.notes(t)
        out, md, _ = _report(tmp_path / why[:4].strip(), [fp16, rec], capsys)
        decode = _rows(md)["RTN w4 g64"].rstrip(" |").rsplit(" | ", 1)[1]  # the last column
        assert decode.endswith(" §") and "×" not in decode
        assert why in md
    host = fp16["provenance"]["hardware"]["hostname"]
    t = T.build_tables([fp16, other_host])[0]
    (why,) = set(t.no_ratio.values())
    assert f"host {host}; this run: " in why and why.endswith("host elsewhere)")


def test_a_busy_fp16_run_gives_no_ratio_and_says_so_on_its_own_row(pipeline_records):
    fp16 = copy.deepcopy(pipeline_records["fp16"])
    cpus = fp16["metrics"]["throughput"]["cpu_count"]
    fp16["metrics"]["throughput"]["load_average_1m"] = [2.0 * cpus, 2.0 * cpus]
    t = T.build_tables([fp16, pipeline_records["rtn_w4"]])[0]
    ref, row = t.rows[0], _rtn_row(t)
    for mid, c in _decode_cells(t, row):
        assert t.delta(row, mid, c) is None and "FP16's run: load" in t.no_ratio[(row.key, mid, c)]
        assert M.cell(t, ref, mid, c, str).endswith(" §")
    assert any(n.startswith("§ decode tok/s b1") and " of FP16 (smollm2-135m-instruct): load " in n
               and n.endswith("no ratio to it is formed.") for n in M.notes(t))


def test_a_record_that_kept_no_load_gives_no_ratio(pipeline_records):
    rtn = copy.deepcopy(pipeline_records["rtn_w4"])
    del rtn["metrics"]["throughput"]["load_average_1m"]  # as records from before eval/throughput.py kept it
    t = T.build_tables([pipeline_records["fp16"], rtn])[0]
    row = _rtn_row(t)
    for mid, c in _decode_cells(t, row):
        assert t.delta(row, mid, c) is None
        assert t.no_ratio[(row.key, mid, c)] == "no load average recorded"
