"""Run records -> paper-style tables: rows = method and config (FP16 first), columns = models x metrics, with the
best value per column and deltas to FP16. Rendering (markdown, CSV, LaTeX) is in report/render.py.

Records whose evaluation settings differ (data, split hashes, seqlen, windows, ...) never share a column: they go to
separate tables, and `split_message` says which fields differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from harness.confidence import diff_ci95_from_stderr, excludes_zero
from harness.config import without_late_defaults
from report.record_view import (METRICS, TABLE_ORDER, RowLabel, code_change, dig, is_reference, is_synthetic, kv_bits,
                                hardware_name, model_id, model_text, relevant_quant, row_label,
                                weight_bits)

STALE_MARK = "‡"  # a row with a record made by other code than this checkout's (Table.stale)
NO_RATIO_MARK = "§"  # a speed shown without its ratio to FP16, and why (Table.no_ratio)

# --------------------------------------------------------------------------------------------------------------------
# eval settings: what must match for two numbers to share a column


# settings of each metric section that change its numbers; they matter only for records that hold that section
SECTION_SETTINGS = {"perplexity": ("seqlen", "max_windows"), "word_perplexity": ("max_length", "max_chars"),
                    "fidelity": ("max_windows",), "tasks": ("limit", "num_fewshot"),
                    "memory": ("context_len", "batch_size"), "throughput": ("prompt_len", "gen_len")}


def eval_settings(rec: dict) -> dict:
    """Flat field -> value of everything that decides whether two records' numbers are comparable (the model is a
    column, not a setting). A metric section's settings appear only when the record holds that section: a record
    without word perplexity shows '–' there and fits beside records that have it. Switches like `enabled` and batch
    sizes of the evaluation loops are left out."""
    c, e = rec.get("config", {}), dig(rec, "config", "eval", default={}) or {}
    shas = dig(rec, "provenance", "data_sha256", default={}) or {}
    s = {"data.name": dig(c, "data", "name"), "data.splits": tuple(dig(c, "data", "splits", default=()) or ()),
         "model.dtype": dig(c, "model", "dtype"),  # the dtype the model ran in changes every number
         # the token at the head of every window (None: no BOS; records from before the field had none)
         "bos_token_id": dig(rec, "provenance", "bos_token_id")}
    s.update({f"data_sha256.{k}": v for k, v in sorted(shas.items())})
    metrics = rec.get("metrics", {}) or {}
    for section, fields in SECTION_SETTINGS.items():
        if section in metrics or section == "perplexity":
            for f in fields:
                s[f"eval.{section}.{f}"] = dig(e, section, f)
    return s


def _compatible(a: dict, b: dict) -> bool:
    return all(repr(a[k]) == repr(b[k]) for k in a.keys() & b.keys())


def merged_settings(records: list[dict]) -> dict:
    out: dict = {}
    for rec in records:
        out.update(eval_settings(rec))
    return out


def split_message(groups: list[list[dict]]) -> str:
    """Which settings differ between groups of records, in words."""
    settings = [merged_settings(g) for g in groups]
    keys = sorted({k for s in settings for k in s})
    diff = [k for k in keys if len({repr(s[k]) for s in settings if k in s}) > 1]
    lines = [f"records use {len(groups)} different evaluation settings, so they are reported in {len(groups)} separate "
             f"tables (numbers from different settings never share a column). Differing fields:"]
    for k in diff:
        vals = ", ".join(f"table {i + 1}: {settings[i][k]!r}" if k in settings[i] else f"table {i + 1}: (not measured)"
                         for i in range(len(groups)))
        lines.append(f"  {k}: {vals}")
    return "\n".join(lines)

# --------------------------------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Column:
    metric: str
    key: Any  # split / task / (batch, device) / ""

    def header(self, unit: str = "", show_device: bool = False) -> str:
        m = METRICS.get(self.metric)
        key = self.key
        if self.metric == "decode_tok_s":
            b, dev = key
            return m.header.format(key=b) + (f" ({dev})" if show_device else "")
        return m.header.format(key=key, unit=unit).replace("  ", " ").strip()


@dataclass
class Row:
    label: RowLabel
    text: str  # label text, disambiguated if two configs would share it
    key: str = ""  # what makes this config distinct (unique within a table)
    records: dict = field(default_factory=dict)  # model id -> record

    @property
    def reference(self) -> bool:
        return any(is_reference(rec) for rec in self.records.values())


@dataclass
class Table:
    index: int
    settings: dict
    models: list  # model ids (name, sha), in first-seen order
    rows: list  # Row, FP16 first
    columns: list  # (model id, Column)
    values: dict  # (row text, model id, Column) -> raw value
    dropped: list = field(default_factory=list)  # messages about records left out
    weight_unit: tuple = ("MB", 1e6)
    intervals: dict = field(default_factory=dict)  # (row key, model id, Column) -> raw (lo, hi) 95% interval
    stderrs: dict = field(default_factory=dict)  # (row key, model id, Column) -> raw standard error
    # (row key, model id) -> why the record was not made by this checkout's code (eval.code_version.code_change)
    stale: dict = field(default_factory=dict)
    # (row key, model id, Column) -> why a speed is shown without its ratio to FP16 (Metric.ratio_refusal)
    no_ratio: dict = field(default_factory=dict)
    # (row key, model id, Column) -> why a speed is not its machine's own (Metric.own_problem): never "best"
    unfit: dict = field(default_factory=dict)

    # ---- marks ----
    def is_stale(self, row: Row, mid=None) -> bool:
        return any((row.key, m) in self.stale for m in (row.records if mid is None else [mid]))

    def label(self, row: Row) -> str:
        """The row's label as the tables show it: marked ‡ when a record of it was made by other code."""
        return f"{row.text} {STALE_MARK}" if self.is_stale(row) else row.text

    def legend_label(self, row: Row, mid, text: Optional[str] = None) -> str:
        """A figure's legend entry for one model's point of the row (or for `text`, e.g. a series of rows)."""
        return (text or row.text) + (f" {STALE_MARK} made by other code" if self.is_stale(row, mid) else "")

    # ---- lookups ----
    def value(self, row: Row, mid, col: Column) -> Optional[float]:
        return self.values.get((row.key, mid, col))

    def reference_row(self, mid) -> Optional[Row]:
        return next((r for r in self.rows if mid in r.records and is_reference(r.records[mid])), None)

    def display(self, col: Column, v: Optional[float]) -> Optional[float]:
        if v is None:
            return None
        if col.metric == "weight_bytes":
            return v / self.weight_unit[1]
        return v * METRICS.get(col.metric).scale

    def delta(self, row: Row, mid, col: Column) -> Optional[float]:
        m = METRICS.get(col.metric)
        ref = self.reference_row(mid)
        v = self.value(row, mid, col)
        if m.delta is None or ref is None or ref is row or v is None or (row.key, mid, col) in self.no_ratio:
            return None
        r = self.value(ref, mid, col)
        if r is None:
            return None
        if m.delta == "ratio":
            return v / r if r else None
        return self.display(col, v) - self.display(col, r)

    def interval(self, row: Row, mid, col: Column) -> Optional[tuple[float, float]]:
        """The value's 95% interval in display units, where the record has one."""
        ci = self.intervals.get((row.key, mid, col))
        return (self.display(col, ci[0]), self.display(col, ci[1])) if ci else None

    def stderr(self, row: Row, mid, col: Column) -> Optional[float]:
        se = self.stderrs.get((row.key, mid, col))
        return None if se is None else se * METRICS.get(col.metric).scale

    def delta_interval(self, row: Row, mid, col: Column) -> Optional[tuple[float, float]]:
        """95% interval of the difference to FP16 in display units: paired over the same units where the metric
        pairs (token PPL: the same windows), else from both standard errors; None when the records cannot say."""
        m = METRICS.get(col.metric)
        ref = self.reference_row(mid)
        d = self.delta(row, mid, col)
        if m.delta != "diff" or d is None or ref is None:
            return None
        if m.paired is not None:
            ci = m.paired(row.records[mid], ref.records[mid]).get(col.key)
            if ci is not None:
                return ci[0] * m.scale, ci[1] * m.scale
        se, se_ref = self.stderr(row, mid, col), self.stderr(ref, mid, col)
        if se is not None and se_ref is not None:
            return diff_ci95_from_stderr(d, se, se_ref)
        return None

    def not_significant(self, row: Row, mid, col: Column) -> bool:
        """The difference to FP16 has a 95% interval and the interval contains 0."""
        return excludes_zero(self.delta_interval(row, mid, col)) is False

    def best(self, mid, col: Column) -> set:
        """Row keys holding the best value of a column among the non-reference rows (ties all marked); empty when
        fewer than two rows compete."""
        m = METRICS.get(col.metric)
        cands = [(r.key, self.value(r, mid, col)) for r in self.rows if not r.reference and not self.is_stale(r, mid)
                 and (r.key, mid, col) not in self.unfit]
        cands = [(t, v) for t, v in cands if v is not None]
        if m.better is None or len(cands) < 2:
            return set()
        target = (min if m.better == "lower" else max)(v for _, v in cands)
        return {t for t, v in cands if math.isclose(v, target, rel_tol=1e-9, abs_tol=1e-12)}

    def model_name(self, mid) -> str:
        names = [m[0] for m in self.models]
        return model_text(mid[0] if names.count(mid[0]) == 1 else f"{mid[0]} ({mid[1]})", mid[1])

    def any_record(self, mid=None) -> dict:
        for r in self.rows:
            for m, rec in r.records.items():
                if mid is None or m == mid:
                    return rec
        return {}


def _disambiguate(rows: list[Row]) -> None:
    """Two configs that would share a label (e.g. a seed sweep) get the differing config fields appended."""
    by_text: dict[str, list[Row]] = {}
    for r in rows:
        by_text.setdefault(r.text, []).append(r)
    for text, same in by_text.items():
        if len(same) < 2:
            continue
        flats = [_flatten(_distinct_fields(next(iter(r.records.values())))) for r in same]
        diff = [k for k in sorted({k for f in flats for k in f}) if len({repr(f.get(k)) for f in flats}) > 1]
        for r, f in zip(same, flats):
            r.text = f"{text} [{', '.join(f'{k}={f.get(k)}' for k in diff)}]"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _distinct_fields(rec: dict) -> dict:
    """The config fields that make two rows of one table different runs (model and eval settings are columns and
    tables)."""
    kv = without_late_defaults("kv", dig(rec, "config", "kv", default={}) or {})  # as the run_id sees it
    backend = without_late_defaults("backend", dig(rec, "config", "backend", default={}) or {})  # w4a16_kernel
    return {"quant": relevant_quant(rec), "kv": kv, "backend": backend, "seed": dig(rec, "config", "seed")}


def _row_identity(rec: dict) -> str:
    return repr(sorted(_flatten(_distinct_fields(rec)).items()))


def number_changes(old: dict, new: dict) -> list[str]:
    """"PPL milton 107.43 -> 109.10" for every cell the two records both hold with different values (old first)."""
    out = []
    for name in TABLE_ORDER:
        m = METRICS.get(name)
        a, b = m.extract(old), m.extract(new)
        for key in sorted(a.keys() & b.keys(), key=_key_sort):
            if a[key] is not None and b[key] is not None and not math.isclose(a[key], b[key], rel_tol=1e-12):
                out.append(f"{Column(name, key).header('B')} {a[key] * m.scale:.6g} -> {b[key] * m.scale:.6g}")
    return out


def dropped_message(old: dict, new: dict, row: str, model: str) -> str:
    """One line for a record left out because a newer one holds the same row: which, and how the two differ."""
    why = []
    cv_old, cv_new = (dig(r, "code_version", "hash") for r in (old, new))
    if cv_old != cv_new:
        why.append(f"code version {cv_old or 'unrecorded'} vs {cv_new or 'unrecorded'}")
    m_old, m_new = hardware_name(old), hardware_name(new)
    if m_old != m_new:
        why.append(f"machine {m_old} vs {m_new}")
    lost = sorted(set(old.get("metrics") or {}) - set(new.get("metrics") or {}))
    if lost:
        why.append(f"its {', '.join(lost)} cells are not in the newer record")
    moved = number_changes(old, new)
    if moved:
        why.append(f"numbers {', '.join(moved[:4])}" + (f" and {len(moved) - 4} more" if len(moved) > 4 else ""))
    return (f"Dropped record {old.get('run_id')} ({dig(old, 'provenance', 'created', default='?')}): record "
            f"{new.get('run_id')} ({dig(new, 'provenance', 'created', default='?')}) has the same row ({row}, {model}) "
            f"and is newer, so it is shown" + (f"; they differ in {'; '.join(why)}." if why else "."))


def build_table(records: list[dict], index: int = 1) -> Table:
    """One table from records that share eval settings."""
    dropped = []
    models: list = []
    rows_by_id: dict[str, Row] = {}
    for rec in sorted(records, key=lambda r: dig(r, "provenance", "created_unix", default=0) or 0):
        mid = model_id(rec)
        if mid not in models:
            models.append(mid)
        ident = _row_identity(rec)
        row = rows_by_id.setdefault(ident, Row(label=row_label(rec), text=row_label(rec).text, key=ident))
        if mid in row.records:  # same config rerun (e.g. other code, another machine, an unused quant field changed)
            dropped.append(dropped_message(row.records[mid], rec, row.text, mid[0]))
        row.records[mid] = rec
    rows = sorted(rows_by_id.values(), key=lambda r: r.label.rank)
    _disambiguate(rows)
    stale = {(row.key, mid): why for row in rows for mid, rec in row.records.items() if (why := code_change(rec))}

    cols: dict = {}  # (mid, Column) -> None, an ordered set
    values, intervals, stderrs = {}, {}, {}
    for name in TABLE_ORDER:
        m = METRICS.get(name)
        for mid in models:
            for row in rows:
                rec = row.records.get(mid)
                if rec is None or (m.quality and is_synthetic(rec)):
                    continue
                cis = m.ci95(rec) if m.ci95 else {}
                ses = m.stderr(rec) if m.stderr else {}
                for key, v in m.extract(rec).items():
                    if v is None:
                        continue
                    col = Column(name, key)
                    cols[(mid, col)] = None
                    values[(row.key, mid, col)] = v
                    if key in cis:
                        intervals[(row.key, mid, col)] = cis[key]
                    if ses.get(key) is not None:
                        stderrs[(row.key, mid, col)] = ses[key]
    # models are column groups: order columns model-major, keeping metric order inside a model
    columns = sorted(cols, key=lambda mc: (models.index(mc[0]), TABLE_ORDER.index(mc[1].metric), _key_sort(mc[1].key)))
    wmax = max((v for (t, mid, c), v in values.items() if c.metric == "weight_bytes"), default=0)
    unit = ("GB", 1e9) if wmax >= 1e9 else ("MB", 1e6)
    t = Table(index=index, settings=merged_settings(records), models=models, rows=rows, columns=columns,
              values=values, dropped=dropped, weight_unit=unit, intervals=intervals, stderrs=stderrs, stale=stale)
    _refuse_ratios(t)
    return t


def _refuse_ratios(t: Table) -> None:
    """Speeds (Metric.own_problem / ratio_refusal): a value measured under load is kept out of "best", and a ratio to
    FP16 is formed only from two measurements of one machine under comparable load; otherwise the cell shows the
    value alone and the table says why (Table.no_ratio)."""
    for mid, col in t.columns:
        m = METRICS.get(col.metric)
        if m.ratio_refusal is None:
            continue
        ref = t.reference_row(mid)
        ref_rec = ref.records[mid] if ref is not None else None
        for row in t.rows:
            if t.value(row, mid, col) is None:
                continue
            rec, cell = row.records[mid], (row.key, mid, col)
            own = m.own_problem(rec) if m.own_problem else None
            if own:
                t.unfit[cell] = t.no_ratio[cell] = own
            if row is not ref and ref_rec is not None and m.extract(ref_rec):  # FP16 measured it: a ratio was possible
                why = m.ratio_refusal(rec, ref_rec)
                if why:
                    t.no_ratio[cell] = why


def _key_sort(key):
    if isinstance(key, tuple):
        return tuple(_key_sort(k) for k in key)
    return (0, key, "") if isinstance(key, (int, float)) else (1, 0, str(key))


def group_records(records: list[dict]) -> list[list[dict]]:
    """Records grouped so that, within a group, every setting two records both have is equal (first fit, oldest
    first). Each group becomes one table."""
    groups: list[tuple[dict, list[dict]]] = []
    for rec in sorted(records, key=lambda r: dig(r, "provenance", "created_unix", default=0) or 0):
        s = eval_settings(rec)
        for merged, members in groups:
            if all(_compatible(s, eval_settings(m)) for m in members):
                merged.update(s)
                members.append(rec)
                break
        else:
            groups.append((dict(s), [rec]))
    return [members for _, members in groups]


def build_tables(records: list[dict]) -> list[Table]:
    complete = [r for r in records if r.get("status", "complete") == "complete"]
    return [build_table(g, i + 1) for i, g in enumerate(group_records(complete))]

# --------------------------------------------------------------------------------------------------------------------
# the flat frame (one row per record, every metric), for records.csv and the notebook


def records_frame(records: list[dict]):
    import pandas as pd

    rows = []
    for rec in records:
        lab = row_label(rec)
        d = {"run_id": rec.get("run_id"), "status": rec.get("status"), "model": model_id(rec)[0],
             "model_sha": model_id(rec)[1], "config": lab.text, "series": lab.series,
             "method": dig(rec, "config", "quant", "method"), "w_bit": weight_bits(rec),
             "group_size": dig(rec, "config", "quant", "group_size") if weight_bits(rec) != 16 else None,
             "kv_bits": kv_bits(rec), "backend": dig(rec, "config", "backend", "name"),
             "synthetic": is_synthetic(rec), "reference": is_reference(rec), "data": dig(rec, "config", "data", "name"),
             "seqlen": dig(rec, "config", "eval", "perplexity", "seqlen"),
             "max_windows": dig(rec, "config", "eval", "perplexity", "max_windows"),
             "hardware": hardware_name(rec), "created": dig(rec, "provenance", "created"),
             "quantize_s": dig(rec, "timings_s", "quantize"), "total_s": dig(rec, "timings_s", "total"),
             "made_by_other_code": code_change(rec)}
        for name in METRICS.names():
            for key, v in METRICS.get(name).extract(rec).items():
                k = f"b{key[0]}" if isinstance(key, tuple) else key
                d[f"{name}.{k}" if k != "" else name] = v
        rows.append(d)
    df = pd.DataFrame(rows)
    if len(df):
        df["table"] = 0
        groups = group_records([r for r in records if r.get("status", "complete") == "complete"])
        where = {id(r): i + 1 for i, g in enumerate(groups) for r in g}
        df["table"] = [where.get(id(r)) for r in records]
        order = sorted(range(len(records)), key=lambda i: (df["table"][i] or 0, row_label(records[i]).rank))
        df = df.iloc[order].reset_index(drop=True)
    return df
