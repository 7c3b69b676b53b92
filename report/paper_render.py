"""The paper table (report/paper_table.py) as markdown, CSV and LaTeX (booktabs), and the files `python -m report`
writes of it: <results>/tables/paper.md (the PPL table, the method-vs-method listing and the accuracy table),
paper.tex (both tables), paper.csv, paper_pairs.csv and paper_accuracy.csv (raw numbers, one row per cell)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from report.paper_table import PaperRow, PaperTable, SubColumn, build_paper_table
from report.record_view import dig, hardware_name, is_synthetic
from report.render import latex_head, stale_sentence, tex_escape
from report.tables import STALE_MARK

FILES = ("paper.md", "paper.tex", "paper.csv", "paper_pairs.csv", "paper_accuracy.csv")


def _header(t: PaperTable, col) -> str:
    return f"{t.group_name(col[0])}: {col[1].text}" if len(t.groups) > 1 else col[1].text


def _label(t: PaperTable, row: PaperRow) -> str:
    return f"{row.text} {STALE_MARK}" if t.row_stale(row) else row.text


# --------------------------------------------------------------------------------------------------------------------
# cells


def ppl_cell(t: PaperTable, row: PaperRow, col, bold: Callable[[str], str] = lambda s: f"**{s}**") -> str:
    """"185.29 [136.9, 265.8] (+35.67)": token PPL (bold: the column's lowest in its block), its 95% interval, its
    difference to FP16 (paired over the same windows; † its interval contains 0); ‡ a record of other code."""
    v = t.ppl(row, col)
    if v is None:
        return "–"
    s = bold(f"{v:,.2f}") if row.key in t.best(row.block, col) else f"{v:,.2f}"
    ci = t.ppl_ci95(row, col)
    if ci is not None:
        s += f" [{ci[0]:,.1f}, {ci[1]:,.1f}]"
    d = t.delta(row, col)
    if d is not None:
        s += f" ({d.estimate:+,.2f}{'†' if d.not_significant else ''}{'' if d.paired else ', unpaired'})"
    return s + (f" {STALE_MARK}" if t.is_stale(t.record(row, col)) else "")


def sub_cell(t: PaperTable, row: PaperRow, col, sub: SubColumn, bold: Callable[[str], str] = lambda s: f"**{s}**") -> str:
    v = t.sub_value(row, col, sub)
    if v is None:
        return "–"
    digits = {"acc": 1, "kl_mean": 4, "top1_agreement": 3, "weight_bytes": 1}[sub.metric]
    s = f"{v:,.{digits}f}"
    s = bold(s) if row.key in t.sub_best(row.block, col, sub) else s
    se = t.sub_stderr(row, col, sub)
    if se is not None:
        s += f" ± {se:.1f}"
    d = t.sub_delta(row, col, sub)
    if d is not None and sub.metric == "weight_bytes":
        s += f" ({d.estimate:.2f}×)"
    elif d is not None:
        s += f" ({d.estimate:+.1f}{'†' if d.not_significant else ''})"
    return s + (f" {STALE_MARK}" if t.is_stale(t.record(row, col)) else "")


def _sub_columns(t: PaperTable) -> list:
    return [(col, sub) for col in t.columns for sub in t.subcolumns.get(col[0], [])]


# --------------------------------------------------------------------------------------------------------------------
# words around the tables


def ppl_title(t: PaperTable) -> str:
    splits = sorted({g.split for g in t.groups if g.split})
    data = sorted({str(g.settings.get("data.name")) for g in t.groups})
    return (f"Paper table: token PPL ↓ on {', '.join(splits)} ({', '.join(data)}) by method and KV cache (rows) and "
            f"model × weight setting (columns)")


def group_notes(t: PaperTable) -> list[str]:
    """What each column group is: the model and its FP16, the split and windows, the machines."""
    out = []
    for g in t.groups:
        rec = g.records[0]
        s = g.settings
        mw = s.get("eval.perplexity.max_windows")
        note = dig(rec, "provenance", "reference_note") or dig(rec, "config", "model", "reference_note")
        origin = dig(rec, "provenance", "model_origin") or dig(rec, "config", "model", "path")
        line = (f"{g.name}: {origin} (sha {g.model[1]}, run in {s.get('model.dtype')}); token PPL on {g.split}, "
                f"{'every window' if mw is None else f'the first {mw} windows'} of {s.get('eval.perplexity.seqlen')} "
                f"tokens (GPTQ/AWQ protocol: non-overlapping, remainder dropped)"
                + (f", BOS token {s['bos_token_id']} at the head of each" if s.get("bos_token_id") is not None else "")
                + ".")
        if note:
            line += f" {note.rstrip('.')}."
        if is_synthetic(rec):
            line += " SYNTHETIC random weights: its quality numbers mean nothing."
        machines = sorted({hardware_name(rec) for r in t.rows for (gi, _), rec in r.records.items()
                           if t.groups[gi] is g})
        line += f" Computed on: {'; '.join(machines)}" + (" (rows of different machines: their kernels differ)"
                                                          if len(machines) > 1 else "") + "."
        out.append(line)
    return out


def legend(t: PaperTable) -> list[str]:
    out = ["Rows: methods in the registry's row order (quant/registry.py), one block per KV-cache option; a method's "
           "weight setting is its column (FP16 rows span every setting of their model)."]
    cells = [(r, c) for r in t.rows for c in t.columns]
    if any(t.ppl_ci95(*k) for k in cells):
        out.append("[lo, hi] = 95% interval of token PPL (percentile bootstrap over windows, 1000 resamples, seed 0).")
    out.append("(+x) = PPL minus the model's FP16 PPL (16-bit weights and KV), paired over the same windows; † = its "
               "paired 95% interval contains 0 (not beyond noise); 'unpaired' = a record kept no per-window NLLs, so "
               "the difference has no interval.")
    out.append("Bold = the lowest PPL of the column within its block, among quantized-weight rows made by this "
               f"checkout's code (never a {STALE_MARK} cell), where two or more compete; – = no record.")
    return out


def stale_notes(t: PaperTable) -> list[str]:
    return [stale_sentence(f"{r.text} ({r.block.text}; {t.group_name(gi)}{', ' + s if s else ''})", rec,
                           t.stale[rec.get("run_id")])
            for r in t.rows for (gi, s), rec in r.records.items() if t.stale.get(rec.get("run_id"))]


def ppl_notes(t: PaperTable) -> list[str]:
    return group_notes(t) + t.notes + legend(t) + stale_notes(t)


# --------------------------------------------------------------------------------------------------------------------
# markdown


def _md_table(t: PaperTable, headers: list[str], cells: Callable[[PaperRow], list[str]]) -> list[str]:
    lines = ["| " + " | ".join(["method"] + headers) + " |", "|" + "|".join([":---"] + ["---:"] * len(headers)) + "|"]
    blocks = t.blocks()
    for block in blocks:
        if len(blocks) > 1:
            lines.append("| " + " | ".join([f"*{block.text}*"] + [""] * len(headers)) + " |")
        for r in (r for r in t.rows if r.block == block):
            lines.append("| " + " | ".join([_label(t, r)] + cells(r)) + " |")
    return lines


def ppl_markdown(t: PaperTable) -> str:
    lines = [f"### {ppl_title(t)}", ""]
    lines += _md_table(t, [_header(t, c) for c in t.columns], lambda r: [ppl_cell(t, r, c) for c in t.columns])
    lines += [""] + [f"- {n}" for n in ppl_notes(t)]
    return "\n".join(lines) + "\n"


def _pair_line(t: PaperTable, p: dict) -> list[str]:
    d = p["diff"]
    mark = lambda r: f"{r.text} {STALE_MARK}" if t.is_stale(t.record(r, p["column"])) else r.text  # noqa: E731
    return [p["block"].text, _header(t, p["column"]) if len(t.groups) > 1 else p["column"][1].text, mark(p["lowest"]),
            p["against"] + (" (RTN)" if p["against"] == "runner-up" and p["vs_rtn"] else ""),
            mark(p["vs"]), f"{p['ppl_a']:,.2f} vs {p['ppl_b']:,.2f}",
            "–" if d is None else f"{d.estimate:+,.2f} [{d.ci95[0]:+,.2f}, {d.ci95[1]:+,.2f}]",
            "– (no per-window NLLs)" if d is None else ("yes" if d.beyond_noise else "no"),
            "" if p["gap_share"] is None else f"{100 * p['gap_share']:.0f}%"]


def pairs_markdown(t: PaperTable) -> str:
    ps = t.pairs()
    lines = ["#### Method against method: is the lowest PPL of a column beyond noise?", ""]
    if not ps:
        return "\n".join(lines + ["No column holds two quantized rows.", ""])
    lines += ["| KV cache | column | lowest PPL | against | other | PPL | difference [95% interval] | beyond noise "
              "| gap / RTN gap |", "|:---|:---|:---|:---|:---|---:|---:|:---|---:|"]
    lines += ["| " + " | ".join(_pair_line(t, p)) + " |" for p in ps]
    lines += ["", "- Difference = PPL(lowest) − PPL(other) over the same windows; its 95% interval is a paired "
                  "percentile bootstrap (each resample draws one set of windows and scores both runs on it: "
                  "harness.confidence.paired_ppl_diff); beyond noise = the interval excludes 0. Rows of every "
                  f"record are ranked here, {STALE_MARK} ones included (marked).",
              "- gap / RTN gap (against RTN) = (PPL(lowest) − PPL(FP16)) / (PPL(RTN) − PPL(FP16)), each gap paired "
              "over the same windows: how much of round-to-nearest's loss the best method leaves."]
    return "\n".join(lines) + "\n"


def accuracy_title(t: PaperTable) -> str:
    return "Paper table, accuracy and fidelity: task accuracy ↑, KL to FP16 ↓, top-1 agreement with FP16 ↑, weights"


def accuracy_notes(t: PaperTable) -> list[str]:
    subs = [s for _, s in _sub_columns(t)]
    out = ["Same rows and blocks as the PPL table; each model × setting column group holds the quantities below."]
    if any(s.metric == "acc" for s in subs):
        out.append("Accuracy: lm-eval, in %, ± its standard error; (+x) = points to FP16, paired over the same items "
                   "where both records kept per-item scores, else from both standard errors; † = that 95% interval "
                   "contains 0.")
    if any(s.metric in ("kl_mean", "top1_agreement") for s in subs):
        out.append("KL: mean per-token KL(FP16 ‖ quantized); top-1 agree: the fraction of positions whose most likely "
                   "token is FP16's; both on the primary split, over the fidelity evaluator's windows.")
    if any(s.metric == "weight_bytes" for s in subs):
        out.append("Weights: stored bytes of all weights incl. group scales and zeros, in MB (10⁶ bytes); (0.42×) = "
                   "ratio to FP16.")
    out.append(f"Bold = the best of the column within its block among quantized-weight rows of this code (never "
               f"{STALE_MARK}); weights are not ranked.")
    return out


def accuracy_markdown(t: PaperTable) -> str:
    subs = _sub_columns(t)
    lines = [f"### {accuracy_title(t)}", ""]
    if not subs:
        return "\n".join(lines + ["No record holds task accuracy, KL or weight bytes.", ""])
    lines += _md_table(t, [f"{_header(t, c)} {s.header}" for c, s in subs],
                       lambda r: [sub_cell(t, r, c, s) for c, s in subs])
    lines += [""] + [f"- {n}" for n in accuracy_notes(t)]
    return "\n".join(lines) + "\n"


def to_markdown(t: PaperTable) -> str:
    return "\n".join([ppl_markdown(t), pairs_markdown(t), accuracy_markdown(t)])


# --------------------------------------------------------------------------------------------------------------------
# CSV: raw numbers, one row per cell


def _base(t: PaperTable, r: PaperRow, col) -> dict:
    g = t.groups[col[0]]
    return {"kv_cache": r.block.text, "method": r.text, "quant_method": r.method, "model": g.name,
            "model_sha": g.model[1], "setting": col[1].text, "split": g.split}


def ppl_frame(t: PaperTable):
    import pandas as pd

    data = []
    for r in t.rows:
        for col in t.columns:
            rec = t.record(r, col)
            if rec is None:
                continue
            ci, d = t.ppl_ci95(r, col), t.delta(r, col)
            data.append({**_base(t, r, col), "token_ppl": t.ppl(r, col),
                         "ci95_lo": ci[0] if ci else None, "ci95_hi": ci[1] if ci else None,
                         "vs_fp16": d.estimate if d else None,
                         "vs_fp16_ci95_lo": d.ci95[0] if d and d.ci95 else None,
                         "vs_fp16_ci95_hi": d.ci95[1] if d and d.ci95 else None,
                         "vs_fp16_paired": d.paired if d else None, "best": r.key in t.best(r.block, col),
                         "made_by_other_code": t.stale.get(rec.get("run_id")), "run_id": rec.get("run_id")})
    return pd.DataFrame(data)


def pairs_frame(t: PaperTable):
    import pandas as pd

    data = []
    for p in t.pairs():
        d, col = p["diff"], p["column"]
        data.append({"kv_cache": p["block"].text, "model": t.group_name(col[0]), "setting": col[1].text,
                     "split": t.groups[col[0]].split, "lowest": p["lowest"].text, "against": p["against"],
                     "other": p["vs"].text, "ppl_lowest": p["ppl_a"], "ppl_other": p["ppl_b"],
                     "diff": d.estimate if d else None, "diff_ci95_lo": d.ci95[0] if d else None,
                     "diff_ci95_hi": d.ci95[1] if d else None, "n_windows": d.n_windows if d else None,
                     "beyond_noise": d.beyond_noise if d else None, "gap_share_of_rtn": p["gap_share"],
                     "made_by_other_code": p["stale"],
                     "run_id_lowest": t.record(p["lowest"], col).get("run_id"),
                     "run_id_other": t.record(p["vs"], col).get("run_id")})
    return pd.DataFrame(data)


def accuracy_frame(t: PaperTable):
    import pandas as pd

    data = []
    for r in t.rows:
        for col, sub in _sub_columns(t):
            v = t.sub_value(r, col, sub)
            if v is None:
                continue
            d, rec = t.sub_delta(r, col, sub), t.record(r, col)
            data.append({**_base(t, r, col), "quantity": sub.metric, "key": sub.key, "header": sub.header,
                         "value": v, "stderr": t.sub_stderr(r, col, sub),
                         "vs_fp16": d.estimate if d else None, "vs_fp16_kind": None if d is None else
                         ("ratio" if sub.metric == "weight_bytes" else "diff"),
                         "vs_fp16_ci95_lo": d.ci95[0] if d and d.ci95 else None,
                         "vs_fp16_ci95_hi": d.ci95[1] if d and d.ci95 else None,
                         "vs_fp16_paired": d.paired if d else None, "best": r.key in t.sub_best(r.block, col, sub),
                         "made_by_other_code": t.stale.get(rec.get("run_id")), "run_id": rec.get("run_id")})
    return pd.DataFrame(data)


# --------------------------------------------------------------------------------------------------------------------
# LaTeX (booktabs)


def _tex_cell(text: str) -> str:
    """A markdown cell as LaTeX: bold kept, the interval and the difference in small type."""
    bold = text.startswith("**")
    text = text.replace("**", "")
    head, sep, rest = text.partition(" ")
    head = tex_escape(head)
    out = rf"\textbf{{{head}}}" if bold else head
    return out + (rf" {{\scriptsize {tex_escape(rest)}}}".replace("(-", "($-$") if sep else "")


def _latex(t: PaperTable, title: str, spans: list, headers: list[str], cells: Callable[[PaperRow], list[str]],
           notes: list[str]) -> str:
    n = len(headers)
    lines = latex_head("python -m report (report/paper_render.py)", spans, "method", [tex_escape(h) for h in headers])
    blocks = t.blocks()
    for i, block in enumerate(blocks):
        if len(blocks) > 1:
            if i:
                lines.append(r"\midrule")
            lines.append(rf"\multicolumn{{{n + 1}}}{{l}}{{\textit{{{tex_escape(block.text)}}}}} \\")
        for r in (r for r in t.rows if r.block == block):
            lines.append(tex_escape(_label(t, r)) + " & " + " & ".join(_tex_cell(c) for c in cells(r)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}",
              r"\caption{" + tex_escape(title) + ". " + " ".join(tex_escape(x) for x in notes) + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _spans(t: PaperTable, per_column: Callable[[tuple], int]) -> list:
    spans: dict = {}
    for col in t.columns:
        spans[col[0]] = spans.get(col[0], 0) + per_column(col)
    return [(t.group_name(g), k) for g, k in spans.items() if k]


def ppl_latex(t: PaperTable) -> str:
    return _latex(t, ppl_title(t), _spans(t, lambda c: 1), [c[1].text for c in t.columns],
                  lambda r: [ppl_cell(t, r, c) for c in t.columns], ppl_notes(t))


def accuracy_latex(t: PaperTable) -> str:
    subs = _sub_columns(t)
    if not subs:
        return ""
    return _latex(t, accuracy_title(t), _spans(t, lambda c: len(t.subcolumns.get(c[0], []))),
                  [f"{c[1].text} {s.header}" for c, s in subs], lambda r: [sub_cell(t, r, c, s) for c, s in subs],
                  accuracy_notes(t))


def to_latex(t: PaperTable) -> str:
    return ppl_latex(t) + ("\n" + accuracy_latex(t) if _sub_columns(t) else "")


# --------------------------------------------------------------------------------------------------------------------
# files


def write(records: list[dict], out_dir: Path, preamble: str = "") -> tuple[list[Path], PaperTable]:
    """paper.md (after `preamble`: the report's warnings), paper.tex, paper.csv, paper_pairs.csv, paper_accuracy.csv
    under `out_dir`; returns their paths and the table."""
    t = build_paper_table(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f for f in FILES]
    paths[0].write_text(preamble + to_markdown(t))
    paths[1].write_text(to_latex(t))
    for p, frame in zip(paths[2:], (ppl_frame(t), pairs_frame(t), accuracy_frame(t))):
        frame.to_csv(p, index=False)
    return paths, t
