"""Throughput and memory through LMDeploy's engine, each figure beside its roofline (in the spirit of LMDeploy's
benchmark/profile_throughput.py: fixed prompt and output lengths, a fixed number of concurrent requests).

For each variant (a list of config overrides: FP16, AWQ W4A16, AWQ W4A16 + KV int8) one child process composes the
RunConfig from conf/, writes the synthetic checkpoint if the model is synthetic, starts the engine from that config
(backends.lmdeploy) and measures, for each batch size in eval.throughput.batch_sizes:

  - output tok/s: all generated tokens / (last token - first request submitted), as profile_throughput reports it;
  - decode tok/s: tokens after each request's first / (last token - the moment every request had its first token):
    the steady batched decode, which is what the decode roofline bounds;
  - time to first token (mean over requests) and per-token latency p50 / p99 (gaps between streamed chunks, split
    evenly over the tokens each chunk carries);
  - weight memory (the engine's parameters on the GPU) and the KV cache: blocks allocated, tokens they hold.

Beside each: the decode roofline (HBM bandwidth / bytes read per step: weights + batch x mean context x KV bytes per
token; backends.roofline), the prefill floor for TTFT, and the KV capacity that cache_max_entry_count of the free
memory would hold. Prompts are random token ids (no tokenizer in the loop), generation ignores EOS, greedy.

With backend.tp=N (tensor parallelism over N GPUs) every memory figure and roofline is per GPU: the weights one GPU
holds (its 1/N of the linears plus the embedding, LM head and norms, which LMDeploy's Llama keeps whole on every
rank), the KV bytes per token of the heads it stores, its free memory, and one GPU's bandwidth over the bytes it
reads per step (backends.roofline.per_gpu). KV capacity in tokens is what the engine holds: every GPU stores those
tokens for its share of the heads. A tp > 1 result is saved as <name>_<variant>_tp<N>.json.

    python -m benchmarks.lmdeploy_throughput --out results/gpu                  # the three variants, Llama-2-7B shape
    python -m benchmarks.lmdeploy_throughput --report results/gpu               # table + plot from saved JSON
    python -m benchmarks.lmdeploy_throughput --model llama2_13b_synthetic --out DIR backend.tp=2   # two GPUs
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from backends import roofline as rl
from harness.environment import environment
from harness.labels import config_label
from harness.log import logger
from harness.registry import Registry

NAME = "lmdeploy_throughput"
BASE_OVERRIDES = [
    "backend=lmdeploy",
    "eval.perplexity.enabled=false",
    "eval.throughput.enabled=true",
    "eval.throughput.batch_sizes=[1,32]",
    "eval.throughput.prompt_len=128",
    "eval.throughput.gen_len=256",
    "eval.throughput.warmup=1",
    "eval.throughput.repeats=3",
    # graphs are captured up to this batch; 32 is the largest measured
    "backend.max_batch_size=32",
]
VARIANTS: Registry[list[str]] = Registry("benchmark variant")
VARIANTS.add("fp16", ["quant=fp16", "kv=fp16"])
VARIANTS.add("awq_w4a16", ["quant=awq", "quant.w_bit=4", "quant.group_size=128", "kv=fp16"])
VARIANTS.add("awq_w4a16_kv8", ["quant=awq", "quant.w_bit=4", "quant.group_size=128", "kv=int8"])
# the same checkpoint through the harness's W4A16 kernels inside the engine (backends/lmdeploy_w4a16.py)
VARIANTS.add("awq_w4a16_gemlite", ["quant=awq", "quant.w_bit=4", "quant.group_size=128", "kv=fp16",
                                   "backend.w4a16_kernel=gemlite"])
VARIANTS.add("awq_w4a16_hybrid", ["quant=awq", "quant.w_bit=4", "quant.group_size=128", "kv=fp16",
                                  "backend.w4a16_kernel=hybrid"])
VARIANTS.add("awq_w4a16_tinygemm", ["quant=awq", "quant.w_bit=4", "quant.group_size=128", "kv=fp16",
                                    "backend.w4a16_kernel=tinygemm"])
DEFAULT_VARIANTS = ["fp16", "awq_w4a16", "awq_w4a16_kv8", "awq_w4a16_gemlite"]


def label(cfg) -> str:
    """What a row measured, from its resolved config (harness.labels), naming the W4A16 kernel when it is not the
    engine's own."""
    base = config_label(cfg.quant, cfg.kv.bits, kv_format=cfg.kv.format)
    kernel = cfg.backend.w4a16_kernel
    return base if kernel == "engine" or cfg.quant.method == "fp16" else f"{base} [{kernel} W4A16 kernel]"


def variant_id(variant: str, tp: int = 1) -> str:
    """The name a result is saved under: the variant, with _tp<N> for tensor parallelism over N > 1 GPUs."""
    return variant if tp == 1 else f"{variant}_tp{tp}"


log = logger("bench")


# ----------------------------------------------------------------------------------------------- pure arithmetic


@dataclass
class RequestTrace:
    t_submit: float
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, new tokens in this chunk)

    @property
    def n_tokens(self) -> int:
        return sum(n for _, n in self.chunks)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(traces: list[RequestTrace]) -> dict:
    """One round of concurrent requests -> the figures above (seconds and tokens per second)."""
    traces = [t for t in traces if t.chunks]
    if not traces:
        return {"error": "no tokens came back"}
    t0 = min(t.t_submit for t in traces)
    t_end = max(t.chunks[-1][0] for t in traces)
    t_all_first = max(t.chunks[0][0] for t in traces)
    total = sum(t.n_tokens for t in traces)
    after_first = sum(t.n_tokens - t.chunks[0][1] for t in traces)
    per_token = []
    for t in traces:
        for (a, _), (b, n) in zip(t.chunks, t.chunks[1:]):
            per_token += [(b - a) / n] * n
    decode_span = t_end - t_all_first
    return {
        "requests": len(traces),
        "output_tokens": total,
        "elapsed_s": t_end - t0,
        "output_tok_s": total / (t_end - t0),
        "decode_tok_s": after_first / decode_span if decode_span > 0 else float("nan"),
        "ttft_s": statistics.fmean(t.chunks[0][0] - t.t_submit for t in traces),
        "ttft_max_s": max(t.chunks[0][0] - t.t_submit for t in traces),
        "token_latency_p50_s": percentile(per_token, 50),
        "token_latency_p99_s": percentile(per_token, 99),
    }


def median_rounds(rounds: list[dict]) -> dict:
    """The median of each figure over repeated rounds (and the spread of decode tok/s, to show the noise)."""
    keys = [k for k in rounds[0] if isinstance(rounds[0][k], (int, float))]
    out = {k: statistics.median(r[k] for r in rounds) for k in keys}
    d = [r["decode_tok_s"] for r in rounds]
    out["decode_tok_s_min"], out["decode_tok_s_max"] = min(d), max(d)
    out["rounds"] = len(rounds)
    return out


def rooflines(mb: rl.ModelBytes, batch: int, prompt_len: int, gen_len: int, bw: float, flops: Optional[float]) -> dict:
    ctx = rl.mean_decode_context(prompt_len, gen_len)
    out = {"mean_context": ctx,
           "bytes_per_step": rl.decode_bytes_per_step(mb, batch, ctx),
           "decode_tok_s": rl.decode_roofline_tok_s(mb, batch, ctx, bw),
           "token_latency_s": rl.step_time_floor_s(mb, batch, ctx, bw)}
    if flops:
        out["ttft_s"] = rl.prefill_floor_s(mb, batch * prompt_len, flops, bw)
    return out


# ----------------------------------------------------------------------------------------------- report


def _fmt(x, spec=",.0f"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _tp(r: dict) -> int:
    return r.get("tp") or r.get("config", {}).get("backend", {}).get("tp") or 1


def _weights_gpu(r: dict) -> tuple[Optional[float], bool]:
    """(weight bytes on one GPU, whether measured): the engine's parameters where it ran in this process, else the
    shard arithmetic (tp > 1: the model lives in the worker processes)."""
    m = r["memory"]
    if m.get("weights_gpu_bytes"):
        return m["weights_gpu_bytes"], True
    return m.get("weights_per_gpu_bytes") or m.get("weights_per_gpu_expected_bytes"), False


def markdown(results: list[dict]) -> str:
    env = next((r["environment"] for r in results if "environment" in r), {})
    multi = any(_tp(r) > 1 for r in results)
    lines = []
    if any(r.get("synthetic") for r in results):
        lines.append("**Synthetic weights** (random values at the real shape): throughput and memory only, no quality.\n")
    lines.append(f"GPU {env.get('gpu')} (driver {env.get('driver')}), torch {env.get('torch')}, "
                 f"LMDeploy {env.get('lmdeploy')} {'/'.join(sorted({r.get('engine', '?') for r in results}))} engine, "
                 f"transformers {env.get('transformers')}. Roofline bandwidth {_fmt(env.get('roofline_bw_bytes_s', 0) / 1e12, '.2f')} TB/s "
                 f"(datasheet; measured device copy {_fmt(env.get('copy_bw_bytes_s', 0) / 1e12, '.2f')} TB/s).\n")
    if multi:
        lines.append("tp = GPUs the model is split over (tensor parallelism). Weights, KV bytes per token, rooflines and "
                     "floors are **per GPU**: one GPU's bandwidth over the bytes that GPU reads per step (its 1/tp of the "
                     "linears and KV heads, plus the LM head and norms every rank holds whole). KV tokens: what the "
                     "engine holds; each GPU stores its share of the heads for all of them. Weights marked * are the "
                     "shard arithmetic (the model lives in the engine's worker processes), the others the engine's "
                     "parameters.\n")
    tp_col, tp_sep = ("| tp ", "|---") if multi else ("", "")
    lines.append(f"| config {tp_col}| batch | decode tok/s | roofline | % | output tok/s | TTFT ms (floor) | "
                 "per-token p50 / p99 ms (floor) | weights GiB per GPU (stored) | KV B/token per GPU | KV tokens at cache share (ideal) |")
    lines.append(f"|---{tp_sep}|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        tpc = f"| {_tp(r)} " if multi else ""
        if "error" in r:
            lines.append(f"| {r['label']} {tpc}| – | failed: {r['error'][:80]} | | | | | | | | |")
            continue
        w, measured = _weights_gpu(r)
        for b in r["batches"]:
            m, f = b["measured"], b["roofline"]
            pct = 100 * m["decode_tok_s"] / f["decode_tok_s"]
            lines.append(
                f"| {r['label']} {tpc}| {b['batch']} | {_fmt(m['decode_tok_s'])} | {_fmt(f['decode_tok_s'])} | {pct:.0f}% | "
                f"{_fmt(m['output_tok_s'])} | {_fmt(1e3 * m['ttft_s'], '.1f')} ({_fmt(1e3 * f.get('ttft_s', float('nan')), '.1f')}) | "
                f"{_fmt(1e3 * m['token_latency_p50_s'], '.2f')} / {_fmt(1e3 * m['token_latency_p99_s'], '.2f')} "
                f"({_fmt(1e3 * f['token_latency_s'], '.2f')}) | "
                f"{_fmt((w or float('nan')) / 2**30, '.2f')}{'' if measured else '*'} "
                f"({_fmt(r['memory']['weights_stored_bytes'] / 2**30, '.2f')}) | {r['memory']['kv_bytes_per_token']:,} | "
                f"{_fmt(r['memory'].get('kv_capacity_tokens'))} ({_fmt(r['memory'].get('kv_capacity_ideal_tokens'))}) |")
    ok = [r for r in results if "error" not in r]
    for tp in sorted({_tp(r) for r in ok}):
        by = {r["variant"]: r for r in ok if _tp(r) == tp}
        on = f" at tp={tp}" if multi else ""
        if "awq_w4a16" in by and "awq_w4a16_kv8" in by and by["awq_w4a16"]["memory"].get("kv_capacity_tokens"):
            ratio = by["awq_w4a16_kv8"]["memory"]["kv_capacity_tokens"] / by["awq_w4a16"]["memory"]["kv_capacity_tokens"]
            lines.append(f"\nKV int8 holds {ratio:.2f}x the tokens of FP16 KV{on} (same AWQ weights, cache share "
                         f"{by['awq_w4a16']['config']['backend']['cache_max_entry_count']}).")
        if "fp16" in by and "awq_w4a16" in by:
            for i, b in enumerate(by["fp16"]["batches"]):
                a = by["awq_w4a16"]["batches"][i]
                lines.append(f"\nBatch {b['batch']}{on}: AWQ W4A16 / FP16 decode = "
                             f"{a['measured']['decode_tok_s'] / b['measured']['decode_tok_s']:.2f}x "
                             f"(roofline ratio {a['roofline']['decode_tok_s'] / b['roofline']['decode_tok_s']:.2f}x).")
    if multi:
        lines.append("\n| config | batch | tp=1 tok/s | tp>1 tok/s | speed-up (roofline speed-up) | TTFT tp=1 / tp>1 ms | KV tokens tp=1 / tp>1 |")
        lines.append("|---|---|---|---|---|---|---|")
        for r1 in (r for r in ok if _tp(r) == 1):
            for rn in (r for r in ok if _tp(r) > 1 and r["variant"] == r1["variant"]):
                for b1 in r1["batches"]:
                    bn = next((b for b in rn["batches"] if b["batch"] == b1["batch"]), None)
                    if bn is None:
                        continue
                    m1, mn = b1["measured"], bn["measured"]
                    lines.append(
                        f"| {r1['label']} | {b1['batch']} | {_fmt(m1['decode_tok_s'])} | {_fmt(mn['decode_tok_s'])} (tp={_tp(rn)}) | "
                        f"{mn['decode_tok_s'] / m1['decode_tok_s']:.2f}x ({bn['roofline']['decode_tok_s'] / b1['roofline']['decode_tok_s']:.2f}x) | "
                        f"{_fmt(1e3 * m1['ttft_s'], '.1f')} / {_fmt(1e3 * mn['ttft_s'], '.1f')} | "
                        f"{_fmt(r1['memory'].get('kv_capacity_tokens'))} / {_fmt(rn['memory'].get('kv_capacity_tokens'))} |")
    lines.append(f"\nPrompt {results[0].get('prompt_len')} tokens, {results[0].get('gen_len')} output tokens; medians of "
                 f"{results[0].get('repeats')} rounds after {results[0].get('warmup')} warm-up round(s).")
    return "\n".join(lines) + "\n"


def _plot_bars(ok: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    batches = [b["batch"] for b in ok[0]["batches"]]
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(4.2 * (len(batches) + 1), 4))
    labels = [r["label"].replace(" (synthetic)", "").replace(" + ", "\n+ ").replace(" g", "\ng") for r in ok]
    x = range(len(ok))
    for ax, i in zip(axes, range(len(batches))):
        meas = [r["batches"][i]["measured"]["decode_tok_s"] for r in ok]
        roof = [r["batches"][i]["roofline"]["decode_tok_s"] for r in ok]
        ax.bar(x, roof, color="none", edgecolor="gray", hatch="//", label="roofline")
        ax.bar(x, meas, color="tab:blue", width=0.6, label="measured")
        for xi, m, f in zip(x, meas, roof):
            ax.text(xi, m, f"{m:,.0f}\n({100 * m / f:.0f}%)", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"decode tok/s, batch {batches[i]}")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.legend(fontsize=7)
    ax = axes[-1]
    cap = [r["memory"].get("kv_capacity_tokens") or 0 for r in ok]
    ideal = [r["memory"].get("kv_capacity_ideal_tokens") or 0 for r in ok]
    ax.bar(x, ideal, color="none", edgecolor="gray", hatch="//", label="ideal")
    ax.bar(x, cap, color="tab:green", width=0.6, label="engine")
    for xi, c in zip(x, cap):
        ax.text(xi, c, f"{c / 1e3:,.0f}k", ha="center", va="bottom", fontsize=8)
    share = ok[0]["config"]["backend"]["cache_max_entry_count"]
    ax.set_title(f"KV capacity, tokens (cache share {share})")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.legend(fontsize=7)
    _suptitle(fig, ok)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _suptitle(fig, ok: list[dict]) -> None:
    env = ok[0].get("environment", {})
    tag = "SYNTHETIC weights, " if any(r.get("synthetic") for r in ok) else ""
    fig.suptitle(f"LMDeploy {env.get('lmdeploy')} ({ok[0].get('engine')} engine), {ok[0]['model']} — "
                 f"{tag}{env.get('gpu')}", fontsize=10)


def _plot_tp(ok: list[dict], path: Path) -> None:
    """One panel per config: decode tok/s against batch, a line per tp (solid measured, dotted its roofline);
    a last panel: KV capacity per config and tp."""
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in ok))
    tps = sorted({_tp(r) for r in ok})
    colors = {tp: c for tp, c in zip(tps, ("tab:blue", "tab:orange", "tab:green", "tab:red"))}
    fig, axes = plt.subplots(1, len(variants) + 1, figsize=(4.4 * (len(variants) + 1), 4.2))
    for ax, v in zip(axes, variants):
        for r in sorted((r for r in ok if r["variant"] == v), key=_tp):
            tp, bs = _tp(r), [b["batch"] for b in r["batches"]]
            meas = [b["measured"]["decode_tok_s"] for b in r["batches"]]
            roof = [b["roofline"]["decode_tok_s"] for b in r["batches"]]
            ax.plot(bs, meas, "o-", color=colors[tp], label=f"tp={tp}")
            ax.plot(bs, roof, ":", color=colors[tp], label=f"tp={tp} roofline")
            for x, m, f in zip(bs, meas, roof):
                ax.annotate(f"{m:,.0f} ({100 * m / f:.0f}%)", (x, m), textcoords="offset points", xytext=(4, -10 if tp == 1 else 5),
                            fontsize=7, color=colors[tp])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.set_xlabel("batch (concurrent requests)")
        ax.set_ylabel("decode tok/s")
        ax.set_title(next(r for r in ok if r["variant"] == v)["label"].replace(" (synthetic)", ""), fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    ax = axes[-1]
    width = 0.8 / len(tps)
    for j, tp in enumerate(tps):
        caps = [next((r["memory"].get("kv_capacity_tokens") or 0 for r in ok if r["variant"] == v and _tp(r) == tp), 0)
                for v in variants]
        xs = [i + (j - (len(tps) - 1) / 2) * width for i in range(len(variants))]
        ax.bar(xs, caps, width=width, color=colors[tp], label=f"tp={tp}")
        for x, c in zip(xs, caps):
            ax.text(x, c, f"{c / 1e3:,.0f}k", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(variants)), [next(r["label"] for r in ok if r["variant"] == v).replace(" (synthetic)", "").replace(" + ", "\n+ ") for v in variants], fontsize=7)
    share = ok[0]["config"]["backend"]["cache_max_entry_count"]
    ax.set_title(f"KV capacity, tokens (cache share {share} per GPU)", fontsize=9)
    ax.legend(fontsize=7)
    _suptitle(fig, ok)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    ok = [r for r in results if "error" not in r]
    (_plot_tp if len({_tp(r) for r in ok}) > 1 else _plot_bars)(ok, path)


def _saved_ids(out_dir: Path, name: str) -> list[str]:
    """Variant ids with a result saved as <name>_<id>.json (a file of another name stem that shares the prefix, or
    a report, is not one)."""
    ids = []
    for p in out_dir.glob(f"{name}_*.json"):
        try:
            d = json.loads(p.read_text())
        except ValueError:
            continue
        vid = d.get("variant_id") or d.get("variant") if isinstance(d, dict) else None
        if vid and p.stem == f"{name}_{vid}":
            ids.append(vid)
    order = {v: i for i, v in enumerate(DEFAULT_VARIANTS)}

    def key(vid: str):
        base, _, tp = vid.partition("_tp")
        if not tp.isdigit():
            base, tp = vid, "1"
        return (int(tp), order.get(base, len(order)), base)

    return sorted(ids, key=key)


def write_report(out_dir: Path, variants: Optional[list[str]] = None, command: Optional[str] = None,
                 name: str = NAME) -> list[dict]:
    from harness.records import write_json_atomic

    if not variants:  # every saved variant, the registered ones in their usual order first, tp=1 before tp>1
        variants = _saved_ids(out_dir, name)
    files = [out_dir / f"{name}_{v}.json" for v in variants]
    results = [json.loads(f.read_text()) for f in files if f.exists()]
    if not results:
        raise SystemExit(f"no {name}_<variant>.json under {out_dir}")
    write_json_atomic(out_dir / f"{name}.json", {"command": command, "results": results})
    md = markdown(results)
    if command:
        md += f"\nCommand: `{command}`\n"
    (out_dir / f"{name}.md").write_text(md)
    if any("error" not in r for r in results):
        plot(results, out_dir / f"{name}.png")
    print(md)
    return results


# ----------------------------------------------------------------------------------------------- GPU side (child)


def copy_bandwidth(nbytes: int = 1 << 31, iters: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second (median of `iters`)."""
    import torch

    a = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    times = []
    for i in range(iters + 3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def model_bytes(model_dir: Path, kv_bits: int, tp: int = 1) -> tuple[rl.ModelBytes, rl.ModelBytes, dict]:
    """(what a decode step reads of the whole model, what one of `tp` GPUs reads, bytes stored and per GPU).

    Sharding as LMDeploy's PyTorch Llama does it: the linears (q/k/v, o, gate/up, down) split over the ranks; the
    embedding table, the LM head and the norms are whole on every rank; the KV heads split."""
    from harness import synthetic

    c = json.loads((model_dir / "config.json").read_text())
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    layers, nkv = c["num_hidden_layers"], c.get("num_key_value_heads") or c["num_attention_heads"]
    kv = rl.kv_bytes_per_token(layers, nkv, hd, kv_bits, dtype_bytes=2)
    kv_gpu = rl.kv_bytes_per_token(layers, rl.kv_heads_per_gpu(nkv, tp), hd, kv_bits, dtype_bytes=2)
    m = synthetic.read_marker(model_dir)
    if m:
        wb, params = m["weight_bytes"], m["parameters"]
        head = "lm_head" if wb["lm_head"] else "embedding"  # a tied LM head is the embedding table
        experts = c.get("num_experts") or c.get("num_local_experts") or 0  # an MoE: a step reads the routed-to
        # (a marker written before routed_expert was counted: 0, every expert read, as then)
        mb = rl.ModelBytes(wb["decode_read"], kv, params["matmul"], replicated_read_bytes=wb[head] + wb["norm"],
                           replicated_matmul_params=params[head],
                           routed_expert_read_bytes=wb.get("routed_expert", 0),
                           routed_expert_params=params.get("routed_expert", 0),
                           experts=experts, experts_per_token=c.get("num_experts_per_tok") or 0)
        per_gpu = wb["linear"] // tp + wb["embedding"] + wb["lm_head"] + wb["norm"]
        stored = {"weights_stored_bytes": wb["total"], "weights_per_gpu_expected_bytes": per_gpu, **wb}
    else:
        total = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        # a real checkpoint: every stored byte counted as read (an upper bound by the embedding table), all sharded
        mb = rl.ModelBytes(total, kv, total // 2)
        stored = {"weights_stored_bytes": total, "weights_per_gpu_expected_bytes": total // tp}
    return mb, rl.per_gpu(mb, tp, kv_gpu), stored


def gpu_memory_used_mib() -> list[dict]:
    """Memory in use on every GPU (nvidia-smi: no CUDA context is made on GPUs this process does not use)."""
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20).stdout.strip()
        return [dict(zip(("index", "used_mib", "total_mib"), map(int, line.split(",")))) for line in q.splitlines()]
    except Exception as e:
        return [{"error": f"{type(e).__name__}: {e}"}]


MULTICAST_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


def _proc_children(proc: Path = Path("/proc")) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ...": comm may hold spaces
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def process_tree_env(root: int, keys: tuple[str, ...] = MULTICAST_ENV) -> list[dict]:
    """`root` and every process below it (the engine's spawned workers, an api_server's): pid, command line, and
    the values of `keys` in its environment (None where unset), read from /proc."""
    kids, out, todo = _proc_children(), [], [root]
    while todo:
        pid = todo.pop(0)
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0") if "=" in kv)
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").strip()
        except OSError:
            continue
        out.append({"pid": pid, "cmd": cmd[:160], "env": {k: env.get(k) for k in keys}})
        todo += sorted(kids.get(pid, []))
    return out


def multicast_off(procs: list[dict]) -> bool:
    """Every process has NVLink multicast switched off (MULTICAST_ENV as backends.lmdeploy sets them)."""
    want = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    return bool(procs) and all(p["env"].get(k) == v for p in procs for k, v in want.items())


def ensure_executor_backend(tp: int, importer=None) -> Optional[str]:
    """LMDeploy's PyTorch engine runs tp > 1 through Ray on CUDA unless LMDEPLOY_EXECUTOR_BACKEND says otherwise; where
    ray does not import (the GPU test machines), use its multiprocessing executor ('mp'). Returns the choice made."""
    import importlib

    if tp == 1:
        return None
    if os.environ.get("LMDEPLOY_EXECUTOR_BACKEND"):
        return os.environ["LMDEPLOY_EXECUTOR_BACKEND"]
    try:
        (importer or importlib.import_module)("ray")
        return "ray"
    except ImportError:
        os.environ["LMDEPLOY_EXECUTOR_BACKEND"] = "mp"
        log("ray does not import: LMDEPLOY_EXECUTOR_BACKEND=mp (LMDeploy's multiprocessing executor)")
        return "mp"


async def _request(engine, session_mgr, ids: list[int], gen_config, trace: RequestTrace) -> None:
    trace.t_submit = time.perf_counter()
    req = await engine.preprocess(messages=None, session_id=session_mgr.get(), gen_config=gen_config,
                                  input_ids=ids, do_preprocess=False)
    seen = 0
    async for out in engine.generate(req, stream_response=True):
        n = out.generate_token_len - seen
        if n > 0:
            trace.chunks.append((time.perf_counter(), n))
            seen = out.generate_token_len


def run_round(pipe, batch: int, prompt_len: int, gen_len: int, vocab: int, seed: int) -> dict:
    import random

    from lmdeploy import GenerationConfig

    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    gc = GenerationConfig(max_new_tokens=gen_len, min_new_tokens=gen_len, ignore_eos=True, do_sample=False, top_k=1)
    traces = [RequestTrace(0.0) for _ in range(batch)]

    async def _all():
        await asyncio.gather(*[_request(pipe.async_engine, pipe.session_mgr, p, gc, t) for p, t in zip(prompts, traces)])

    asyncio.run_coroutine_threadsafe(_all(), pipe.internal_thread.loop).result()
    s = summarize(traces)
    short = [t.n_tokens for t in traces if t.n_tokens != gen_len]
    if short:
        s["short_requests"] = short
    return s


def run_variant(variant: str, model: str, extra: list[str], out_dir: Path, synth_root: Optional[str],
                tokenizer: Optional[str], name: str = NAME) -> dict:
    import torch

    from harness.records import run_id
    from backends import lmdeploy as lb
    from backends import lmdeploy_w4a16 as lw
    from harness import synthetic
    from harness.compose import compose
    import quant  # noqa: F401  (registers every method's config, which conf/quant/ selects)

    overrides = [f"model={model}", *BASE_OVERRIDES, *VARIANTS.get(variant), *extra]
    cfg = compose(overrides)
    synthetic.refuse_quality_metrics(cfg)
    tp = cfg.eval.throughput
    ngpu = cfg.backend.tp
    executor = ensure_executor_backend(ngpu)
    env = environment()
    env["copy_bw_bytes_s"] = copy_bandwidth()
    env["roofline_bw_bytes_s"] = rl.lookup(rl.HBM_BANDWIDTH_BYTES_S, env.get("gpu", "")) or env["copy_bw_bytes_s"]
    env["peak_fp16_flops"] = rl.lookup(rl.PEAK_FP16_FLOPS, env.get("gpu", ""))
    log(f"{variant}: {env.get('gpu')}, copy {env['copy_bw_bytes_s'] / 1e12:.2f} TB/s")

    t = time.perf_counter()
    model_dir = lb.resolve_model_dir(cfg, synth_root, tokenizer)
    t_ckpt = time.perf_counter() - t
    mb_model, mb, stored = model_bytes(model_dir, cfg.kv.bits, ngpu)  # mb: what one of the tp GPUs reads
    torch.cuda.empty_cache()
    free_before, total_mem = torch.cuda.mem_get_info()
    smi_before = gpu_memory_used_mib()

    t = time.perf_counter()
    pipe, engine, reason = lb.make_pipeline(cfg, model_dir)
    t_engine = time.perf_counter() - t
    built = lw.built_layers()
    if cfg.backend.w4a16_kernel != "engine" and cfg.quant.method != "fp16" and not built["layers"]:
        raise RuntimeError(f"backend.w4a16_kernel={cfg.backend.w4a16_kernel}: the engine built no W4A16 linear "
                           f"through the harness's builder; its rows would be the engine's own kernel")
    procs = process_tree_env(os.getpid())  # this process and the engine's workers
    kv = lb.kv_cache_stats(pipe)
    wbytes = lb.module_bytes(lb.engine_model(pipe))  # {} where the model lives in worker processes (tp > 1)
    weights_gpu = wbytes.get("parameters") or stored["weights_per_gpu_expected_bytes"]
    share = cfg.backend.cache_max_entry_count
    memory = {"tp": ngpu, "weights_stored_bytes": stored["weights_stored_bytes"],
              "weights_gpu_bytes": wbytes.get("parameters"), "buffers_gpu_bytes": wbytes.get("buffers"),
              "weights_per_gpu_bytes": weights_gpu,
              "weights_per_gpu_source": ("engine parameters (measured)" if wbytes.get("parameters") else
                                         "shard arithmetic: linears / tp + embedding, LM head and norms whole"),
              "weights_per_gpu_expected_bytes": stored["weights_per_gpu_expected_bytes"],
              "weights_stored_breakdown": stored,
              "decode_weight_read_bytes": mb.weight_read_bytes, "decode_weight_read_bytes_model": mb_model.weight_read_bytes,
              "kv_bytes_per_token": mb.kv_bytes_per_token, "kv_bytes_per_token_model": mb_model.kv_bytes_per_token,
              "free_before_engine_bytes": free_before, "gpu_total_bytes": total_mem,
              "kv_capacity_tokens": kv.get("capacity_tokens"), "kv_blocks": kv,
              "kv_capacity_ideal_tokens": rl.kv_capacity_tokens(free_before - weights_gpu, share, mb.kv_bytes_per_token),
              "gpu_free_after_engine_bytes": torch.cuda.mem_get_info()[0],
              "gpu_memory_used_mib_before_engine": smi_before, "gpu_memory_used_mib_after_engine": gpu_memory_used_mib()}
    log(f"{variant} tp={ngpu}: engine {engine} up in {t_engine:.0f} s; KV {kv}; weights/GPU {weights_gpu / 2**30:.2f} GiB; "
        f"{len(procs)} processes, multicast off in all: {multicast_off(procs)}")

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    batches = []
    for batch in tp.batch_sizes:
        for w in range(tp.warmup):
            run_round(pipe, batch, tp.prompt_len, tp.gen_len, vocab, seed=10_000 + w)
        rounds = [run_round(pipe, batch, tp.prompt_len, tp.gen_len, vocab, seed=r) for r in range(tp.repeats)]
        m = median_rounds(rounds)
        f = rooflines(mb, batch, tp.prompt_len, tp.gen_len, env["roofline_bw_bytes_s"], env["peak_fp16_flops"])
        f_copy = rooflines(mb, batch, tp.prompt_len, tp.gen_len, env["copy_bw_bytes_s"], env["peak_fp16_flops"])
        batches.append({"batch": batch, "measured": m, "rounds": rounds, "roofline": f,
                        "roofline_at_copy_bw": f_copy, "fraction_of_roofline": m["decode_tok_s"] / f["decode_tok_s"]})
        log(f"{variant} tp={ngpu} batch {batch}: decode {m['decode_tok_s']:,.0f} tok/s (roofline {f['decode_tok_s']:,.0f}), "
            f"output {m['output_tok_s']:,.0f} tok/s, TTFT {1e3 * m['ttft_s']:.1f} ms, "
            f"p50/p99 {1e3 * m['token_latency_p50_s']:.2f}/{1e3 * m['token_latency_p99_s']:.2f} ms")
    marker = synthetic.read_marker(model_dir)
    result = {
        "benchmark": NAME, "variant": variant, "variant_id": variant_id(variant, ngpu), "tp": ngpu,
        "label": label(cfg) + (" (synthetic)" if marker else ""),
        "synthetic": bool(marker), "synthetic_note": synthetic.NOTE if marker else None, "model": cfg.model.name,
        "model_dir": str(model_dir), "checkpoint": marker, "checkpoint_write_s": t_ckpt,
        "engine": engine, "engine_fallback_reason": reason, "engine_start_s": t_engine,
        "w4a16_kernel": lw.label(cfg.backend.w4a16_kernel), "w4a16_layers_built": lw.built_layers(),
        "executor_backend": executor or "uni", "engine_processes": procs, "multicast_off_in_all_processes": multicast_off(procs),
        "engine_kwargs": lb.engine_kwargs(cfg, model_dir, engine),
        "prompt_len": tp.prompt_len, "gen_len": tp.gen_len, "warmup": tp.warmup, "repeats": tp.repeats,
        "memory": memory, "batches": batches, "environment": env,
        "overrides": overrides, "run_id": run_id(cfg), "config": asdict(cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    from harness.records import write_json_atomic

    write_json_atomic(out_dir / f"{name}_{variant_id(variant, ngpu)}.json", result)
    pipe.close()
    return result


def _tp_of(overrides: list[str]) -> int:
    from harness.compose import compose
    import quant  # noqa: F401  (registers every method's config, which conf/quant/ selects)

    return compose(["backend=lmdeploy", *overrides]).backend.tp


def run_child(cmd: list[str], timeout_s: Optional[float]) -> str:
    """Run one variant's process in a process group of its own (the engine's workers join it); past `timeout_s`
    the whole group is killed. Returns 'ok', 'exit <code>' or 'timeout'."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout"
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    try:  # workers left behind by a child that exited
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return "ok" if rc == 0 else f"exit {rc}"


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS.names())
    ap.add_argument("--model", default="llama2_7b_synthetic", help="a conf/model option")
    ap.add_argument("--out", default="results/gpu")
    ap.add_argument("--name", default=NAME, help="file name stem of the results (<name>_<variant>.json, <name>.md, ...)")
    ap.add_argument("--synthetic-root", default=None, help="default: <cache>/synthetic")
    ap.add_argument("--tokenizer", default=None, help="tokenizer files for synthetic checkpoints")
    ap.add_argument("--variant-timeout", type=float, default=None,
                    help="seconds one variant (checkpoint, engine start, every batch) may take before its processes are killed")
    ap.add_argument("--report", metavar="DIR", help="only rebuild the table and plot from saved JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every variant")
    a = ap.parse_args(argv)
    if a.report:
        prev = Path(a.report) / f"{a.name}.json"  # keep the command that produced the numbers
        write_report(Path(a.report), command=json.loads(prev.read_text()).get("command") if prev.exists() else None,
                     name=a.name)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.child:
        run_variant(a.child, a.model, a.overrides, out, a.synthetic_root, a.tokenizer, a.name)
        return
    command = "python -m benchmarks.lmdeploy_throughput " + " ".join(argv)
    ngpu = _tp_of(a.overrides)
    ids = [variant_id(v, ngpu) for v in a.variants]
    for v, vid in zip(a.variants, ids):
        # one process per variant: a fresh CUDA context, so each engine sees the same free memory
        cmd = [sys.executable, "-m", "benchmarks.lmdeploy_throughput", "--child", v, "--model", a.model,
               "--out", str(out), "--name", a.name, *(["--synthetic-root", a.synthetic_root] if a.synthetic_root else []),
               *(["--tokenizer", a.tokenizer] if a.tokenizer else []), *a.overrides]
        log(f"variant {vid}")
        path, t0 = out / f"{a.name}_{vid}.json", time.time()
        status = run_child(cmd, a.variant_timeout)
        if status != "ok":
            if path.exists() and path.stat().st_mtime >= t0:  # measured and written; it failed on the way out
                log(f"variant {vid}: {status} after its results were written; kept")
                continue
            from harness.records import write_json_atomic

            write_json_atomic(path, {"benchmark": NAME, "variant": v, "variant_id": vid, "tp": ngpu, "label": v,
                                     "error": f"child {status}" + (f" (limit {a.variant_timeout:.0f} s)" if status == "timeout" else "")})
    write_report(out, ids, command, name=a.name)


if __name__ == "__main__":
    main(sys.argv[1:])
