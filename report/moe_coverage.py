"""The expert-coverage table: for every record of a mixture of experts, what its quantization did to the routed
experts, from the quantizer's summary (quant/moe/coverage.py) read through the record schema
(harness.record_schema.ExpertSummary, never by guessing at dict keys).

One row per record: the model (weights built here say so), the method, how many expert Linears were quantized, which
Linears stayed in the model dtype (the router), whether every expert was calibrated on every token
(quant.moe.calibrate_all_experts), the fewest and the median routed calibration tokens an expert received in a block,
the threshold, the experts below it by (layer, expert) with their tokens, and the fallback they got. `python -m
report` writes it beside the other tables as <results>/tables/moe_coverage.{md,csv}. Reads records only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from harness.record_schema import ExpertRef, ExpertSummary, Record
from report.record_view import code_change, model_id, model_text, row_label
from report.tables import STALE_MARK

FILES = ("moe_coverage.md", "moe_coverage.csv")


@dataclass(frozen=True)
class CoverageRow:
    """One record's expert coverage, as the table shows it."""

    model: str  # the model's name, labelled when its weights were built here (report.record_view.model_text)
    method: str  # the report's row label (report.record_view.row_label)
    run_id: str
    moe: ExpertSummary
    dtype: str  # the model dtype the kept Linears (the router) stay in
    origin: Optional[str]  # where the weights come from, in words (provenance.model_origin)
    stale: Optional[str]  # why the record was not made by this checkout's code (report.record_view.code_change)

    @property
    def calibrated(self) -> bool:
        return self.moe.calibration is not None

    @property
    def below(self) -> list[ExpertRef]:
        return self.moe.calibration.below() if self.calibrated else []

    @property
    def thresholds(self) -> list[float]:
        return sorted({t for t in self.moe.calibration.threshold_tokens if t is not None}) if self.calibrated else []


def coverage_rows(records: list[Record]) -> list[CoverageRow]:
    """The rows of the complete records whose quant summary describes a mixture of experts, by model then the
    report's row order."""
    rows = []
    for r in records:
        moe = r.quant.moe if r.complete and r.quant is not None else None
        if moe is None:
            continue
        name, sha = model_id(r.data)
        prov = r.provenance_fields
        rows.append(CoverageRow(model=model_text(name, sha), method=row_label(r.data).text, run_id=r.run_id, moe=moe,
                                dtype=str((r.config.get("model") or {}).get("dtype", "?")),
                                origin=prov.model_origin if prov else None, stale=code_change(r.data)))
    order = {m: i for i, m in enumerate(dict.fromkeys(row.model for row in rows))}
    by_rank = {r.run_id: row_label(r.data).rank for r in records}
    return sorted(rows, key=lambda row: (order[row.model], by_rank[row.run_id], row.method))


# --------------------------------------------------------------------------------------------------------------------
# cells


def _count(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def below_text(row: CoverageRow) -> str:
    """"1: (29, 2) 137 tokens"; "0"; "–" without calibration."""
    if not row.calibrated:
        return "–"
    refs = row.below
    return f"{len(refs)}: " + ", ".join(f"({r.layer}, {r.expert}) {r.tokens:,} tokens" for r in refs) if refs else "0"


def fallback_text(row: CoverageRow) -> str:
    """The fallback the experts got, and to how many: "all_tokens (1 expert)", "none needed", "– (no calibration)"."""
    if not row.calibrated:
        return "– (no calibration)"
    cal = row.moe.calibration
    if not cal.experts_fallen_back:
        return "none needed"
    n = cal.experts_fallen_back
    return f"{cal.fallback} ({n} expert{'s' if n != 1 else ''}{', every expert' if cal.calibrate_all_experts else ''})"


def threshold_text(row: CoverageRow) -> str:
    """The blocks' threshold ("204.8"), or its range where blocks differ ("51.2 – 204.8"); "–" without one."""
    t = row.thresholds
    return "–" if not t else _count(t[0]) if len(t) == 1 else f"{_count(t[0])} – {_count(t[-1])}"


def cells(row: CoverageRow) -> dict[str, str]:
    """The markdown table's cells of a row."""
    m, cal = row.moe, row.moe.calibration
    return {
        "model": row.model,
        "method": f"{row.method} {STALE_MARK}" if row.stale else row.method,
        "experts (top-k)": f"{m.experts} (top-{m.top_k})",
        "expert Linears quantized": f"{m.expert_linears_quantized} / {m.expert_linears}",
        "kept in model dtype": f"{', '.join(m.kept_in_model_dtype)} ({row.dtype})" if m.kept_in_model_dtype else "–",
        "calibrate_all_experts": "–" if cal is None else ("on" if cal.calibrate_all_experts else "off"),
        "tokens per expert: min / median": "–" if cal is None else
        f"{_count(cal.expert_tokens_min)} / {_count(cal.expert_tokens_median)}",
        "threshold (tokens)": threshold_text(row),
        "experts below threshold: (layer, expert)": below_text(row),
        "fallback applied": fallback_text(row),
        "record": row.run_id,
    }


def frame(rows: list[CoverageRow]) -> pd.DataFrame:
    """The CSV: one line per record, raw numbers (no marks)."""
    out = []
    for row in rows:
        m, cal = row.moe, row.moe.calibration
        out.append({
            "model": row.model, "method": row.method, "run_id": row.run_id, "experts": m.experts, "top_k": m.top_k,
            "blocks": m.blocks, "expert_linears": m.expert_linears,
            "expert_linears_quantized": m.expert_linears_quantized,
            "kept_in_model_dtype": ";".join(m.kept_in_model_dtype), "model_dtype": row.dtype,
            "calibrated": row.calibrated,
            "calibrate_all_experts": cal.calibrate_all_experts if cal else None,
            "min_share": cal.min_share if cal else None,
            "expert_tokens_min": cal.expert_tokens_min if cal else None,
            "expert_tokens_median": cal.expert_tokens_median if cal else None,
            "threshold_tokens_min": row.thresholds[0] if row.thresholds else None,
            "threshold_tokens_max": row.thresholds[-1] if row.thresholds else None,
            "experts_below_threshold": len(row.below) if cal else None,
            "below_threshold": ";".join(f"{r.layer}:{r.expert}:{r.tokens}" for r in row.below),  # layer:expert:tokens
            "fallback": cal.fallback if cal else None,
            "experts_fallen_back": cal.experts_fallen_back if cal else None,
            "stale": row.stale or "",
        })
    counts = ["blocks", "expert_tokens_min", "experts_below_threshold", "experts_fallen_back"]
    return pd.DataFrame(out).astype({c: "Int64" for c in counts})  # counts stay integers beside RTN's empty cells


# --------------------------------------------------------------------------------------------------------------------
# the table


TITLE = "Expert coverage: calibration tokens per routed expert and what was done for the experts below the threshold"


def notes(rows: list[CoverageRow]) -> list[str]:
    out = [f"Model {model}: {origin}." for model, origin in dict.fromkeys((r.model, r.origin) for r in rows) if origin]
    out.append("Tokens per expert: routed token slots of the calibration set an expert received in one block (a token "
               "counts once for each of its top-k experts); min and median over every block and expert. Threshold: "
               "quant.moe.min_share × an even share of a block's routed slots; an expert with no token or fewer falls "
               "back (quant/moe/coverage.py). (layer, expert): the block's index and the expert's.")
    means = dict.fromkeys((r.moe.calibration.fallback, r.moe.calibration.fallback_means) for r in rows
                          if r.calibrated and r.moe.calibration.fallback)
    out += [f"Fallback {name}: {what}." for name, what in means if what]
    if any(r.calibrated and r.moe.calibration.calibrate_all_experts for r in rows):
        out.append("calibrate_all_experts on: every expert is calibrated on every token entering its block's MoE "
                   "(llm-compressor's moe_calibrate_all_experts), whatever its routed count.")
    out.append("Kept in model dtype: Linears left unquantized, named relative to the block (mlp.gate: the router). "
               "Without calibration (RTN) nothing is counted: –.")
    out += [f"{STALE_MARK} {r.method} ({r.model}): record {r.run_id} was {r.stale}; run its config again "
            f"(experiments.run) to replace it." for r in rows if r.stale]
    return out


def to_markdown(rows: list[CoverageRow]) -> str:
    table = [cells(r) for r in rows]
    head = list(table[0])
    lines = [f"### {TITLE}", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c[h] for h in head) + " |" for c in table]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes(rows)]) + "\n"


def write(records: list[Record], out_dir: Path) -> tuple[list[Path], str]:
    """moe_coverage.md and .csv under `out_dir` (old ones removed when no record is of a mixture of experts); the
    paths and the markdown ("" without such a record)."""
    rows = coverage_rows(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not rows:
        for f in FILES:
            (out_dir / f).unlink(missing_ok=True)
        return [], ""
    md = to_markdown(rows)
    (out_dir / FILES[0]).write_text(md)
    frame(rows).to_csv(out_dir / FILES[1], index=False)
    return [out_dir / f for f in FILES], md
