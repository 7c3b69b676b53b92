"""The report stage: every record under <results>/runs/ -> paper-style tables, figures and an executed notebook.

    python -m report [--results-dir results] [--strict] [--no-figures] [--no-notebook]

Every record is read through its schema (harness/record_schema.py): a bad one (a version this code does not know,
wrong types, NaN, an estimate outside its interval, a run_id that is not the hash of its config, no metrics) is left
out and listed with its path and reason on stderr and in a warning above the tables; with no valid record the
report stops with one line (exit 2).

Writes <results>/tables/table<N>.{md,csv,tex} (one table per set of comparable eval settings), records.csv (one
row per run, every metric), the paper table paper.{md,csv,tex} with paper_pairs.csv and paper_accuracy.csv
(report/paper_table.py: methods by model x weight setting), the expert-coverage table moe_coverage.{md,csv} where a
record is of a mixture of experts (report/moe_coverage.py), <results>/figures/*.{png,pdf}, and
<results>/notebooks/results.executed.ipynb (the notebook notebooks/results.ipynb run top to bottom on these records).
Reads records only; it never recomputes.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.assets import REPO_ROOT
from harness.record_schema import BadRecord, Record, read_records
from report import moe_coverage, paper_render, render
from report import tables as T

NOTEBOOK = REPO_ROOT / "notebooks" / "results.ipynb"
RESULTS_ENV = "QH_RESULTS_DIR"  # the notebook reads its records from here (default: <repo>/results)


class ReportError(RuntimeError):
    """The records cannot be reported as asked; the message says why and what to do."""


@dataclass
class Loaded:
    records: list[dict]  # complete, valid records, as written (report/record_view.py reads them)
    parsed: list[Record]  # the same records as the schema parsed them (report/moe_coverage.py reads them)
    skipped: list[str]  # valid records left out: a run still in progress or failed
    bad: list[BadRecord]  # records the schema refused (harness/record_schema.py), with path and reasons


def load_checked(results_dir: Path) -> Loaded:
    """Every record under <results_dir>/runs/, read through the record schema."""
    import quant  # noqa: F401  (registers every method's config: a record's run_id is recomputed from its config)

    good, bad = read_records(results_dir)
    skipped = [f"{r.run_id}: status {r.status!r}, left out" for r in good if not r.complete]
    return Loaded([r.data for r in good if r.complete], [r for r in good if r.complete], skipped, bad)


def warn_bad(bad: list[BadRecord]) -> None:
    for b in bad:
        print(f"warning: skipping {b.line()}", file=sys.stderr, flush=True)


def load(results_dir: Path) -> tuple[list[dict], list[str]]:
    """Complete, valid records, and a note for each file left out (a bad record: its path and why, also on stderr;
    a run still in progress or failed)."""
    loaded = load_checked(results_dir)
    warn_bad(loaded.bad)
    return loaded.records, [b.line() for b in loaded.bad] + loaded.skipped


def no_valid_record(results_dir: Path, bad: list[BadRecord]) -> str:
    """The one line the report stops with when no record can be shown."""
    runs = results_dir / "runs"
    if not bad:
        return (f"no complete run record under {runs}; make some with `python -m experiments.run` (or `make demo`), "
                f"or pass --results-dir")
    named = "; ".join(b.line() for b in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
    return (f"no valid complete run record under {runs}: {len(bad)} left out as bad ({named}); recompute them with "
            f"`python -m experiments.run` (the same command), or remove them")


def write_tables(tables: list[T.Table], records: list[dict], out_dir: Path, bad: list[BadRecord] = ()) -> list[Path]:
    """table<N>.{md,tex,csv} and records.csv; each markdown table opens with the warnings (bad records, stale
    records) that concern the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():  # tables of an older report (fewer groups then) must not linger
        if re.fullmatch(r"table\d+\.(md|csv|tex)", old.name):
            old.unlink()
    paths = []
    warning = render.bad_records_markdown(bad) + render.stale_markdown(tables)
    for t in tables:
        for ext, text in (("md", warning + render.to_markdown(t)), ("tex", render.to_latex(t))):
            p = out_dir / f"table{t.index}.{ext}"
            p.write_text(text)
            paths.append(p)
        p = out_dir / f"table{t.index}.csv"
        render.to_csv_frame(t).to_csv(p, index=False)
        paths.append(p)
    p = out_dir / "records.csv"
    T.records_frame(records).to_csv(p, index=False)
    paths.append(p)
    return paths


def execute_notebook(results_dir: Path, out: Path, src: Path = NOTEBOOK, timeout_s: int = 600) -> Path:
    """Run the results notebook on `results_dir` (passed as $QH_RESULTS_DIR) from notebooks/, save the executed copy.
    A failing cell raises after the partly executed copy is written, so the error is visible in it."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(src, as_version=4)
    env = {**os.environ, RESULTS_ENV: str(Path(results_dir).resolve()), "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    client = NotebookClient(nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(src.parent)}})
    out.parent.mkdir(parents=True, exist_ok=True)
    # the kernel's own stderr (jupyter's start-up chatter) goes to a file, shown only if the run fails
    with tempfile.TemporaryFile("w+") as kernel_log:
        try:
            client.execute(env=env, stderr=kernel_log)
        except Exception as e:
            nbformat.write(nb, out)
            kernel_log.seek(0)
            tail = "".join(kernel_log.readlines()[-20:])
            what = e if isinstance(e, CellExecutionError) else f"{type(e).__name__}: {e}"
            raise ReportError(f"the results notebook failed; the partly executed copy is {out}:\n{what}"
                              + (f"\nkernel stderr:\n{tail}" if tail.strip() else "")) from None
    nbformat.write(nb, out)
    return out


def report(results_dir: Path, strict: bool = False, figures: bool = True, notebook: bool = True,
           out=None) -> dict:
    """Build everything; returns {"tables": [...], "paper": [...], "figures": [...], "notebook": path or None,
    "markdown": str}."""
    results_dir = Path(results_dir)
    loaded = load_checked(results_dir)
    records, skipped = loaded.records, loaded.skipped
    if not records:
        raise ReportError(no_valid_record(results_dir, loaded.bad))
    warn_bad(loaded.bad)
    groups = T.group_records(records)
    if len(groups) > 1:
        msg = T.split_message(groups)
        if strict:
            raise ReportError(msg + "\n--strict: refusing to report records with different eval settings; rerun them "
                              "with one setting or drop --strict to get one table per setting.")
        print(msg, file=sys.stderr)
    for s in skipped:
        print(f"note: {s}", file=sys.stderr)

    tables = [T.build_table(g, i + 1) for i, g in enumerate(groups)]
    for t in tables:  # also in the table's notes; said here so a reader of the console sees it too
        for d in t.dropped:
            print(f"note: table {t.index}: {d}", file=sys.stderr)
    stale = render.stale_summary(tables)
    if stale:  # also above the tables and in their notes; said here so a reader of the console sees it too
        print(f"note: stale: {stale}", file=sys.stderr)
    md = render.bad_records_markdown(loaded.bad) + render.stale_markdown(tables) + \
        "\n".join(render.to_markdown(t) for t in tables)
    print(md, file=out or sys.stdout)
    table_paths = write_tables(tables, records, results_dir / "tables", loaded.bad)
    # the paper's layout (methods x KV blocks by model x setting), beside the per-settings tables
    paper_paths, _ = paper_render.write(records, results_dir / "tables", render.bad_records_markdown(loaded.bad))
    # what each quantization of a mixture of experts did to its routed experts (none without such a record)
    moe_paths, moe_md = moe_coverage.write(loaded.parsed, results_dir / "tables")
    table_paths += moe_paths
    if moe_md:
        print(moe_md, file=out or sys.stdout)
    fig_paths = []
    if figures:
        from report.plots import save_figures

        fig_paths = save_figures(tables, results_dir / "figures")
    from report import serving  # GPU serving benchmarks under <results>/gpu/, when there are any

    serving_tables, serving_figs, serving_md = serving.write(results_dir, figures=figures)
    table_paths += serving_tables
    if serving_md:
        print(serving_md, file=out or sys.stdout)
    fig_paths += serving_figs
    nb_path = None
    if notebook:
        nb_path = execute_notebook(results_dir, results_dir / "notebooks" / "results.executed.ipynb")
    return {"tables": table_paths, "paper": paper_paths, "figures": fig_paths, "notebook": nb_path, "markdown": md}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results-dir", default="results", help="folder holding runs/ (default: results)")
    ap.add_argument("--strict", action="store_true", help="refuse (exit 2) when records have different eval settings "
                    "instead of writing one table per setting")
    ap.add_argument("--no-figures", action="store_true", help="skip the figures")
    ap.add_argument("--no-notebook", action="store_true", help="skip executing the results notebook")
    args = ap.parse_args(argv)
    try:
        out = report(Path(args.results_dir), strict=args.strict, figures=not args.no_figures,
                     notebook=not args.no_notebook)
    except ReportError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    rel = lambda p: os.path.relpath(p) if not os.path.relpath(p).startswith("..") else str(p)  # noqa: E731
    print("Report written:")
    print(f"  tables:   {', '.join(rel(p) for p in out['tables'])}")
    print(f"  paper:    {', '.join(rel(p) for p in out['paper'])}")
    figs = sorted({rel(p) for p in out["figures"] if str(p).endswith(".png")})
    print(f"  figures:  {', '.join(figs) if figs else '(none)'}{' (+ .pdf of each)' if figs else ''}")
    print(f"  notebook: {rel(out['notebook']) if out['notebook'] else '(skipped)'}")
    return 0


