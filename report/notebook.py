"""Writes notebooks/results.ipynb from the cells below (edit here, then `python -m report.notebook`),
so the notebook stays a plain, reviewable list of cells and carries no stale outputs.

The notebook itself only reads records: tables and figures come from report.tables / render / plots, the
same code `python -m report` runs, so what it shows matches results/tables and results/figures.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# Quantization results

This notebook reads every run record under `results/runs/` (one JSON file per run: resolved config, metrics,
provenance; see `harness/records.py`) and shows them as a DataFrame, paper-style tables and figures. It never
recomputes a metric; to add results, run `python -m experiments.run ...` (or `make demo`) and re-run the notebook.

It runs from the repository root or from `notebooks/`. Set `QH_RESULTS_DIR` to read records from another results
folder. `python -m report` writes the same tables and figures to `results/tables/` and
`results/figures/`, and an executed copy of this notebook to `results/notebooks/results.executed.ipynb`."""),
    ("code", """import os
import sys
from pathlib import Path

# the repository root: the first folder upward from here that holds report/__main__.py
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "report" / "__main__.py").exists())
sys.path.insert(0, str(ROOT))
RESULTS = Path(os.environ.get("QH_RESULTS_DIR", ROOT / "results"))

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from report import plots as P
from report import render
from report import tables as T
from report.build import load

pd.set_option("display.max_columns", 40, "display.width", 200)
records, skipped = load(RESULTS)
print(f"{len(records)} complete run records under {RESULTS / 'runs'}")
for s in skipped:
    print("left out:", s)
if not records:
    print("No records yet: run `make demo` (or `python -m experiments.run ...`) first; the cells below then fill in.")"""),
    ("md", """## The records as a DataFrame

One row per run. `config` is the row label used in the tables (method, weight bits `w`, group size `g`, variant,
KV-cache bits); `table` says which table the run belongs to (runs with different evaluation settings go to different
tables). Metric columns are named `<metric>.<split or task>`: `token_ppl.*` (paper-protocol token perplexity),
`word_ppl.*` / `bits_per_byte.*` (lm-eval rolling loglikelihood), `kl_mean.*`, `kl_p99.*`, `top1_agreement.*`,
`ppl_ratio.*` (fidelity to the FP16 model on the same windows), `acc.*` (task accuracy, a fraction),
`weight_bytes`, `kv_bytes_per_token`, `decode_tok_s.b<batch>`. A metric a run did not measure is `NaN`."""),
    ("code", """frame = T.records_frame(records)
if len(frame):
    first = ["table", "config", "model", "run_id"]
    metric_cols = [c for c in frame.columns if "." in c or c in ("weight_bytes", "kv_bytes_per_token")]
    display(frame[first + metric_cols])
else:
    print("(no records)")"""),
    ("md", """## Paper-style tables

How to read them:

- **Rows** are configurations, the FP16 reference first. `RTN` is round-to-nearest; `AWQ ... (search+clip)` is the
  full method of Lin et al. (activation-aware scale search and weight clipping); `(LMDeploy smoothing)` is LMDeploy's
  `lite auto_awq` default (a fixed smoothing ratio, no search, no clipping); `+ KV int8` / `+ KV int4` quantize the
  KV cache with LMDeploy's numerics as well.
- **Columns** are models × metrics. ↓ means lower is better, ↑ higher is better.
- **(+x)** after a value is its difference to the FP16 row of the same model (PPL points, accuracy points);
  **(0.42×)** is a ratio to FP16 (memory, throughput). **Bold** marks the best quantized configuration per column.
  `–` means the run did not measure that metric.
- **‡** after a row's label: a record of that row was made by other code than this checkout's (its `code_version`
  differs from what the code computes for its config now; the note under the table names the parts that changed).
  Its numbers are shown, never bold; run its config again to replace it.
- **§** after a decode figure: no ratio to FP16 is formed, because the two runs were measured on different machines
  (host, CPU or GPU) or one run's load average exceeded the machine's cores (or it kept none); the note says which.
- A table holds only runs with the same evaluation settings (data and its hashes, seqlen, number of windows, ...);
  runs with other settings get their own table, never a shared column.
- The notes under each table say what data and protocol the numbers come from, and what "FP16" is for that model:
  for the embedded SmolLM2-135M it is the dequantized Q4_1 GGUF checkpoint, not the original bf16 release, so
  "FP16" there is already a 4-bit model's rounding, and deltas measure quantizing it again."""),
    ("code", """tables = T.build_tables(records)
if len(tables) > 1:
    print(T.split_message(T.group_records(records)))
if render.stale_markdown(tables):  # records made by other code than this checkout's, listed once
    display(Markdown(render.stale_markdown(tables)))
for t in tables:
    display(Markdown(render.to_markdown(t)))"""),
    ("md", """## The paper table

The layout of the AWQ and GPTQ papers (`report/paper_table.py`, written as `results/tables/paper.*`): rows are
methods, one block of rows per KV-cache option; columns are model × weight setting (w4 g128, w4 g64, w3 g64, ...).
A cell is token PPL on the first data split, its 95% interval and its difference to FP16 over the same windows
(paired). Under it: for every column, the lowest PPL against the runner-up and against RTN with the paired 95%
interval of the difference (is it beyond noise?), and the same rows for task accuracy, KL / top-1 agreement to FP16
and weight bytes."""),
    ("code", """from report import paper_render
from report.paper_table import build_paper_table

if records:
    display(Markdown(paper_render.to_markdown(build_paper_table(records))))
else:
    print("(no records)")"""),
    ("md", """## Figures

Each figure shows one model of one table, so all its points share the same evaluation settings.

- **Token perplexity vs weight bits**: one line per method and variant across bit widths; the FP16 reference is the
  square at 16 bits and the dotted horizontal line. The closer a method stays to the dotted line as bits drop, the
  better. Hollow markers and dashed lines are the same configuration with a quantized KV cache.
- **Perplexity (and KL) vs weight memory**: every configuration at its stored weight size. Lower-left is better; the
  dashed line joins the Pareto front, the configurations that nothing beats on both memory and quality. Marker shape
  gives the weight bits (■ 16, ● 4, ▲ 3), colour the method.
- **Decode throughput**: generated tokens per second at each batch size, on the hardware named in the title
  (only when the run measured throughput).
- **KV-cache memory vs context length**: bytes the K/V cache of one sequence needs, for fp16, int8 and int4 KV,
  computed from the model's shape (layers × KV heads × head_dim; int8/int4 also store an fp16 scale and zero per
  token and head). The horizontal lines are the weights, to show where the cache outgrows the model."""),
    ("code", """for t in tables:
    for name, fig in P.figures(t).items():
        display(fig)
        plt.close(fig)
if not tables:
    print("(no figures: no records)")"""),
    ("md", """## Where the time went

Seconds per run from the record's `timings_s`: `quantize` (calibration and search included) and `total`
(load, quantize and every evaluation)."""),
    ("code", """if len(frame):
    display(frame[["table", "config", "model", "quantize_s", "total_s", "hardware"]].round(1))"""),
    ("md", """## Caveats

- Token PPL follows the GPTQ/AWQ protocol (non-overlapping windows, remainder dropped); with a `max_windows` limit it
  covers only the first windows of each split, so compare numbers only within one table.
- On the embedded corpus, the calibration text (`shakespeare_calib`) and the evaluation splits share no text (both
  editions of a play stay on one side), so AWQ's gains there are not memorised calibration data.
- Throughput depends on the hardware and backend named under its table; compare it only within one table. A ratio
  to FP16 is printed only for two runs of one machine under a load within its cores.
  Numbers from the LMDeploy GPU benchmarks live in `results/gpu/`."""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def main() -> Path:
    out = Path(__file__).resolve().parent.parent / "notebooks" / "results.ipynb"
    nb = build()
    # stable cell ids, so rebuilding an unchanged notebook gives an identical file
    for i, c in enumerate(nb.cells):
        c["id"] = f"cell-{i:02d}"
    nbformat.validate(nb)
    nbformat.write(nb, out)
    return out


if __name__ == "__main__":
    print(f"wrote {main()}")
