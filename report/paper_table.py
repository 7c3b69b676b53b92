"""The paper table, in the layout of the AWQ and GPTQ papers, from run records.

Rows are methods in the registry's row order (harness.labels.method_rank: FP16, RTN, AWQ, ..., each method's own
variants), one block of rows per KV-cache option (the model's own 16-bit KV first, then int8, fp8, int4). Column
groups are models (one per set of perplexity settings) x weight settings (w4 g128, w4 g64, w3 g128, w3 g64, FP4
formats, W8A8), each present only where a record has it. A cell is token PPL on the group's primary split (its
first data split), its 95% interval, and its difference to the model's FP16 run over the same windows (paired).

The same rows also make the accuracy table (task accuracy, KL and top-1 agreement to FP16 on the primary split,
weight bytes), and `pairs` sets each column's lowest PPL against the runner-up and against RTN with the paired 95%
interval of the difference (harness.confidence.paired_ppl_diff). Rendering is report/paper_render.py. Reads records
only; recomputes nothing but the paired intervals from the per-window NLLs the records keep.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from harness.confidence import PairedDiff, diff_ci95_from_stderr, excludes_zero, paired_ppl_diff
from harness.labels import backend_text, kv_text, method_detail, method_name, method_rank
from report.record_view import (METRICS, code_change, dig, finite, is_synthetic, kv_bits, model_id, model_text,
                                weight_bytes, window_nlls)
from report.tables import _distinct_fields, _flatten, _row_identity, dropped_message, eval_settings

# --------------------------------------------------------------------------------------------------------------------
# what a record is in the paper's layout: its column group, weight setting, KV block and row


PAPER_GROUP_SIZES = (128, 64)  # the AWQ/GPTQ papers' groups: a model whose shape refuses one is named in the notes


def ppl_settings(rec: dict) -> dict:
    """The eval settings that decide which windows token PPL is scored on (data and its hashes, dtype, BOS, seqlen,
    windows): two records with equal ones were scored on the same windows, so their PPLs pair window by window."""
    return {k: v for k, v in eval_settings(rec).items() if not k.startswith("eval.") or k.startswith("eval.perplexity.")}


@dataclass(frozen=True)
class Setting:
    """A weight setting, one column of a model's group: "w4 g128", "w3 per-channel", "NVFP4", "W8A8 int8"."""

    text: str
    rank: tuple
    group_size: Optional[int] = None  # the integer grid's group along in_features (None: per channel or a format's)


def _drop_word(text: str, word: str) -> str:
    return re.sub(rf"(^|\s){re.escape(word)}(?=\s|$)", " ", text, count=1).strip()


def setting_of(rec: dict) -> tuple[Optional[Setting], str]:
    """(the weight setting of a record's config, None for unquantized weights; its label detail without the setting,
    which names the row: "(search+clip)", "sym")."""
    q = dig(rec, "config", "quant", default={}) or {}
    if q.get("method", "fp16") == "fp16":
        return None, ""
    detail = method_detail(q)[0]
    if q.get("w_bit") is None:  # weights and activations in one format (SmoothQuant W8A8): the detail names it
        head, _, rest = detail.partition(" (")
        return Setting(head, (-8, 2, 0, head)), f"({rest}" if rest else ""
    w_bit, fmt = int(q["w_bit"]), q.get("format", "int") or "int"
    if fmt != "int":  # FP4: the format is the setting (its block and symmetry are the format's)
        return Setting(fmt.upper(), (-w_bit, 1, 0, fmt)), _drop_word(detail, fmt.upper())
    g = q.get("group_size", -1)
    word = "per-channel" if g in (-1, None) else f"g{g}"
    # paper order: more bits first, then coarser groups (per channel, g128, g64)
    return (Setting(f"w{w_bit} {word}", (-w_bit, 0, -(g if g not in (-1, None) else 1 << 30), word),
                    None if g in (-1, None) else int(g)), _drop_word(detail, word))


@dataclass(frozen=True)
class KVBlock:
    """A KV-cache option: one block of rows."""

    bits: int
    format: str

    @property
    def text(self) -> str:
        return "KV cache 16-bit (the model's dtype)" if self.bits == 16 else \
            "KV cache " + kv_text(self.bits, self.format).removeprefix(" + KV ")

    @property
    def rank(self) -> tuple:
        return self.bits != 16, -self.bits, self.format != "int", self.format


def block_of(rec: dict) -> KVBlock:
    return KVBlock(kv_bits(rec), dig(rec, "config", "kv", "format", default="int") or "int")


def row_text_of(rec: dict) -> str:
    """The row's label: the method and its variant, without the weight setting (a column) or the KV cache (a block)."""
    q = dig(rec, "config", "quant", default={}) or {}
    rest = setting_of(rec)[1]
    return f"{method_name(q)}{' ' + rest if rest else ''}{backend_text(dig(rec, 'config', 'backend', 'name', default='hf'))}"


# --------------------------------------------------------------------------------------------------------------------
# the table


@dataclass
class Group:
    """A column group: one model under one set of perplexity settings (ppl_settings)."""

    model: tuple  # (name, sha)
    settings: dict
    name: str = ""
    records: list = field(default_factory=list)

    @property
    def split(self) -> Optional[str]:
        """The primary split: the first of the records' data.splits."""
        splits = self.settings.get("data.splits") or ()
        return splits[0] if splits else None


@dataclass
class PaperRow:
    block: KVBlock
    text: str
    rank: tuple
    method: str  # quant.method
    records: dict = field(default_factory=dict)  # (group index, setting text; None for unquantized weights) -> record

    @property
    def key(self) -> tuple:
        return self.block, self.text

    @property
    def quantized(self) -> bool:
        """Its weights are quantized (an FP16 row, with or without a quantized KV cache, is its block's reference)."""
        return self.method != "fp16"


@dataclass(frozen=True)
class Delta:
    """A cell's difference to FP16: paired over the same windows (with its interval) where both records kept their
    per-window NLLs, else the plain difference of the two PPLs (no interval)."""

    estimate: float
    ci95: Optional[tuple[float, float]]
    paired: bool

    @property
    def not_significant(self) -> bool:
        return excludes_zero(self.ci95) is False


@dataclass(frozen=True)
class SubColumn:
    """One quantity of the accuracy table, repeated under every setting of its group."""

    metric: str  # acc | kl_mean | top1_agreement | weight_bytes
    key: Any  # task / split / ""
    setting: tuple = ()  # the evaluator settings its numbers depend on (tasks: limit, num_fewshot; fidelity: windows)
    header: str = ""

    @property
    def better(self) -> Optional[str]:
        return METRICS.get(self.metric).better if self.metric != "weight_bytes" else None


@dataclass
class PaperTable:
    groups: list  # Group
    columns: list  # (group index, Setting)
    rows: list  # PaperRow, by block then the registry's row order
    reference: dict  # group index -> its FP16 record (16-bit weights and KV, default backend)
    stale: dict  # run_id -> why the record was not made by this checkout's code (report.record_view.code_change)
    notes: list  # what the records say about settings: fallbacks, absent settings, reruns left out
    subcolumns: dict = field(default_factory=dict)  # group index -> [SubColumn] of the accuracy table

    # ---- lookups ----
    def record(self, row: PaperRow, col) -> Optional[dict]:
        g, s = col
        return row.records.get((g, s.text)) or row.records.get((g, None))

    def blocks(self) -> list[KVBlock]:
        return list(dict.fromkeys(r.block for r in self.rows))

    def is_stale(self, rec: Optional[dict]) -> bool:
        return rec is not None and rec.get("run_id") in self.stale

    def row_stale(self, row: PaperRow) -> bool:
        return any(self.is_stale(rec) for rec in row.records.values())

    def group_name(self, g: int) -> str:
        return self.groups[g].name

    # ---- the PPL table ----
    def ppl(self, row: PaperRow, col) -> Optional[float]:
        rec, split = self.record(row, col), self.groups[col[0]].split
        return finite(dig(rec, "metrics", "perplexity", split, "token_ppl")) if rec and split else None

    def ppl_ci95(self, row: PaperRow, col) -> Optional[tuple[float, float]]:
        ci = dig(self.record(row, col), "metrics", "perplexity", self.groups[col[0]].split, "token_ppl_ci95")
        return (float(ci[0]), float(ci[1])) if isinstance(ci, (list, tuple)) and len(ci) == 2 else None

    def delta(self, row: PaperRow, col) -> Optional[Delta]:
        """PPL(cell) - PPL(FP16 of the group), paired over the same windows."""
        rec, ref, split = self.record(row, col), self.reference.get(col[0]), self.groups[col[0]].split
        v = self.ppl(row, col)
        if rec is None or ref is None or rec is ref or v is None:
            return None
        d = paired_between(rec, ref, split)
        if d is not None:
            return Delta(d.estimate, d.ci95, True)
        r = finite(dig(ref, "metrics", "perplexity", split, "token_ppl"))
        return Delta(v - r, None, False) if r is not None else None

    def candidates(self, block: KVBlock, col) -> list[PaperRow]:
        """Rows of a block whose weights are quantized and that have a PPL in the column, lowest PPL first."""
        rows = [r for r in self.rows if r.block == block and r.quantized and self.ppl(r, col) is not None]
        return sorted(rows, key=lambda r: self.ppl(r, col))

    def best(self, block: KVBlock, col) -> set:
        """Keys of the rows holding the lowest PPL of a column within a block, among quantized-weight rows made by
        this checkout's code (never a ‡ record); empty when fewer than two such rows compete."""
        rows = [r for r in self.candidates(block, col) if not self.is_stale(self.record(r, col))]
        if len(rows) < 2:
            return set()
        low = self.ppl(rows[0], col)
        return {r.key for r in rows if math.isclose(self.ppl(r, col), low, rel_tol=1e-9, abs_tol=1e-12)}

    def baseline(self, block: KVBlock, col) -> Optional[PaperRow]:
        """The RTN row of a column within a block: plain RTN ("RTN", no variant) where it has a PPL there, else the
        first RTN variant; None without RTN."""
        rtn = [r for r in self.candidates(block, col) if r.method == "rtn"]
        return next((r for r in rtn if r.text == method_name({"method": "rtn"})), rtn[0] if rtn else None)

    def gap_share(self, row: PaperRow, rtn: PaperRow, col) -> Optional[float]:
        """The row's PPL gap to FP16 as a fraction of RTN's in the same column, (PPL - FP16) / (PPL_RTN - FP16), each
        gap paired over the same windows as in `delta` (the quality targets' "gap / RTN gap"); None without FP16 or
        where RTN does not lose to FP16."""
        d, d_rtn = self.delta(row, col), self.delta(rtn, col)
        if d is None or d_rtn is None or d_rtn.estimate <= 0:
            return None
        return d.estimate / d_rtn.estimate

    def pairs(self) -> list[dict]:
        """For every column of every block with two or more quantized rows: the lowest PPL against the runner-up and
        against RTN (where RTN is not the lowest), with the paired 95% interval of the difference; `vs_rtn` when the other
        row is the column's RTN, and then the lowest row's share of RTN's gap to FP16 (`gap_share`)."""
        out = []
        for block in self.blocks():
            for col in self.columns:
                rows = self.candidates(block, col)
                if len(rows) < 2:
                    continue
                rtn = self.baseline(block, col)
                for what, other in (("runner-up", rows[1]), ("RTN", rtn)):
                    if other is None or (what == "RTN" and other in rows[:2]):  # the runner-up is RTN: said once
                        continue
                    a, b = self.record(rows[0], col), self.record(other, col)
                    d = paired_between(a, b, self.groups[col[0]].split)
                    out.append({"block": block, "column": col, "lowest": rows[0], "vs": other, "against": what,
                                "ppl_a": self.ppl(rows[0], col), "ppl_b": self.ppl(other, col), "diff": d,
                                "vs_rtn": other is rtn,
                                "gap_share": self.gap_share(rows[0], other, col) if other is rtn else None,
                                "stale": self.is_stale(a) or self.is_stale(b)})
        return out

    # ---- the accuracy table ----
    def sub_value(self, row: PaperRow, col, sub: SubColumn) -> Optional[float]:
        """The displayed value (accuracy in %, weights in MB)."""
        return _sub_value(self.record(row, col), sub)

    def sub_stderr(self, row: PaperRow, col, sub: SubColumn) -> Optional[float]:
        if sub.metric != "acc" or self.sub_value(row, col, sub) is None:
            return None
        se = METRICS.get("acc").stderr(self.record(row, col)).get(sub.key)
        return None if se is None else se * 100.0

    def sub_delta(self, row: PaperRow, col, sub: SubColumn) -> Optional[Delta]:
        """Accuracy - FP16's (points, paired over the same items where both kept per-item scores, else from both
        standard errors); weights: the ratio to FP16 (no interval). KL and top-1 are to FP16 already: None."""
        rec, ref = self.record(row, col), self.reference.get(col[0])
        v = self.sub_value(row, col, sub)
        if ref is None or rec is ref or v is None or sub.metric not in ("acc", "weight_bytes"):
            return None
        r = _sub_value(ref, sub)
        if r is None:
            return None
        if sub.metric == "weight_bytes":
            return Delta(v / r, None, False) if r else None
        ci = METRICS.get("acc").paired(rec, ref).get(sub.key)
        if ci is not None:
            return Delta(v - r, (ci[0] * 100.0, ci[1] * 100.0), True)
        se, se_ref = self.sub_stderr(row, col, sub), METRICS.get("acc").stderr(ref).get(sub.key)
        return Delta(v - r, diff_ci95_from_stderr(v - r, se, se_ref * 100.0) if se is not None and se_ref is not None
                     else None, False)

    def sub_best(self, block: KVBlock, col, sub: SubColumn) -> set:
        """As `best`, for a quantity of the accuracy table (none for weight bytes)."""
        if sub.better is None:
            return set()
        vals = [(r.key, self.sub_value(r, col, sub)) for r in self.rows
                if r.block == block and r.quantized and not self.is_stale(self.record(r, col))]
        vals = [(k, v) for k, v in vals if v is not None]
        if len(vals) < 2:
            return set()
        target = (min if sub.better == "lower" else max)(v for _, v in vals)
        return {k for k, v in vals if math.isclose(v, target, rel_tol=1e-9, abs_tol=1e-12)}


def paired_between(rec_a: dict, rec_b: dict, split: Optional[str]) -> Optional[PairedDiff]:
    """PPL(a) - PPL(b) on `split` with its paired 95% interval, for any two runs scored on the same windows (equal
    ppl_settings and window count); None where they were not, or a record kept no per-window NLLs."""
    if split is None or ppl_settings(rec_a) != ppl_settings(rec_b):
        return None
    a, b = window_nlls(rec_a, split), window_nlls(rec_b, split)
    return paired_ppl_diff(a, b) if a and b else None


def _sub_value(rec: Optional[dict], sub: SubColumn) -> Optional[float]:
    """A record's value of an accuracy-table quantity as shown (accuracy in %, weights in MB); None where it has none
    or measured it under other evaluator settings than the column's."""
    if rec is None or _sub_setting(rec, sub.metric) != sub.setting:
        return None
    if sub.metric == "weight_bytes":
        v = weight_bytes(rec)
        return v / 1e6 if v is not None else None
    v = METRICS.get(sub.metric).extract(rec).get(sub.key)
    return None if v is None else v * METRICS.get(sub.metric).scale


def _sub_setting(rec: dict, metric: str) -> tuple:
    e = dig(rec, "config", "eval", default={}) or {}
    if metric == "acc":
        return dig(e, "tasks", "limit"), dig(e, "tasks", "num_fewshot")
    if metric in ("kl_mean", "top1_agreement"):
        return (dig(e, "fidelity", "max_windows"),)
    return ()


def _subcolumns(records: list[dict], split: Optional[str]) -> list[SubColumn]:
    """The accuracy table's quantities for one group: every task with an accuracy (one column per task and evaluator
    setting), KL and top-1 agreement on the primary split, weight bytes; only those some record holds."""
    found: dict = {}
    for rec in records:
        if not is_synthetic(rec):
            for task in sorted(METRICS.get("acc").extract(rec)):
                found.setdefault(("acc", task, _sub_setting(rec, "acc")), None)
            for m in ("kl_mean", "top1_agreement"):
                if split in METRICS.get(m).extract(rec):
                    found.setdefault((m, split, _sub_setting(rec, m)), None)
        if weight_bytes(rec) is not None:
            found.setdefault(("weight_bytes", "", ()), None)
    order = {"acc": 0, "kl_mean": 1, "top1_agreement": 2, "weight_bytes": 3}
    keys = sorted(found, key=lambda k: (order[k[0]], str(k[1]), repr(k[2])))
    out = []
    for metric, key, setting in keys:
        several = sum(1 for k in keys if k[:2] == (metric, key)) > 1  # one task under two limits: say which
        if metric == "acc":
            h = f"{key} (%)" + (f" [{'all items' if setting[0] is None else f'first {setting[0]} items'}"
                                f"{f', {setting[1]}-shot' if setting[1] else ''}]" if several else "")
        elif metric == "weight_bytes":
            h = "weights (MB)"
        else:
            h = f"{'KL' if metric == 'kl_mean' else 'top-1 agree'} {key}" + (f" [{setting[0]} windows]" if several else "")
        out.append(SubColumn(metric, key, setting, h))
    return out


# --------------------------------------------------------------------------------------------------------------------
# building it


def _groups(records: list[dict]) -> list[Group]:
    """Records by model, then by perplexity settings (first seen first); a model with several gets one group each,
    named apart."""
    groups: list[Group] = []
    for rec in sorted(records, key=lambda r: dig(r, "provenance", "created_unix", default=0) or 0):
        s = ppl_settings(rec)
        g = next((g for g in groups if g.model == model_id(rec) and repr(g.settings) == repr(s)), None)
        if g is None:
            g = Group(model_id(rec), s)
            groups.append(g)
        g.records.append(rec)
    models = list(dict.fromkeys(g.model for g in groups))
    names = [m[0] for m in models]
    groups.sort(key=lambda g: models.index(g.model))
    for g in groups:
        name = model_text(g.model[0] if names.count(g.model[0]) == 1 else f"{g.model[0]} ({g.model[1]})", g.model[1])
        same = [h for h in groups if h.model == g.model]
        g.name = name if len(same) == 1 else f"{name} ({chr(ord('A') + same.index(g))})"
    return groups


def build_paper_table(records: list[dict]) -> PaperTable:
    """The paper table of complete, valid records (report.build.load_checked)."""
    groups = _groups([r for r in records if r.get("status", "complete") == "complete"])
    notes: list[str] = []
    cells: dict = {}  # (group, block, row text, setting text) -> {row identity: newest record}
    settings: dict = {}  # group -> {setting text: Setting}
    for gi, g in enumerate(groups):
        settings[gi] = {}
        for rec in g.records:  # oldest first: a rerun of the same config replaces the older record
            s, _ = setting_of(rec)
            if s is not None:
                settings[gi][s.text] = s
            same = cells.setdefault((gi, block_of(rec), row_text_of(rec), s.text if s else None), {})
            ident = _row_identity(rec)
            if ident in same:
                notes.append(dropped_message(same[ident], rec, row_text_of(rec), g.name))
            same[ident] = rec
    rows: dict = {}
    for (gi, block, text, s), same in cells.items():
        recs = list(same.values())
        texts = [text] * len(recs)
        if len(recs) > 1:  # configs that share a label in one cell (a seed sweep): the differing fields name them
            flats = [_flatten(_distinct_fields(r)) for r in recs]
            diff = [k for k in sorted({k for f in flats for k in f}) if len({repr(f.get(k)) for f in flats}) > 1]
            texts = [f"{text} [{', '.join(f'{k}={f.get(k)}' for k in diff)}]" for f in flats]
        for rec, t in zip(recs, texts):
            q = dig(rec, "config", "quant", default={}) or {}
            m = q.get("method", "fp16")
            row = rows.setdefault((block, t), PaperRow(block, t, (*method_rank(m), method_detail(q)[1], t), m))
            row.records[(gi, s)] = rec
    ordered = sorted(rows.values(), key=lambda r: (r.block.rank, r.rank))
    columns = [(gi, s) for gi in range(len(groups)) for s in sorted(settings[gi].values(), key=lambda s: s.rank)]
    for gi in range(len(groups)):  # a group of FP16 runs only still gets its column
        if not settings[gi]:
            columns.append((gi, Setting("FP16 only", (99,))))
    columns.sort(key=lambda c: c[0])
    reference = {gi: r.records[(gi, None)] for r in ordered for gi in range(len(groups))
                 if r.method == "fp16" and r.block.bits == 16 and r.text == "FP16" and (gi, None) in r.records}
    shown = [rec for r in ordered for rec in r.records.values()]
    stale = {rec["run_id"]: why for rec in shown if (why := code_change(rec))}
    notes = _setting_notes(groups, settings, ordered) + notes
    t = PaperTable(groups, columns, ordered, reference, stale, notes)
    t.subcolumns = {gi: _subcolumns([rec for r in ordered for (g, _), rec in r.records.items() if g == gi], g.split)
                    for gi, g in enumerate(groups)}
    return t


def _setting_notes(groups: list[Group], settings: dict, rows: list[PaperRow]) -> list[str]:
    """What the records say about each model's settings: Linears whose in_features the group does not divide fell
    back to per channel (quant.group_fallback=per_channel); a setting other models have and this one has not, with
    the shape that stands in its way where the record states it (provenance.model.hidden_size)."""
    out = []
    every = {s.text: s for gi in settings for s in settings[gi].values()}
    for gi, g in enumerate(groups):
        hidden = next((h for rec in g.records if (h := dig(rec, "provenance", "model", "hidden_size"))), None)
        for s in sorted(settings[gi].values(), key=lambda s: s.rank):
            recs = [r.records[(gi, s.text)] for r in rows if (gi, s.text) in r.records]
            fell = [(len(dig(rec, "metrics", "quant", "group_fallback_layers", default=[]) or []),
                     dig(rec, "metrics", "quant", "layers_quantized")) for rec in recs]
            fell = [(n, m) for n, m in fell if n]
            if fell:
                n, m = max(fell)
                shape = f" (hidden_size {hidden} is not a multiple of {s.group_size})" \
                    if hidden and s.group_size and hidden % s.group_size else ""
                out.append(f"{g.name}, {s.text}: in {len(fell)} of its {len(recs)} records up to {n} of {m} quantized "
                           f"Linears fell back to per-channel scales{shape}: their in_features is not a multiple of "
                           f"the group (quant.group_fallback=per_channel).")
        missing = [s for text, s in every.items() if text not in settings[gi]]
        for s in sorted(missing, key=lambda s: s.rank):
            shape = f": hidden_size {hidden} is not a multiple of {s.group_size}, so {s.text} needs " \
                    f"quant.group_fallback=per_channel" if hidden and s.group_size and hidden % s.group_size else ""
            out.append(f"{g.name}: no record at {s.text}{shape}.")
        said = {s.group_size for s in settings[gi].values()} | {s.group_size for s in missing}
        for gs in PAPER_GROUP_SIZES:  # the papers' groups this model's shape does not divide, said even unrun
            if hidden and hidden % gs and gs not in said:
                out.append(f"{g.name}: hidden_size {hidden} is not a multiple of {gs}, so a g{gs} setting keeps "
                           f"per-channel scales on the Linears that read the hidden state (quant.group_fallback="
                           f"per_channel; the default, error, refuses it); no record here has one.")
    for gi, g in enumerate(groups):
        same = [h for h in groups if h.model == g.model]
        if len(same) > 1 and same[0] is not g:
            diff = sorted(k for k in g.settings.keys() | same[0].settings.keys()
                          if repr(g.settings.get(k)) != repr(same[0].settings.get(k)))
            out.append(f"{g.name} and {same[0].name} are one model under other perplexity settings (differing: "
                       f"{', '.join(f'{k} {same[0].settings.get(k)!r} vs {g.settings.get(k)!r}' for k in diff)}): "
                       f"their numbers never share a column.")
    return out
