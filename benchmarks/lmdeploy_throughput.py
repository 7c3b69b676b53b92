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

    python -m benchmarks.lmdeploy_throughput --out results/gpu                  # the three variants, Llama-2-7B shape
    python -m benchmarks.lmdeploy_throughput --report results/gpu               # table + plot from saved JSON
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
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
VARIANTS.add("awq_w4a16", ["quant.method=awq", "quant.w_bit=4", "quant.group_size=128", "kv=fp16"])
VARIANTS.add("awq_w4a16_kv8", ["quant.method=awq", "quant.w_bit=4", "quant.group_size=128", "kv=int8"])
DEFAULT_VARIANTS = ["fp16", "awq_w4a16", "awq_w4a16_kv8"]


def label(cfg) -> str:
    """What a row measured, from its resolved config (harness.labels)."""
    return config_label(cfg.quant, cfg.kv.bits)


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


def markdown(results: list[dict]) -> str:
    env = next((r["environment"] for r in results if "environment" in r), {})
    lines = []
    if any(r.get("synthetic") for r in results):
        lines.append("**Synthetic weights** (random values at the real shape): throughput and memory only, no quality.\n")
    lines.append(f"GPU {env.get('gpu')} (driver {env.get('driver')}), torch {env.get('torch')}, "
                 f"LMDeploy {env.get('lmdeploy')} {'/'.join(sorted({r.get('engine', '?') for r in results}))} engine, "
                 f"transformers {env.get('transformers')}. Roofline bandwidth {_fmt(env.get('roofline_bw_bytes_s', 0) / 1e12, '.2f')} TB/s "
                 f"(datasheet; measured device copy {_fmt(env.get('copy_bw_bytes_s', 0) / 1e12, '.2f')} TB/s).\n")
    lines.append("| config | batch | decode tok/s | roofline | % | output tok/s | TTFT ms (floor) | "
                 "per-token p50 / p99 ms (floor) | weights GiB (stored) | KV B/token | KV tokens at cache share (ideal) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | – | failed: {r['error'][:80]} | | | | | | | | |")
            continue
        for b in r["batches"]:
            m, f = b["measured"], b["roofline"]
            pct = 100 * m["decode_tok_s"] / f["decode_tok_s"]
            lines.append(
                f"| {r['label']} | {b['batch']} | {_fmt(m['decode_tok_s'])} | {_fmt(f['decode_tok_s'])} | {pct:.0f}% | "
                f"{_fmt(m['output_tok_s'])} | {_fmt(1e3 * m['ttft_s'], '.1f')} ({_fmt(1e3 * f.get('ttft_s', float('nan')), '.1f')}) | "
                f"{_fmt(1e3 * m['token_latency_p50_s'], '.2f')} / {_fmt(1e3 * m['token_latency_p99_s'], '.2f')} "
                f"({_fmt(1e3 * f['token_latency_s'], '.2f')}) | "
                f"{_fmt(r['memory'].get('weights_gpu_bytes', float('nan')) / 2**30, '.2f')} "
                f"({_fmt(r['memory']['weights_stored_bytes'] / 2**30, '.2f')}) | {r['memory']['kv_bytes_per_token']:,} | "
                f"{_fmt(r['memory'].get('kv_capacity_tokens'))} ({_fmt(r['memory'].get('kv_capacity_ideal_tokens'))}) |")
    by = {r["variant"]: r for r in results if "error" not in r}
    if "awq_w4a16" in by and "awq_w4a16_kv8" in by and by["awq_w4a16"]["memory"].get("kv_capacity_tokens"):
        ratio = by["awq_w4a16_kv8"]["memory"]["kv_capacity_tokens"] / by["awq_w4a16"]["memory"]["kv_capacity_tokens"]
        lines.append(f"\nKV int8 holds {ratio:.2f}x the tokens of FP16 KV (same AWQ weights, cache share "
                     f"{by['awq_w4a16']['config']['backend']['cache_max_entry_count']}).")
    if "fp16" in by and "awq_w4a16" in by:
        for i, b in enumerate(by["fp16"]["batches"]):
            a = by["awq_w4a16"]["batches"][i]
            lines.append(f"\nBatch {b['batch']}: AWQ W4A16 / FP16 decode = "
                         f"{a['measured']['decode_tok_s'] / b['measured']['decode_tok_s']:.2f}x "
                         f"(roofline ratio {a['roofline']['decode_tok_s'] / b['roofline']['decode_tok_s']:.2f}x).")
    lines.append(f"\nPrompt {results[0].get('prompt_len')} tokens, {results[0].get('gen_len')} output tokens; medians of "
                 f"{results[0].get('repeats')} rounds after {results[0].get('warmup')} warm-up round(s).")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
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
    env = ok[0].get("environment", {})
    tag = "SYNTHETIC weights, " if any(r.get("synthetic") for r in ok) else ""
    fig.suptitle(f"LMDeploy {env.get('lmdeploy')} ({ok[0].get('engine')} engine), {ok[0]['model']} — "
                 f"{tag}{env.get('gpu')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: Path, variants: Optional[list[str]] = None, command: Optional[str] = None) -> list[dict]:
    from harness.records import write_json_atomic

    if not variants:  # every saved variant, the registered ones in their usual order first
        saved = [p.stem[len(NAME) + 1:] for p in out_dir.glob(f"{NAME}_*.json")]
        variants = sorted(saved, key=lambda v: (DEFAULT_VARIANTS.index(v) if v in DEFAULT_VARIANTS else len(DEFAULT_VARIANTS), v))
    files = [out_dir / f"{NAME}_{v}.json" for v in variants]
    results = [json.loads(f.read_text()) for f in files if f.exists()]
    if not results:
        raise SystemExit(f"no {NAME}_<variant>.json under {out_dir}")
    write_json_atomic(out_dir / f"{NAME}.json", {"command": command, "results": results})
    md = markdown(results)
    if command:
        md += f"\nCommand: `{command}`\n"
    (out_dir / f"{NAME}.md").write_text(md)
    if any("error" not in r for r in results):
        plot(results, out_dir / f"{NAME}.png")
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


def model_bytes(model_dir: Path, kv_bits: int) -> tuple[rl.ModelBytes, dict]:
    from harness import synthetic

    c = json.loads((model_dir / "config.json").read_text())
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv = rl.kv_bytes_per_token(c["num_hidden_layers"], c.get("num_key_value_heads") or c["num_attention_heads"], hd,
                               kv_bits, dtype_bytes=2)
    m = synthetic.read_marker(model_dir)
    if m:
        wb, params = m["weight_bytes"], m["parameters"]
        return rl.ModelBytes(wb["decode_read"], kv, params["matmul"]), {"weights_stored_bytes": wb["total"], **wb}
    total = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    # a real checkpoint: every stored byte counted as read (an upper bound by the embedding table)
    return rl.ModelBytes(total, kv, total // 2), {"weights_stored_bytes": total}


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


def run_variant(variant: str, model: str, extra: list[str], out_dir: Path, synth_root: Optional[str], tokenizer: Optional[str]) -> dict:
    import torch

    from harness.records import run_id
    from backends import lmdeploy as lb
    from harness import synthetic
    from harness.compose import compose

    overrides = [f"model={model}", *BASE_OVERRIDES, *VARIANTS.get(variant), *extra]
    cfg = compose(overrides)
    synthetic.refuse_quality_metrics(cfg)
    tp = cfg.eval.throughput
    env = environment()
    env["copy_bw_bytes_s"] = copy_bandwidth()
    env["roofline_bw_bytes_s"] = rl.lookup(rl.HBM_BANDWIDTH_BYTES_S, env.get("gpu", "")) or env["copy_bw_bytes_s"]
    env["peak_fp16_flops"] = rl.lookup(rl.PEAK_FP16_FLOPS, env.get("gpu", ""))
    log(f"{variant}: {env.get('gpu')}, copy {env['copy_bw_bytes_s'] / 1e12:.2f} TB/s")

    t = time.perf_counter()
    model_dir = lb.resolve_model_dir(cfg, synth_root, tokenizer)
    t_ckpt = time.perf_counter() - t
    mb, stored = model_bytes(model_dir, cfg.kv.bits)
    torch.cuda.empty_cache()
    free_before, total_mem = torch.cuda.mem_get_info()

    t = time.perf_counter()
    pipe, engine, reason = lb.make_pipeline(cfg, model_dir)
    t_engine = time.perf_counter() - t
    kv = lb.kv_cache_stats(pipe)
    wbytes = lb.module_bytes(lb.engine_model(pipe))
    weights_gpu = wbytes.get("parameters") or stored["weights_stored_bytes"]
    share = cfg.backend.cache_max_entry_count
    memory = {"weights_stored_bytes": stored["weights_stored_bytes"], "weights_gpu_bytes": wbytes.get("parameters"),
              "buffers_gpu_bytes": wbytes.get("buffers"), "weights_stored_breakdown": stored,
              "decode_weight_read_bytes": mb.weight_read_bytes, "kv_bytes_per_token": mb.kv_bytes_per_token,
              "free_before_engine_bytes": free_before, "gpu_total_bytes": total_mem,
              "kv_capacity_tokens": kv.get("capacity_tokens"), "kv_blocks": kv,
              "kv_capacity_ideal_tokens": rl.kv_capacity_tokens(free_before - weights_gpu, share, mb.kv_bytes_per_token),
              "gpu_free_after_engine_bytes": torch.cuda.mem_get_info()[0]}
    log(f"{variant}: engine {engine} up in {t_engine:.0f} s; KV {kv}; weights {weights_gpu / 2**30:.2f} GiB")

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
        log(f"{variant} batch {batch}: decode {m['decode_tok_s']:,.0f} tok/s (roofline {f['decode_tok_s']:,.0f}), "
            f"output {m['output_tok_s']:,.0f} tok/s, TTFT {1e3 * m['ttft_s']:.1f} ms, "
            f"p50/p99 {1e3 * m['token_latency_p50_s']:.2f}/{1e3 * m['token_latency_p99_s']:.2f} ms")
    marker = synthetic.read_marker(model_dir)
    result = {
        "benchmark": NAME, "variant": variant, "label": label(cfg) + (" (synthetic)" if marker else ""),
        "synthetic": bool(marker), "synthetic_note": synthetic.NOTE if marker else None, "model": cfg.model.name,
        "model_dir": str(model_dir), "checkpoint": marker, "checkpoint_write_s": t_ckpt,
        "engine": engine, "engine_fallback_reason": reason, "engine_start_s": t_engine,
        "engine_kwargs": lb.engine_kwargs(cfg, model_dir, engine),
        "prompt_len": tp.prompt_len, "gen_len": tp.gen_len, "warmup": tp.warmup, "repeats": tp.repeats,
        "memory": memory, "batches": batches, "environment": env,
        "overrides": overrides, "run_id": run_id(cfg), "config": asdict(cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    from harness.records import write_json_atomic

    write_json_atomic(out_dir / f"{NAME}_{variant}.json", result)
    pipe.close()
    return result


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS.names())
    ap.add_argument("--model", default="llama2_7b_synthetic", help="a conf/model option")
    ap.add_argument("--out", default="results/gpu")
    ap.add_argument("--synthetic-root", default=None, help="default: <cache>/synthetic")
    ap.add_argument("--tokenizer", default=None, help="tokenizer files for synthetic checkpoints")
    ap.add_argument("--report", metavar="DIR", help="only rebuild the table and plot from saved JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every variant")
    a = ap.parse_args(argv)
    if a.report:
        prev = Path(a.report) / f"{NAME}.json"  # keep the command that produced the numbers
        write_report(Path(a.report), command=json.loads(prev.read_text()).get("command") if prev.exists() else None)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.child:
        run_variant(a.child, a.model, a.overrides, out, a.synthetic_root, a.tokenizer)
        return
    command = "python -m benchmarks.lmdeploy_throughput " + " ".join(argv)
    for v in a.variants:
        # one process per variant: a fresh CUDA context, so each engine sees the same free memory
        cmd = [sys.executable, "-m", "benchmarks.lmdeploy_throughput", "--child", v, "--model", a.model,
               "--out", str(out), *(["--synthetic-root", a.synthetic_root] if a.synthetic_root else []), *(["--tokenizer", a.tokenizer] if a.tokenizer else []),
               *a.overrides]
        log(f"variant {v}")
        res = subprocess.run(cmd)
        if res.returncode != 0:
            from harness.records import write_json_atomic

            write_json_atomic(out / f"{NAME}_{v}.json", {"benchmark": NAME, "variant": v, "label": v,
                                                        "error": f"child exited with {res.returncode}"})
    write_report(out, a.variants, command)


if __name__ == "__main__":
    main(sys.argv[1:])
