"""Calibration of routed experts on the upcycled SmolLM2 mixture of experts (issue 26): AWQ w4 g64 with the default
fallback (experts under 10% of an even share of tokens calibrated on every token entering their block's MoE), with
`calibrate_all_experts` (every expert on every token) and without fallback (min_share 0: every expert on its routed
tokens only), beside RTN and FP16, on the same windows, so each difference has a paired interval
(harness.confidence.paired_ppl_diff). Also the experts' coverage: per block the fewest and median routed tokens and
the experts below the threshold, and the experts with fewest tokens named.

    nice -n 10 .venv/bin/python -m benchmarks.moe_calibration [--variants fp16,rtn,awq,awq_all_experts,awq_no_fallback]

The short protocol of results/benchmarks/moe_upcycled/README.md: 16x256 calibration tokens of shakespeare_calib
(seed 0), Milton 8 windows of 256 tokens, bf16. One model load; each variant quantizes a copy. Writes
results/benchmarks/moe_upcycled/calibration.json after every variant (a run that dies keeps what it finished).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import add_threads_arg, apply_threads, preset_fields, write_result
from harness.config import CalibConfig, ModelConfig, MoEConfig

MODEL = ModelConfig(name="smollm2-135m-moe4", path="embedded:smollm2-135m-moe4", dtype="bfloat16")
# the harness's AWQ search (conf/quant/awq_w4.yaml)
AWQ_SEARCH = preset_fields("awq_w4", drop=("method", "calib", "w_bit", "group_size"))


def _awq(moe: MoEConfig):
    from quant.awq.config import AWQConfig

    return lambda calib: AWQConfig(w_bit=4, group_size=64, calib=calib, moe=moe, **AWQ_SEARCH)


def _rtn(calib):
    from quant.rtn import RTNConfig

    return RTNConfig(w_bit=4, group_size=64)


VARIANTS = {
    "fp16": None,
    "rtn": _rtn,
    "awq": _awq(MoEConfig()),  # the default: fallback below 10% of an even share
    "awq_all_experts": _awq(MoEConfig(calibrate_all_experts=True)),  # llm-compressor's moe_calibrate_all_experts
    "awq_no_fallback": _awq(MoEConfig(min_share=0.0)),  # only an expert with no token at all would fall back
}
# (a, b): rows whose paired difference PPL(a) - PPL(b) is reported
PAIRS = [("rtn", "fp16"), ("awq", "fp16"), ("awq_all_experts", "fp16"), ("awq_no_fallback", "fp16"),
         ("awq", "rtn"), ("awq_all_experts", "awq"), ("awq_no_fallback", "awq"), ("awq_all_experts", "awq_no_fallback")]


def coverage_table(cal: dict) -> dict:
    """From a record's quant.moe.calibration: per block the fewest / median routed tokens of an expert, the threshold
    and the experts below it; and the experts with fewest tokens over all blocks."""
    rows = []
    for i, tokens in enumerate(cal["expert_tokens"]):
        thr = cal["threshold_tokens"][i]
        rows.append({"block": i, "min": min(tokens), "median": statistics.median(tokens), "max": max(tokens),
                     "threshold": thr, "below": [e for e, t in enumerate(tokens) if t == 0 or t < thr]})
    fewest = sorted(((t, f"model.layers.{i}.mlp.experts.{e}") for i, b in enumerate(cal["expert_tokens"])
                     for e, t in enumerate(b)))[:8]
    return {"per_block": rows, "fewest": [{"expert": n, "tokens": t} for t, n in fewest],
            "total_per_block": sum(cal["expert_tokens"][0])}


def main() -> None:
    from eval.perplexity import ppl_metrics, window_nll
    from harness.confidence import paired_ppl_diff
    from harness.data import calibration_samples, eval_windows, load_text, tokenize_cached
    from harness.models import load_model, load_tokenizer, resolve_model
    from harness.records import provenance
    from quant import METHODS, QuantContext

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--out", default="results/benchmarks/moe_upcycled/calibration.json")
    add_threads_arg(ap)
    ap.add_argument("--show", metavar="JSON", help="print the tables of a result written before, and exit")
    args = ap.parse_args()
    if args.show:
        print(markdown(json.loads(Path(args.show).read_text())))
        return
    apply_threads(args)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")
    if "fp16" not in names:
        names.insert(0, "fp16")  # every difference is paired with the FP16 model's windows

    resolved = resolve_model(MODEL)
    base, tok = load_model(resolved, MODEL), load_tokenizer(resolved, MODEL)
    windows = eval_windows(tokenize_cached(tok, load_text("milton")), args.seqlen, args.eval_windows)
    calib_ids = tokenize_cached(tok, load_text("shakespeare_calib"))
    calib = CalibConfig(n_samples=args.n_samples, seqlen=args.seqlen)
    samples = calibration_samples(calib_ids, calib.n_samples, calib.seqlen, calib.seed)

    rows: dict = {}
    for name in names:
        model, row = base, {}
        if VARIANTS[name] is not None:
            q = VARIANTS[name](calib)
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            out = METHODS.get(q.method)(model, q, QuantContext(calibration=lambda: samples, progress=False))
            row = {"quantize_s": time.perf_counter() - t0, "config": dataclasses.asdict(q), "moe": out.summary["moe"]}
        nll, secs = window_nll(model, windows, 4, progress=False)
        m = ppl_metrics(nll, secs, int(windows.shape[1]))
        row.update(token_ppl=m["token_ppl"], token_ppl_ci95=m["token_ppl_ci95"], window_nll_mean=m["window_nll_mean"])
        rows[name] = row
        print(f"{name}: PPL {m['token_ppl']:.2f} {[round(x, 2) for x in m['token_ppl_ci95']]}"
              + (f", {row['quantize_s']:.0f} s" if "quantize_s" in row else ""), flush=True)
        if model is not base:
            del model
        write(rows, names, args, resolved, paired_ppl_diff, provenance)
    result = write(rows, names, args, resolved, paired_ppl_diff, provenance)
    print(markdown(result))


def markdown(result: dict) -> str:
    """The README's tables from a result: PPL with its interval, the paired differences, and the coverage per block."""
    rows = result["rows"]
    out = ["| row | Milton token PPL [95%] | quantize s | experts fallen back |", "|---|---:|---:|---:|"]
    for k, r in rows.items():
        cal = (r.get("moe") or {}).get("calibration") or {}
        ci = ", ".join(f"{x:.1f}" for x in r["token_ppl_ci95"])
        secs = f"{r['quantize_s']:.0f}" if "quantize_s" in r else "–"
        out.append(f"| {k} | {r['token_ppl']:.2f} [{ci}] | {secs} | "
                   f"{cal.get('experts_fallen_back', '–')} |")
    out += ["", "| PPL(a) − PPL(b) | paired diff [95%] | beyond noise |", "|---|---:|---|"]
    for p in result["pairs"]:
        out.append(f"| {p['a']} − {p['b']} | {p['diff']:+.2f} [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] | "
                   f"{'yes' if p['beyond_noise'] else 'no'} |")
    cov = result["coverage"]
    if cov:
        out += ["", f"Routed token slots per block: {cov['total_per_block']} (top-2). Fewest: "
                + ", ".join(f"`{f['expert']}` {f['tokens']}" for f in cov["fewest"][:5]) + ".", "",
                "| block | min | median | max | threshold | experts below |", "|---:|---:|---:|---:|---:|---|"]
        for r in cov["per_block"]:
            out.append(f"| {r['block']} | {r['min']} | {r['median']:g} | {r['max']} | {r['threshold']:g} | "
                       f"{', '.join(map(str, r['below'])) or '–'} |")
    return "\n".join(out)


def write(rows, names, args, resolved, paired_ppl_diff, provenance) -> dict:
    pairs = []
    for a, b in PAIRS:
        if a in rows and b in rows:
            d = paired_ppl_diff(rows[a]["window_nll_mean"], rows[b]["window_nll_mean"])
            pairs.append({"a": a, "b": b, "diff": d.estimate, "ci95": list(d.ci95), "windows": d.n_windows,
                          "beyond_noise": d.beyond_noise})
    cal = next((r["moe"]["calibration"] for r in rows.values() if (r.get("moe") or {}).get("calibration")), None)
    cov = coverage_table(cal) if cal else None
    result = {
        "benchmark": "moe_calibration",
        "setting": {"model": f"{MODEL.name} ({resolved.origin})", "model_sha": resolved.model_sha,
                    "w_bit": 4, "group_size": 64, "awq_search": AWQ_SEARCH,
                    "calibration": f"{args.n_samples}x{args.seqlen} shakespeare_calib seed 0",
                    "eval": f"milton, {args.eval_windows}x{args.seqlen} tokens, bf16",
                    "threads": torch.get_num_threads()},
        "ppl": {k: round(r["token_ppl"], 3) for k, r in rows.items()},
        "pairs": pairs,
        # the routed counts are the same in every AWQ variant (fp16 propagation: each block sees the FP16 model's
        # hidden states); the first calibrated row's are shown
        "coverage": cov,
        "fewest_tokens": cov["fewest"] if cov else None,
        "rows": rows,
        "complete": all(n in rows for n in names),
        "provenance": provenance(),
    }
    write_result(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
