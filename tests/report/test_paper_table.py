"""The paper table (issue 28) on records the pipeline makes on the embedded SmolLM2 (6 windows of 64 tokens of Milton):
FP16 and RTN w4 g64 with a multiple-choice task (6 items, per-item scores kept) and KL to FP16, RTN w4 g64 sym, RTN
w4 g64 with 8-bit down_proj, RTN w4 g128 (SmolLM2's hidden 576 is no multiple of 128: per-channel fallback), RTN w3
g64 and RTN w4 g64 with an int8 KV cache. Checked: the registry's row order in KV blocks, model x setting columns,
the difference to FP16 and the method-vs-method interval against float64 recomputations from the records'
per-window NLLs, bold on the best (never on a record of other code), and CSV / LaTeX against the markdown."""
from __future__ import annotations

import io
import json
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.confidence import N_RESAMPLES, SEED, Z95, paired_ppl_diff
from harness.labels import method_rank
from report import build as R
from report import paper_render as PR
from report.paper_table import build_paper_table
from report.record_view import TASK_ACC_KEYS
from tests.experiments.test_pipeline import cfg_of
from tests.report.test_provenance import _older_code

PPL = ["eval=ppl", "eval.perplexity.seqlen=64", "eval.perplexity.max_windows=6", "eval.perplexity.batch_size=6",
       "data.splits=[milton]", "progress=false"]
MC = ["eval.tasks.enabled=true", "eval.tasks.names=[next_line_milton_mc4]", "eval.tasks.limit=6",
      "eval.fidelity.enabled=true", "eval.fidelity.max_windows=2"]
RUNS = {
    "fp16": ["quant=fp16", *MC],
    "rtn_w4": ["quant=rtn_w4", *MC],
    "rtn_w4_sym": ["quant=rtn_w4", "quant.zero_point=false"],
    "rtn_w4_down8": ["quant=rtn_w4", "quant.layer_overrides=[{pattern:'*down_proj',w_bit:8}]"],
    "rtn_w4_g128": ["quant=rtn_w4", "quant.group_size=128", "quant.group_fallback=per_channel"],
    "rtn_w3": ["quant=rtn_w3"],
    "rtn_w4_kv8": ["quant=rtn_w4", "kv=int8"],
}


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, dict]:
    from experiments import pipeline

    out = tmp_path_factory.mktemp("paper_records")
    return {name: pipeline.run(cfg_of(PPL + ov + [f"results_dir={out}"])) for name, ov in RUNS.items()}


def _report(tmp_path: Path, recs: list[dict]) -> dict:
    runs = tmp_path / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for rec in recs:
        (runs / f"{rec['run_id']}.json").write_text(json.dumps(rec))
    return R.report(tmp_path, figures=False, notebook=False, out=io.StringIO())


def _md_section(md: str, title_start: str) -> list[str]:
    """The table lines of the markdown section whose title starts with `title_start`."""
    lines = md.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(title_start))
    out = []
    for line in lines[i + 1:]:
        if line.startswith("|"):
            out.append(line)
        elif out:
            break
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split(" | ")]


def _md_grid(md: str, title_start: str) -> tuple[list[str], dict]:
    """(headers, {(block, row label): cells}) of a paper table in markdown."""
    lines = _md_section(md, title_start)
    headers, grid, block = _cells(lines[0]), {}, None
    for line in lines[2:]:
        c = _cells(line)
        if c[0].startswith("*") and not any(c[1:]):
            block = c[0].strip("*")
            continue
        grid[(block, c[0])] = c[1:]
    return headers, grid


def _ppl64(nll: list[float]) -> float:
    return math.exp(math.fsum(nll) / len(nll))


def _paired_ref(a: list[float], b: list[float]) -> tuple[float, tuple[float, float]]:
    """PPL(a) - PPL(b) and its paired percentile-bootstrap interval in plain float64 arithmetic: the harness's
    resampling plan (seeded window indices), each resample's means by math.fsum, numpy's linear percentile by hand."""
    n = len(a)
    idx = np.random.default_rng(SEED).integers(0, n, size=(N_RESAMPLES, n)).tolist()
    diffs = sorted(_ppl64([a[i] for i in row]) - _ppl64([b[i] for i in row]) for row in idx)

    def pct(q: float) -> float:
        pos = q / 100 * (len(diffs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(diffs) - 1)
        return diffs[lo] + (diffs[hi] - diffs[lo]) * (pos - lo)

    return _ppl64(a) - _ppl64(b), (pct(2.5), pct(97.5))


def _nll(rec: dict) -> list[float]:
    return rec["metrics"]["perplexity"]["milton"]["window_nll_mean"]


# ---------------------------------------------------------------------------------------------- layout


def test_rows_follow_the_registry_in_kv_blocks_and_columns_are_model_by_setting(records, tmp_path):
    out = _report(tmp_path, list(records.values()))
    md = (tmp_path / "tables" / "paper.md").read_text()
    assert [p.name for p in out["paper"]] == list(PR.FILES) and all(p.exists() for p in out["paper"])
    headers, grid = _md_grid(md, "### Paper table: token PPL")
    assert headers == ["method", "w4 g128", "w4 g64", "w3 g64"]  # more bits first, then coarser groups
    kv16, kv8 = "KV cache 16-bit (the model's dtype)", "KV cache int8"
    assert list(grid) == [(kv16, "FP16"), (kv16, "RTN"), (kv16, "RTN +overrides"), (kv16, "RTN sym"), (kv8, "RTN")]

    t = build_paper_table(list(records.values()))
    ranks = [(r.block.rank, method_rank(r.method)) for r in t.rows]
    assert ranks == sorted(ranks)  # blocks first, then the registry's row order (FP16 0, RTN 1, ...)
    assert [g.name for g in t.groups] == ["smollm2-135m-instruct"] and t.groups[0].split == "milton"
    # FP16 spans every setting of its model; each quantized record sits in its own setting's column only
    fp16 = records["fp16"]["metrics"]["perplexity"]["milton"]["token_ppl"]
    assert all(c.startswith(f"{fp16:,.2f} ") for c in grid[(kv16, "FP16")])
    placed = {"w4 g128": "rtn_w4_g128", "w4 g64": "rtn_w4", "w3 g64": "rtn_w3"}
    for i, h in enumerate(headers[1:]):
        ppl = records[placed[h]]["metrics"]["perplexity"]["milton"]["token_ppl"]
        assert grid[(kv16, "RTN")][i].replace("**", "").startswith(f"{ppl:,.2f} ")
    kv_ppl = records["rtn_w4_kv8"]["metrics"]["perplexity"]["milton"]["token_ppl"]
    assert grid[(kv8, "RTN")][0] == "–" and grid[(kv8, "RTN")][2] == "–"
    assert grid[(kv8, "RTN")][1].startswith(f"{kv_ppl:,.2f} ")
    # the accuracy table has the same rows, in the same order
    _, acc = _md_grid(md, "### Paper table, accuracy")
    assert list(acc) == list(grid)


def test_the_caption_says_what_the_records_say_about_g128(records):
    t = build_paper_table(list(records.values()))
    q = records["rtn_w4_g128"]["metrics"]["quant"]
    fell, total = len(q["group_fallback_layers"]), q["layers_quantized"]
    assert 0 < fell < total  # q/k/v/o/gate/up take in_features 576; down_proj (1536) keeps its groups of 128
    note = next(n for n in t.notes if "w4 g128" in n)
    assert f"{fell} of {total} quantized Linears fell back to per-channel" in note
    assert "hidden_size 576 is not a multiple of 128" in note
    assert not any("w4 g64" in n or "w3 g64" in n for n in t.notes)  # no fallback there, nothing missing


# ---------------------------------------------------------------------------------------------- numbers


def test_delta_to_fp16_is_the_paired_difference_of_the_window_nlls(records):
    t = build_paper_table(list(records.values()))
    md = PR.ppl_markdown(t)
    _, grid = _md_grid(md, "### Paper table: token PPL")
    ref = _nll(records["fp16"])
    checked = 0
    for row in t.rows:
        for col in t.columns:
            rec = t.record(row, col)
            if rec is None or rec is records["fp16"]:
                assert rec is None or t.delta(row, col) is None
                continue
            d = t.delta(row, col)
            est, (lo, hi) = _paired_ref(_nll(rec), ref)
            assert d.paired and math.isclose(d.estimate, est, rel_tol=1e-12)
            assert math.isclose(d.ci95[0], lo, rel_tol=1e-9) and math.isclose(d.ci95[1], hi, rel_tol=1e-9)
            # the estimate is the difference of the two token PPLs the cells show
            assert math.isclose(d.estimate, rec["metrics"]["perplexity"]["milton"]["token_ppl"]
                                - records["fp16"]["metrics"]["perplexity"]["milton"]["token_ppl"], rel_tol=1e-9)
            cell = grid[(row.block.text, row.text)][t.columns.index(col)]
            assert f"({est:+,.2f}{'†' if lo <= 0 <= hi else ''})" in cell
            checked += 1
    assert checked == 6


def test_method_against_method_is_paired_over_the_same_windows(records, tmp_path):
    a, b = _nll(records["rtn_w4_sym"]), _nll(records["rtn_w4"])
    d = paired_ppl_diff(a, b)
    est, ci = _paired_ref(a, b)
    assert d.n_windows == 6 and math.isclose(d.estimate, est, rel_tol=1e-12)
    assert all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(d.ci95, ci))
    assert d.beyond_noise == (ci[0] > 0 or ci[1] < 0)
    assert paired_ppl_diff(a, b[:-1]) is None  # not the same windows: no paired interval

    _report(tmp_path, list(records.values()))
    t = build_paper_table(list(records.values()))
    pairs = [p for p in t.pairs() if p["column"][1].text == "w4 g64"]
    by_ppl = sorted(("rtn_w4", "rtn_w4_sym", "rtn_w4_down8"), key=lambda k: _ppl64(_nll(records[k])))
    assert [p["against"] for p in pairs] == ["runner-up"] + (["RTN"] if "rtn_w4" not in by_ppl[:2] else [])
    frame = pd.read_csv(tmp_path / "tables" / "paper_pairs.csv")
    md = (tmp_path / "tables" / "paper.md").read_text()
    pair_lines = _md_section(md, "#### Method against method")
    gap_checked = 0
    for p in pairs:
        lowest, other = t.record(p["lowest"], p["column"]), t.record(p["vs"], p["column"])
        assert lowest is records[by_ppl[0]]
        est, (lo, hi) = _paired_ref(_nll(lowest), _nll(other))
        assert math.isclose(p["diff"].estimate, est, rel_tol=1e-12)
        assert math.isclose(p["diff"].ci95[0], lo, rel_tol=1e-9) and math.isclose(p["diff"].ci95[1], hi, rel_tol=1e-9)
        row = frame[(frame.setting == "w4 g64") & (frame.against == p["against"])].iloc[0]
        assert row.lowest == p["lowest"].text and row.other == p["vs"].text
        assert math.isclose(row["diff"], est, rel_tol=1e-9) and bool(row.beyond_noise) == (lo > 0 or hi < 0)
        line = next(c for c in map(_cells, pair_lines[2:]) if c[1] == "w4 g64" and c[3].split(" (")[0] == p["against"])
        assert line[6] == f"{est:+,.2f} [{lo:+,.2f}, {hi:+,.2f}]" and line[7] == ("yes" if lo > 0 or hi < 0 else "no")
        # against plain RTN: the lowest row's share of RTN's gap to FP16, (PPL - FP16) / (PPL_RTN - FP16) in float64
        if other is records["rtn_w4"]:
            fp16 = _ppl64(_nll(records["fp16"]))
            share = (_ppl64(_nll(lowest)) - fp16) / (_ppl64(_nll(other)) - fp16)
            assert math.isclose(p["gap_share"], share, rel_tol=1e-9)
            assert math.isclose(row.gap_share_of_rtn, share, rel_tol=1e-9) and line[8] == f"{100 * share:.0f}%"
            gap_checked += 1
        else:
            assert p["gap_share"] is None and line[8] == "" and pd.isna(row.gap_share_of_rtn)
    assert gap_checked == (by_ppl[0] != "rtn_w4")  # plain RTN is the runner-up or the row compared against


def test_accuracy_difference_is_paired_over_the_items(records):
    t = build_paper_table(list(records.values()))
    col = next(c for c in t.columns if c[1].text == "w4 g64")
    sub = next(s for s in t.subcolumns[0] if s.metric == "acc")
    row = next(r for r in t.rows if r.text == "RTN" and r.block.bits == 16)
    task_a = records["rtn_w4"]["metrics"]["tasks"]["next_line_milton_mc4"]
    task_b = records["fp16"]["metrics"]["tasks"]["next_line_milton_mc4"]
    key = next(k for k in TASK_ACC_KEYS if task_a.get(k) is not None)
    diffs = [float(x) - float(y) for x, y in zip(task_a[f"{key}_items"], task_b[f"{key}_items"])]
    mean = math.fsum(diffs) / len(diffs)
    half = Z95 * statistics.stdev(diffs) / math.sqrt(len(diffs))
    d = t.sub_delta(row, col, sub)
    assert d.paired and math.isclose(d.estimate, 100 * mean, abs_tol=1e-9)
    assert math.isclose(d.ci95[0], 100 * (mean - half), abs_tol=1e-9)
    assert math.isclose(d.ci95[1], 100 * (mean + half), abs_tol=1e-9)
    assert math.isclose(t.sub_value(row, col, sub), 100 * task_a[key], rel_tol=1e-12)
    kl = next(s for s in t.subcolumns[0] if s.metric == "kl_mean")
    assert t.sub_value(row, col, kl) == records["rtn_w4"]["metrics"]["fidelity"]["milton"]["kl_mean"]
    assert t.sub_value(row, (0, t.columns[2][1]), sub) is None  # w3 g64 kept no task scores


# ---------------------------------------------------------------------------------------------- bold and ‡


def _bold_rows(md: str, column: str) -> set:
    headers, grid = _md_grid(md, "### Paper table: token PPL")
    i = headers.index(column) - 1
    return {k for k, cells in grid.items() if cells[i].startswith("**")}


def test_bold_marks_the_best_and_never_a_row_of_other_code(records, tmp_path):
    kv16 = "KV cache 16-bit (the model's dtype)"
    label = {"rtn_w4": "RTN", "rtn_w4_sym": "RTN sym", "rtn_w4_down8": "RTN +overrides"}
    by_ppl = sorted(label, key=lambda k: records[k]["metrics"]["perplexity"]["milton"]["token_ppl"])
    _report(tmp_path / "fresh", list(records.values()))
    md = (tmp_path / "fresh" / "tables" / "paper.md").read_text()
    assert _bold_rows(md, "w4 g64") == {(kv16, label[by_ppl[0]])}
    assert _bold_rows(md, "w3 g64") == set() and _bold_rows(md, "w4 g128") == set()  # one quantized row: no contest
    _, grid = _md_grid(md, "### Paper table: token PPL")
    assert not any("‡" in k[1] or any("‡" in c for c in cells) for k, cells in grid.items())

    # the best row's record made by older code: marked ‡, never bold; the best of this code's rows takes the bold
    recs = {**records, by_ppl[0]: _older_code(records[by_ppl[0]])}
    _report(tmp_path / "stale", list(recs.values()))
    md = (tmp_path / "stale" / "tables" / "paper.md").read_text()
    assert _bold_rows(md, "w4 g64") == {(kv16, label[by_ppl[1]])}
    _, grid = _md_grid(md, "### Paper table: token PPL")
    assert (kv16, f"{label[by_ppl[0]]} ‡") in grid and grid[(kv16, f"{label[by_ppl[0]]} ‡")][1].endswith(" ‡")
    frame = pd.read_csv(tmp_path / "stale" / "tables" / "paper.csv")
    stale = frame[frame.made_by_other_code.notna()]
    assert list(stale.run_id) == [records[by_ppl[0]]["run_id"]] and not stale.best.any()


# ---------------------------------------------------------------------------------------------- formats agree


def test_csv_and_latex_agree_with_the_markdown(records, tmp_path):
    _report(tmp_path, list(records.values()))
    md = (tmp_path / "tables" / "paper.md").read_text()
    tex = (tmp_path / "tables" / "paper.tex").read_text()
    frame = pd.read_csv(tmp_path / "tables" / "paper.csv")
    headers, grid = _md_grid(md, "### Paper table: token PPL")
    assert len(frame) == sum(c != "–" for cells in grid.values() for c in cells)
    for _, r in frame.iterrows():
        cell = grid[(r.kv_cache, r.method)][headers.index(r.setting) - 1]
        value = f"{r.token_ppl:,.2f}"
        assert cell.startswith(f"**{value}**" if r.best else value)
        assert f"[{r.ci95_lo:,.1f}, {r.ci95_hi:,.1f}]" in cell
        if pd.notna(r.vs_fp16):
            assert f"({r.vs_fp16:+,.2f}" in cell and r.vs_fp16_paired
    # LaTeX: the same rows in the same order, the same values, bold where the markdown is bold
    body = tex.split(r"\midrule", 1)[1].split(r"\bottomrule")[0]
    tex_rows = [line for line in body.splitlines() if "&" in line and not line.startswith(r"\multicolumn")]
    assert [line.split(" & ")[0] for line in tex_rows] == [k[1] for k in grid]
    for line, cells in zip(tex_rows, grid.values()):
        tcells = [c.strip().removesuffix(r"\\").strip() for c in line.split(" & ")[1:]]
        for t_cell, m_cell in zip(tcells, cells):
            if m_cell == "–":
                assert t_cell == "--"
                continue
            value = re.match(r"\**([\d,.]+)", m_cell).group(1)
            assert t_cell.startswith(rf"\textbf{{{value}}}" if m_cell.startswith("**") else value)
    assert r"\begin{tabular}{lrrr}" in tex and r"\toprule" in tex and r"\multicolumn{3}{c}{smollm2-135m-instruct}" in tex
    # the accuracy table: every number of its CSV is in its markdown cell
    acc = pd.read_csv(tmp_path / "tables" / "paper_accuracy.csv")
    a_headers, a_grid = _md_grid(md, "### Paper table, accuracy")
    for _, r in acc.iterrows():
        cell = a_grid[(r.kv_cache, r.method)][a_headers.index(f"{r.setting} {r.header}") - 1]
        digits = {"acc": 1, "kl_mean": 4, "top1_agreement": 3, "weight_bytes": 1}[r.quantity]
        assert cell.replace("**", "").startswith(f"{r.value:,.{digits}f}")


def test_the_console_summary_lists_the_paper_files(records, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    for rec in (records["fp16"], records["rtn_w4"]):
        (runs / f"{rec['run_id']}.json").write_text(json.dumps(rec))
    assert R.main(["--results-dir", str(tmp_path), "--no-figures", "--no-notebook"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  paper:"))
    assert all(str(tmp_path / "tables" / f) in line for f in PR.FILES)
