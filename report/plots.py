"""Figures from the report's tables (report.tables.Table): each figure draws one model of one table, so every
point in it shares the table's eval settings. Functions return matplotlib Figures (the notebook shows them);
`save_figures` writes PNG + PDF. Token PPL points carry error bars (their 95% interval) where records have one.

- ppl_vs_bits: token PPL against nominal weight bits, one line per method
- quality_vs_memory: token PPL (and KL, when measured) against stored weight bytes, with the Pareto front
- decode_throughput: decode tokens/s by batch size and config (when measured)
- kv_memory_vs_context: KV-cache bytes per sequence against context length for 16/8/4-bit KV, from the model shape
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

import matplotlib

from report.record_view import kv_bytes_per_token, kv_shape, weight_bits
from report.tables import Column, Table

KV_BITS = (16, 8, 4)
CONTEXTS = [2 ** k for k in range(8, 16)]  # 256 .. 32k tokens


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _subtitle(t: Table, mid, windows_field: str = "eval.perplexity.max_windows") -> str:
    s = t.settings
    mw = s.get(windows_field)
    return (f"{t.model_name(mid)} · data: {s.get('data.name')} ({', '.join(s.get('data.splits') or ())}), "
            f"seqlen {s.get('eval.perplexity.seqlen')}, {'all' if mw is None else mw} windows/split")


def _colors(t: Table) -> dict:
    """One colour per series (config without bit width), stable across a table's figures."""
    cmap = matplotlib.colormaps["tab10"]
    series = []
    for r in t.rows:
        base = r.label.series.replace(r.label.kv, "")
        if base not in series and r.label.method != "FP16":
            series.append(base)
    return {s: cmap(i % 10) for i, s in enumerate(series)}


REFERENCE_COLOR = "0.15"
BIT_MARKERS = {16: "s", 8: "p", 4: "o", 3: "^", 2: "v"}  # marker = weight bits; colour = method and variant


def _lighten(color, amount: float):
    r, g, b, a = matplotlib.colors.to_rgba(color)
    return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount, a)


def _style(t: Table, row) -> dict:
    """Colour by method/variant, marker by weight bits, hollow marker and dashed line for a quantized KV cache."""
    base = row.label.series.replace(row.label.kv, "")
    c = REFERENCE_COLOR if row.label.method == "FP16" else _colors(t)[base]
    hollow = bool(row.label.kv)
    return {"color": c, "marker": BIT_MARKERS.get(row.label.w_bit, "D"), "markerfacecolor": "white" if hollow else c,
            "markeredgewidth": 1.6 if hollow else 1.0, "linestyle": "--" if hollow else "-"}


def _bar_color(t: Table, row):
    """Bars have no marker: fewer weight bits = a lighter shade of the method's colour."""
    c = _style(t, row)["color"]
    return _lighten(c, {3: 0.4, 2: 0.65}.get(row.label.w_bit, 0.0))


def _kv_dodge(row) -> float:
    """Configs with a quantized KV cache sit slightly right of their weight-only twin, so neither hides the other."""
    return {(8, "int"): 1.04, (4, "int"): 1.08, (8, "fp8_e4m3"): 1.12, (8, "fp8_e5m2"): 1.16}.get(
        (row.label.kv_bits, row.label.kv_format), 1.0)


def _splits(t: Table, mid, metric: str) -> list:
    return [c.key for m, c in t.columns if m == mid and c.metric == metric]


def _axes(n: int, width: float = 5.2, height: float = 4.0):
    plt = _plt()
    fig, axes = plt.subplots(1, n, figsize=(width * n + 1.8, height), squeeze=False)
    return fig, list(axes[0])


def _legend(fig, axes):
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   frameon=False, fontsize=9)


def _finish(fig, title: str, t: Table, mid, windows_field: str = "eval.perplexity.max_windows"):
    fig.suptitle(f"{title}\n{_subtitle(t, mid, windows_field)}", fontsize=11)
    fig.tight_layout()
    return fig


def _error_bar(ax, t: Table, row, mid, col: Column, x: float, y: float, color) -> None:
    """The value's 95% interval as a vertical error bar, where the record has one (older records: none)."""
    ci = t.interval(row, mid, col)
    if ci is not None:
        ax.errorbar([x], [y], yerr=[[max(y - ci[0], 0.0)], [max(ci[1] - y, 0.0)]], fmt="none", ecolor=color,
                    elinewidth=1.2, capsize=3, zorder=4)


def ppl_vs_bits(t: Table, mid) -> Optional[object]:
    splits = _splits(t, mid, "token_ppl")
    if not splits or not any(not r.reference and mid in r.records for r in t.rows):
        return None
    fig, axes = _axes(len(splits))
    bits_seen = set()
    for ax, split in zip(axes, splits):
        col = Column("token_ppl", split)
        series: dict = {}
        for r in t.rows:
            v = t.value(r, mid, col)
            if v is None:
                continue
            if r.reference:
                ax.axhline(v, color="0.4", lw=1, ls=":", zorder=0)
                ax.plot([16], [v], label=t.legend_label(r, mid, "FP16 (reference; dotted line = its PPL)"),
                        color=REFERENCE_COLOR, marker="s", ls="none", ms=7)
                _error_bar(ax, t, r, mid, col, 16, v, REFERENCE_COLOR)
                bits_seen.add(16)
                continue
            series.setdefault(r.label.series, []).append((weight_bits(r.records[mid]), v, r))
        for name, pts in series.items():
            pts.sort(key=lambda p: p[0])
            bits_seen.update(b for b, _, _ in pts)
            st = _style(t, pts[0][2])
            ax.plot([b * _kv_dodge(r) for b, _, r in pts], [v for _, v, _ in pts], color=st["color"],
                    linestyle=st["linestyle"])
            stale = next((r for _, _, r in pts if t.is_stale(r, mid)), None)  # a point of it made by other code
            ax.plot([], [], label=t.legend_label(stale, mid, name) if stale else name, ms=7,
                    **{**st, "marker": "o"})  # legend entry: line + fill style
            for b, v, r in pts:
                ax.plot([b * _kv_dodge(r)], [v], ls="none", ms=8, **{k: x for k, x in _style(t, r).items() if k != "linestyle"})
                _error_bar(ax, t, r, mid, col, b * _kv_dodge(r), v, _style(t, r)["color"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(bits_seen))
        ax.set_xticklabels([str(b) for b in sorted(bits_seen)])
        ax.minorticks_off()
        ax.set_xlim(min(bits_seen) / 1.25, max(bits_seen) * 1.25)
        ax.set_xlabel("weight bits (nominal w_bit; FP16 = 16; KV-quantized configs drawn slightly right)"
                      if any(r.label.kv for r in t.rows) else "weight bits (nominal w_bit; FP16 = 16)")
        ax.set_ylabel("token perplexity ↓")
        ax.set_title(f"split: {split}", fontsize=10)
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    return _finish(fig, "Token perplexity vs weight bits", t, mid)


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (less memory and lower error), by memory."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def quality_vs_memory(t: Table, mid, metric: str = "token_ppl") -> Optional[object]:
    splits = _splits(t, mid, metric)
    wcol = Column("weight_bytes", "")
    rows = [r for r in t.rows if t.value(r, mid, wcol) is not None]
    if not splits or len(rows) < 2:
        return None
    unit, div = t.weight_unit
    fig, axes = _axes(len(splits))
    for ax, split in zip(axes, splits):
        col = Column(metric, split)
        pts = []
        for r in rows:
            v = t.value(r, mid, col)
            if v is None:
                continue
            x = t.value(r, mid, wcol) / div
            pts.append((x, v))
            # hollow (KV-quantized) markers are larger and drawn first, so a filled twin at the same spot shows inside
            ax.plot([x], [v], ls="none", ms=12 if r.label.kv else 8, zorder=2 if r.label.kv else 3,
                    label=t.legend_label(r, mid),
                    **{k: s for k, s in _style(t, r).items() if k != "linestyle"})
            _error_bar(ax, t, r, mid, col, x, v, _style(t, r)["color"])
        front = _pareto(pts)
        if len(front) > 1:
            ax.plot([x for x, _ in front], [y for _, y in front], color="0.5", lw=1, ls="--",
                    label="Pareto front (nothing is both smaller and better)", zorder=1)
        ax.set_xlabel(f"stored weights ({unit} = $10^{len(str(int(div))) - 1}$ bytes)")
        ax.set_ylabel(("token perplexity" if metric == "token_ppl" else "mean KL(FP16 ‖ quantized) (nats/token)") + " ↓")
        ax.set_title(f"split: {split}", fontsize=10)
        ax.grid(alpha=0.3)
        xs = [x for x, _ in pts]
        ax.set_xlim(0, max(xs) * 1.1)
        if metric != "token_ppl":
            ax.set_ylim(bottom=0)  # KL has a natural zero: FP16 itself
    _legend(fig, axes)
    what = "Token perplexity" if metric == "token_ppl" else "KL divergence to FP16"
    return _finish(fig, f"{what} vs weight memory (lower-left is better)", t, mid,
                   "eval.perplexity.max_windows" if metric == "token_ppl" else "eval.fidelity.max_windows")


def decode_throughput(t: Table, mid) -> Optional[object]:
    cols = [c for m, c in t.columns if m == mid and c.metric == "decode_tok_s"]
    rows = [r for r in t.rows if any(t.value(r, mid, c) is not None for c in cols)]
    if not cols or not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cols) * len(rows) ** 0.5 + 4), 4.2))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(cols))]
        vals = [t.value(r, mid, c) or 0.0 for c in cols]
        # a quantized config the int4 kernel could not run (e.g. 3 bits) was timed on dequantized bf16 weights: say so
        fallback = (r.records[mid].get("metrics", {}).get("throughput") or {}).get("int4_kernel_fallback")
        loaded = next((t.unfit[(r.key, mid, c)] for c in cols if (r.key, mid, c) in t.unfit), None)
        label = t.legend_label(r, mid) + (" · dequantized bf16 weights" if fallback else "") + (
            f" · {loaded}" if loaded else "")  # a speed measured under load says so where it is drawn
        ax.bar(xs, vals, width, label=label, color=_bar_color(t, r), edgecolor="black", lw=0.5,
               hatch="//" if r.label.kv else None)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"batch {c.key[0]}" + (f"\n{c.key[1]}" if len({k.key[1] for k in cols}) > 1 else "")
                        for c in cols])
    ax.set_ylabel("decode throughput (tokens/s) ↑")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    devs = sorted({c.key[1] for c in cols})
    s = t.settings
    fig.suptitle(f"Decode throughput by batch size on {', '.join(devs)}\n{t.model_name(mid)} · prompt "
                 f"{s.get('eval.throughput.prompt_len')} tokens, {s.get('eval.throughput.gen_len')} new tokens", fontsize=11)
    fig.tight_layout()
    return fig


def kv_memory_vs_context(t: Table, mid) -> Optional[object]:
    shape = next((kv_shape(r.records[mid]) for r in t.rows if mid in r.records and kv_shape(r.records[mid])), None)
    if shape is None:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.8, 4.4))
    unit, div = ("MB", 1e6)
    ls = {16: "-", 8: "--", 4: ":"}
    for bits in KV_BITS:
        bpt = kv_bytes_per_token(shape, bits)
        ax.plot(CONTEXTS, [bpt * n / div for n in CONTEXTS], ls=ls[bits], marker="o", ms=4, color="C0" if bits == 16 else
                ("C1" if bits == 8 else "C2"), label=f"KV {'fp16' if bits == 16 else f'int{bits}'} ({bpt:,} B/token)")
    # weights for scale: where the cache of one sequence outgrows the model
    wcol = Column("weight_bytes", "")
    ws = sorted({(t.value(r, mid, wcol), t.legend_label(r, mid, r.label.text)) for r in t.rows
                 if t.value(r, mid, wcol) is not None
                 and not r.label.kv}, key=lambda x: -x[0])
    shown = [ws[0], ws[-1]] if len(ws) > 1 else ws
    for (w, name), c in zip(shown, ("0.3", "0.6")):
        ax.axhline(w / div, color=c, lw=1, ls="-.", label=f"weights: {name} ({w / div:,.0f} {unit})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(CONTEXTS)
    ax.set_xticklabels([f"{n // 1024}k" if n >= 1024 else str(n) for n in CONTEXTS])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens, one sequence)")
    ax.set_ylabel(f"KV-cache memory ({unit} = $10^6$ bytes)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=9, frameon=False)
    fig.suptitle(f"KV-cache memory vs context length, batch 1\n{t.model_name(mid)}: {shape['num_hidden_layers']} layers × "
                 f"{shape['num_key_value_heads']} KV heads × head_dim {shape['head_dim']}; int8/int4 add fp16 scale+zero "
                 f"per token and head", fontsize=11)
    fig.tight_layout()
    return fig


FIGURES: dict[str, Callable] = {
    "ppl_vs_bits": ppl_vs_bits,
    "ppl_vs_memory": lambda t, mid: quality_vs_memory(t, mid, "token_ppl"),
    "kl_vs_memory": lambda t, mid: quality_vs_memory(t, mid, "kl_mean"),
    "decode_throughput": decode_throughput,
    "kv_memory_vs_context": kv_memory_vs_context,
}


def figures(t: Table) -> dict[str, object]:
    """name -> Figure for every figure this table has data for (one per model)."""
    out = {}
    for mid in t.models:
        for name, fn in FIGURES.items():
            fig = fn(t, mid)
            if fig is not None:
                out[f"{name}" if len(t.models) == 1 else f"{name}_{_slug(mid[0])}"] = fig
    return out


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in str(s)).strip("_")


def save_figures(tables: list[Table], out_dir: Path) -> list[Path]:
    """PNG + PDF of every figure; with several tables, file names carry the table number."""
    matplotlib.use("Agg")
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = re.compile(rf"^(table\d+_)?({'|'.join(FIGURES)})(_.*)?\.(png|pdf)$")
    for old in out_dir.iterdir():  # this report's figures replace an older report's (never other files)
        if ours.match(old.name):
            old.unlink()
    paths = []
    for t in tables:
        for name, fig in figures(t).items():
            stem = name if len(tables) == 1 else f"table{t.index}_{name}"
            for ext in ("png", "pdf"):
                p = out_dir / f"{stem}.{ext}"
                fig.savefig(p, dpi=150 if ext == "png" else None, bbox_inches="tight")
                paths.append(p)
            plt.close(fig)
    return paths
