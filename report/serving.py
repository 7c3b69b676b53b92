"""GPU serving benchmarks in the report: every `benchmarks.lmdeploy_throughput` summary under <results>/gpu/ (a JSON
with "command" and "results", written by that benchmark's write_report) -> one table of decode throughput beside its
roofline, time to first token, weights and KV capacity per GPU, for every config, tensor-parallel degree and batch;
and one figure of decode tokens/s against batch, a line per config and tp.

Reads the benchmark's own JSON; never recomputes. Synthetic-weight runs are labelled so in every row."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

BENCHMARK = "lmdeploy_throughput"
GIB = 1024 ** 3


@dataclass
class ServingTable:
    source: Path  # the benchmark summary it was read from
    frame: pd.DataFrame
    command: str | None
    machine: str  # GPU, driver, torch and LMDeploy versions, from the results' own environment


def find_summaries(results_dir: Path) -> list[Path]:
    """Benchmark summaries (not the per-variant files) under <results>/gpu/, sorted by path."""
    found = []
    for p in sorted((Path(results_dir) / "gpu").rglob("*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and isinstance(d.get("results"), list) and d["results"] and all(
                isinstance(r, dict) and r.get("benchmark") == BENCHMARK for r in d["results"]):
            found.append(p)
    return found


def _machine(results: list[dict]) -> str:
    env = next((r.get("environment") for r in results if r.get("environment")), {}) or {}
    n_gpu = max(int((r.get("environment") or {}).get("gpu_count") or 1) for r in results)
    parts = [f"{n_gpu}x {env.get('gpu', '?')}", f"driver {env.get('driver', '?')}",
             f"torch {env.get('torch', '?')}", f"LMDeploy {env.get('lmdeploy', '?')}"]
    engines = sorted({str(r.get("engine")) for r in results if r.get("engine")})
    if engines:
        parts.append(f"{'/'.join(engines)} engine")
    return ", ".join(parts)


def rows(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        if "error" in r:
            continue
        mem = r.get("memory", {})
        weights = mem.get("weights_gpu_bytes") or mem.get("weights_per_gpu_bytes")
        for b in r.get("batches", []):
            m, roof = b.get("measured", {}), b.get("roofline", {})
            out.append({
                "model": r.get("model"), "config": r.get("label"), "tp": int(r.get("tp", 1)), "batch": b["batch"],
                "decode_tok_s": m.get("decode_tok_s"), "roofline_tok_s": roof.get("decode_tok_s"),
                "fraction_of_roofline": b.get("fraction_of_roofline"),
                "ttft_ms": None if m.get("ttft_s") is None else 1e3 * m["ttft_s"],
                "weights_gib_per_gpu": None if weights is None else weights / GIB,
                "kv_tokens": mem.get("kv_capacity_tokens"),
                "synthetic": bool(r.get("synthetic")),
            })
    return out


def build(results_dir: Path) -> list[ServingTable]:
    tables = []
    for p in find_summaries(results_dir):
        d = json.loads(p.read_text())
        frame = pd.DataFrame(rows(d["results"]))
        if frame.empty:
            continue
        order = {c: i for i, c in enumerate(dict.fromkeys(frame["config"]))}  # configs as the benchmark ran them
        frame = frame.sort_values(["config", "tp", "batch"], key=lambda s: s.map(order) if s.name == "config" else s,
                                  kind="stable").reset_index(drop=True)
        tables.append(ServingTable(p, frame,
                                   d.get("command"), _machine(d["results"])))
    return tables


def _cell(v, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and pd.isna(v)) else format(v, spec)


def to_markdown(t: ServingTable, results_dir: Path) -> str:
    rel = t.source.relative_to(results_dir) if t.source.is_relative_to(results_dir) else t.source
    lines = [f"### Serving: {rel}", "",
             "| model | config | tp | batch | decode tok/s | roofline tok/s | % of roofline | TTFT ms | weights GiB/GPU | KV tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in t.frame.to_dict("records"):
        frac = r["fraction_of_roofline"]
        lines.append(f"| {r['model']} | {r['config']} | {r['tp']} | {r['batch']} | {_cell(r['decode_tok_s'], ',.0f')} | "
                     f"{_cell(r['roofline_tok_s'], ',.0f')} | {_cell(None if frac is None else 100 * frac, '.0f')} | "
                     f"{_cell(r['ttft_ms'], '.1f')} | {_cell(r['weights_gib_per_gpu'], '.2f')} | {_cell(r['kv_tokens'], ',')} |")
    lines.append("")
    if t.frame["synthetic"].any():
        lines.append("Synthetic weights (random values at the real shape): throughput and memory only, no quality.")
    lines.append(f"Machine: {t.machine}. Roofline: HBM bandwidth / bytes read per decode step.")
    if t.command:
        lines.append(f"Command: `{t.command}`")
    return "\n".join(lines) + "\n"


def plot(t: ServingTable, path: Path) -> list[Path]:
    """Decode tokens/s against batch: one panel per config, one line per tp (solid measured, dotted roofline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(t.frame["config"]))
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 3.4), squeeze=False)
    for ax, cfg in zip(axes[0], configs):
        sub = t.frame[t.frame["config"] == cfg]
        for i, (tp, g) in enumerate(sub.groupby("tp")):
            color = f"C{i}"
            ax.plot(g["batch"], g["decode_tok_s"], "o-", color=color, label=f"tp={tp}")
            ax.plot(g["batch"], g["roofline_tok_s"], ":", color=color, label=f"tp={tp} roofline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted(sub["batch"].unique()), [str(b) for b in sorted(sub["batch"].unique())])
        ax.set_title(cfg, fontsize=9)
        ax.set_xlabel("batch (concurrent requests)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("decode tokens/s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{t.frame['model'].iloc[0]} — {t.machine}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "pdf"):
        p = path.with_suffix(f".{ext}")
        fig.savefig(p, dpi=130)
        out.append(p)
    plt.close(fig)
    return out


def write(results_dir: Path, figures: bool = True) -> tuple[list[Path], list[Path], str]:
    """results/tables/serving.{md,csv} and results/figures/serving_<source stem>.{png,pdf}."""
    results_dir = Path(results_dir)
    tables = build(results_dir)
    if not tables:
        return [], [], ""
    md = "\n".join(to_markdown(t, results_dir) for t in tables)
    out_dir = results_dir / "tables"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving.md").write_text(md)
    frames = [t.frame.assign(source=str(t.source.relative_to(results_dir)), machine=t.machine) for t in tables]
    pd.concat(frames).to_csv(out_dir / "serving.csv", index=False)
    figs = []
    if figures:
        for t in tables:
            figs += plot(t, results_dir / "figures" / f"serving_{t.source.stem}")
    return [out_dir / "serving.md", out_dir / "serving.csv"], figs, md
