"""Tables (report.tables.Table) as markdown, CSV and LaTeX (booktabs), with the notes every table carries: the
model and what its FP16 is, the data and its hashes, the protocol of each metric, how to read deltas and bold."""
from __future__ import annotations

import re
from typing import Callable

from report.record_view import METRICS, Metric, dig, hardware_name, is_reference, is_synthetic
from report.tables import NO_RATIO_MARK, STALE_MARK, Column, Row, Table

# --------------------------------------------------------------------------------------------------------------------
# words around a table


def bad_records_markdown(bad) -> str:
    """A warning above the tables naming every record the schema refused (harness.record_schema.BadRecord: its path
    and reasons), or "" when there is none."""
    if not bad:
        return ""
    lines = [f"> **Warning: {len(bad)} record{'s' if len(bad) > 1 else ''} left out** (harness/record_schema.py): "
             f"no number of {'theirs' if len(bad) > 1 else 'its'} is in the tables below; fix, recompute or remove "
             f"{'them' if len(bad) > 1 else 'it'}.", ">"]
    lines += [f"> - `{b.path}`: {'; '.join(b.reasons)}" for b in bad]
    return "\n".join(lines) + "\n\n"


def stale_records(tables: list[Table]) -> list[str]:
    """"<run_id> (<row>, <model>): made by other code (<parts> changed)" for every record shown that this checkout's
    code did not make (Table.stale), table by table."""
    return [f"{r.records[mid].get('run_id')} ({r.text}, {t.model_name(mid)}): {t.stale[(r.key, mid)]}"
            for t in tables for r in t.rows for mid in r.records if (r.key, mid) in t.stale]


def stale_summary(tables: list[Table]) -> str:
    """The one line that lists the stale records of a report ("" when there is none)."""
    stale = stale_records(tables)
    if not stale:
        return ""
    n = sum(len(r.records) for t in tables for r in t.rows)
    return (f"{len(stale)} of {n} records shown were made by other code than this checkout's (rows marked "
            f"{STALE_MARK}; recompute them to refresh): " + "; ".join(stale))


def stale_markdown(tables: list[Table]) -> str:
    """The stale summary as a note above the tables, or ""."""
    line = stale_summary(tables)
    return f"> **Stale:** {line}\n\n" if line else ""


def title(t: Table) -> str:
    s = t.settings
    models = ", ".join(t.model_name(m) for m in t.models)
    splits = ", ".join(s.get("data.splits") or ())
    return f"Table {t.index}: {models} on {s.get('data.name')} ({splits})"


def notes(t: Table) -> list[str]:
    """The lines under a table: what each model and its FP16 are, the data, each metric's protocol, how to read it."""
    s = t.settings
    present = {c.metric for _, c in t.columns}
    out = []
    for mid in t.models:  # first: what "FP16" is (for the embedded model, a dequantized Q4_1 GGUF)
        rec = t.any_record(mid)
        note = dig(rec, "provenance", "reference_note") or dig(rec, "config", "model", "reference_note")
        origin = dig(rec, "provenance", "model_origin") or dig(rec, "config", "model", "path")
        line = f"Model {t.model_name(mid)}: {origin} (sha {mid[1]}, run in {s.get('model.dtype')})."
        if note:
            line += f" {note.rstrip('.')}."
        if is_synthetic(rec):
            line += " SYNTHETIC random weights: quality columns are left out for this model."
        out.append(line)
    where = sorted({f"{hardware_name(rec)}, model.device={dig(rec, 'config', 'model', 'device') or 'cpu'}"
                    for r in t.rows for rec in r.records.values()})
    out.append(f"Computed on: {'; '.join(where)}" + (" — the kernels differ by machine: compare rows of different "
                                                      "machines with that in mind" if len(where) > 1 else "") + ".")
    mw = s.get("eval.perplexity.max_windows")
    shas = ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in s.items() if k.startswith("data_sha256.") and v)
    out.append(f"Data: {s.get('data.name')}" + (f" (sha256 prefix: {shas})." if shas else "."))
    out.append(f"Token PPL: paper protocol (GPTQ/AWQ): non-overlapping windows of {s.get('eval.perplexity.seqlen')} "
               f"tokens, remainder dropped, {'every window' if mw is None else f'first {mw} windows'} of each split.")
    bos = s.get("bos_token_id")
    out.append("BOS: none (the tokenizer adds none; data.add_bos)." if bos is None else
               f"BOS: token {bos} heads every window and calibration sample (then seqlen-1 text tokens, all scored; "
               f"data.add_bos).")
    if "word_ppl" in present:
        out.append(f"Word PPL: lm-eval rolling loglikelihood, max_length {s.get('eval.word_perplexity.max_length')}, "
                   f"first {s.get('eval.word_perplexity.max_chars')} characters of each split.")
    if "kl_mean" in present:
        out.append(f"KL: mean per-token KL(FP16 ‖ quantized) over {s.get('eval.fidelity.max_windows')} windows per split.")
    if "acc" in present:
        limit = s.get("eval.tasks.limit")
        out.append(f"Accuracy: lm-eval, {s.get('eval.tasks.num_fewshot')}-shot, "
                   f"{'all examples' if limit is None else f'first {limit} examples'} of each task, in %.")
        mi = sorted({task for r in t.rows for rec in r.records.values()
                     for task, v in (dig(rec, "metrics", "tasks", default={}) or {}).items()
                     if isinstance(v, dict) and v.get("acc_mutual_info") is not None})
        if mi:
            out.append(f"{', '.join(mi)}: accuracy by mutual information (lm-eval acc_mutual_info: the choice with the "
                       f"highest log P(choice | context) − log P(choice)).")
    if "weight_bytes" in present:
        out.append(f"Weights: stored bytes of all weights incl. group scales/zeros, in {t.weight_unit[0]} "
                   f"(10{'⁹' if t.weight_unit[1] == 1e9 else '⁶'} bytes).")
    if "kv_bytes_per_token" in present:
        out.append("KV B/token: K+V cache bytes per token of context (all layers), incl. fp16 scale+zero of quantized KV.")
    if "decode_tok_s" in present:
        devs = sorted({c.key[1] for _, c in t.columns if c.metric == "decode_tok_s"})
        paths = sorted({str(dig(rec, "metrics", "throughput", "weights")) for r in t.rows for rec in r.records.values()
                        if dig(rec, "metrics", "throughput", "weights") and not is_reference(rec)})
        out.append(f"Decode tok/s at batch b (prompt {s.get('eval.throughput.prompt_len')}, "
                   f"{s.get('eval.throughput.gen_len')} new tokens) on {'; '.join(devs)}"
                   + (f"; quantized weights ran as: {'; '.join(paths)}." if paths else "."))
    out.append("↓ lower is better, ↑ higher is better; bold = best among the quantized configs (of this code, speeds "
               "measured without excess load); (+x) = difference to FP16 of the same model, (0.42×) = ratio to FP16; "
               "– = not measured.")
    cells = [(r, mid, c) for r in t.rows for mid, c in t.columns]
    if any(t.interval(*k) for k in cells):
        out.append(f"[lo, hi] = 95% interval of token PPL: {_ci_method(t)}.")
    if any(t.stderr(*k) is not None for k in cells):
        out.append("± = standard error of the accuracy (over the task's examples).")
    if any(t.not_significant(*k) for k in cells):
        out.append("† = difference to FP16 not significant at 95% (its interval contains 0: token PPL paired over the "
                   "same windows, bootstrap; accuracy paired over the same items where both records kept per-item scores, else "
                   "from both standard errors; normal approximation).")
    out.extend(stale_notes(t))
    out.extend(no_ratio_notes(t))
    out.extend(t.dropped)
    return out


def latex_head(source: str, spans: list[tuple[str, int]], first: str, headers: list[str]) -> list[str]:
    """A booktabs table's opening lines: column groups `spans` (name, width) over the headers (already escaped),
    each group ruled, then the first column's name `first`, the headers and the mid rule."""
    lines = [rf"% generated by {source}; needs \usepackage{{booktabs}}", r"\begin{table}[t]", r"\centering",
             r"\small", r"\begin{tabular}{l" + "r" * len(headers) + "}", r"\toprule",
             " & " + " & ".join(rf"\multicolumn{{{n}}}{{c}}{{{tex_escape(name)}}}" for name, n in spans) + r" \\"]
    start, rules = 2, []
    for _, n in spans:
        rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    return lines + [" ".join(rules), f"{first} & " + " & ".join(headers) + r" \\", r"\midrule"]


def stale_sentence(what: str, rec: dict, why: str) -> str:
    """The note under a table for one record made by other code than this checkout's (`what`: its row and column)."""
    return (f"{STALE_MARK} {what}: record {rec.get('run_id')} ({dig(rec, 'provenance', 'created', default='?')}) was "
            f"{why}, so its numbers are not what this code computes; run its config again (experiments.run) to "
            f"replace it.")


def stale_notes(t: Table) -> list[str]:
    """One line per record of the table made by other code than this checkout's (Table.stale)."""
    return [stale_sentence(f"{r.text} ({t.model_name(mid)})", rec, t.stale[(r.key, mid)])
            for r in t.rows for mid, rec in r.records.items() if t.stale.get((r.key, mid))]


def no_ratio_notes(t: Table) -> list[str]:
    """One line per row, model and reason of a speed shown without its ratio to FP16 (Table.no_ratio)."""
    seen: dict = {}
    for row in t.rows:
        for mid, col in t.columns:
            why = t.no_ratio.get((row.key, mid, col))
            if why:
                seen.setdefault((row.text, t.model_name(mid), why, row.reference), []).append(col)
    out = []
    for (text, model, why, ref), cols in seen.items():
        what = ", ".join(dict.fromkeys(c.header(t.weight_unit[0]) for c in cols))
        out.append(f"{NO_RATIO_MARK} {what} of {text} ({model}): {why}, so "
                   + ("no ratio to it is formed." if ref else "no ratio to FP16 is formed."))
    return out


def _ci_method(t: Table) -> str:
    methods = sorted({str(v.get("ci95_method")) for r in t.rows for rec in r.records.values()
                      for v in (dig(rec, "metrics", "perplexity", default={}) or {}).values()
                      if isinstance(v, dict) and v.get("ci95_method")})
    return "; ".join(methods) or "bootstrap over windows"


def _arrow(m: Metric) -> str:
    return {"lower": " ↓", "higher": " ↑"}.get(m.better or "", "")


def headers(t: Table) -> list[str]:
    devs = {c.key[1] for _, c in t.columns if c.metric == "decode_tok_s"}
    multi = len(t.models) > 1
    out = []
    for mid, c in t.columns:
        h = c.header(t.weight_unit[0], show_device=len(devs) > 1) + _arrow(METRICS.get(c.metric))
        out.append(f"{t.model_name(mid)}: {h}" if multi else h)
    return out


def cell(t: Table, row: Row, mid, col: Column, bold: Callable[[str], str]) -> str:
    m = METRICS.get(col.metric)
    v = t.value(row, mid, col)
    if v is None:
        return "–"
    s = f"{t.display(col, v):,.{m.digits}f}"
    if row.key in t.best(mid, col):
        s = bold(s)
    ci, se = t.interval(row, mid, col), t.stderr(row, mid, col)
    if ci is not None:  # one decimal fewer than the value: the interval's own precision is coarser
        s += f" [{ci[0]:,.{max(m.digits - 1, 0)}f}, {ci[1]:,.{max(m.digits - 1, 0)}f}]"
    elif se is not None:
        s += f" ± {se:,.{m.digits}f}"
    if (row.key, mid, col) in t.no_ratio:  # a speed shown alone: the note under the table says why
        return s + f" {NO_RATIO_MARK}"
    d = t.delta(row, mid, col)
    if d is not None and m.delta == "ratio" and abs(d - 1) >= 0.005:  # an unchanged quantity needs no "1.00×"
        s += f" ({d:.2f}×)"
    elif d is not None and m.delta == "diff":
        s += f" ({d:+.{m.digits}f}{'†' if t.not_significant(row, mid, col) else ''})"
    return s


# --------------------------------------------------------------------------------------------------------------------
# renderers


def to_markdown(t: Table) -> str:
    hs = ["config"] + headers(t)
    lines = [f"### {title(t)}", "", "| " + " | ".join(hs) + " |", "|" + "|".join([":---"] + ["---:"] * (len(hs) - 1)) + "|"]
    for r in t.rows:
        cells = [cell(t, r, mid, c, lambda s: f"**{s}**") for mid, c in t.columns]
        lines.append("| " + " | ".join([t.label(r)] + cells) + " |")
    lines.append("")
    lines.extend(f"- {n}" for n in notes(t))
    return "\n".join(lines) + "\n"


def to_csv_frame(t: Table):
    """Raw numbers (not rounded): one row per config, a value and a vs-FP16 column per (model, metric)."""
    import pandas as pd

    data = []
    for r in t.rows:
        d = {"config": r.text}
        for (mid, c), h in zip(t.columns, headers(t)):
            h = h.replace(" ↓", "").replace(" ↑", "")
            if len(t.models) == 1:
                h = f"{t.model_name(mid)}: {h}"
            d[h] = t.display(c, t.value(r, mid, c))
            # uncertainty columns only where some row of the table has them (older records: none, as before)
            if any(t.interval(x, mid, c) for x in t.rows):
                ci = t.interval(r, mid, c)
                d[f"{h} ci95 lo"], d[f"{h} ci95 hi"] = ci if ci else (None, None)
            if any(t.stderr(x, mid, c) is not None for x in t.rows):
                d[f"{h} stderr"] = t.stderr(r, mid, c)
            if METRICS.get(c.metric).delta:
                d[f"{h} vs FP16 ({METRICS.get(c.metric).delta})"] = t.delta(r, mid, c)
                if any(t.delta_interval(x, mid, c) for x in t.rows):
                    ci = t.delta_interval(r, mid, c)
                    d[f"{h} vs FP16 ci95 lo"], d[f"{h} vs FP16 ci95 hi"] = ci if ci else (None, None)
            if any(k[1:] == (mid, c) for k in t.no_ratio):
                d[f"{h} no ratio, why"] = t.no_ratio.get((r.key, mid, c))
        if t.stale:
            d["made by other code"] = "; ".join(f"{mid[0]}: {t.stale[(r.key, mid)]}" for mid in r.records
                                                if (r.key, mid) in t.stale) or None
        d["run_ids"] = " ".join(rec.get("run_id", "") for rec in r.records.values())
        data.append(d)
    return pd.DataFrame(data)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "↓": r"$\downarrow$", "↑": r"$\uparrow$",
        "×": r"$\times$", "⁶": r"$^{6}$", "⁹": r"$^{9}$", "‖": r"$\|$", "α": r"$\alpha$", "–": "--",
        "±": r"$\pm$", "†": r"$^\dagger$", "‡": r"$^\ddagger$", "§": r"\S{}"}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def to_latex(t: Table) -> str:
    """booktabs table: a header row of models (one multicolumn each) over a row of metrics."""
    hs = [tex_escape(h.split(": ", 1)[1] if len(t.models) > 1 else h) for h in headers(t)]
    spans = []
    for mid in t.models:
        n = sum(1 for m, _ in t.columns if m == mid)
        if n:
            spans.append((t.model_name(mid), n))
    lines = latex_head("python -m report", spans, "config", hs)
    for r in t.rows:
        cells = []
        for mid, c in t.columns:
            s = cell(t, r, mid, c, lambda x: "\0B" + x + "\0E")
            s = tex_escape(s).replace("\0B", r"\textbf{").replace("\0E", "}")
            s = re.sub(r" \((.*)\)$", r" {\\scriptsize(\1)}", s).replace("(-", "($-$")
            cells.append(s)
        lines.append(tex_escape(t.label(r)) + " & " + " & ".join(cells) + r" \\")
        if r.reference:
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}",
              r"\caption{" + tex_escape(title(t).split(": ", 1)[1]) + ". " + " ".join(tex_escape(n) for n in notes(t)) + "}",
              r"\end{table}"]
    return "\n".join(lines) + "\n"
