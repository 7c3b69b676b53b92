"""SmoothQuant W8A8 quality on the embedded model, LMDeploy's numerics (quant/smoothquant/): token PPL on Milton
beside FP16 and beside W8 weights alone (same smoothing, activations left in bf16), with the time each quantization
takes end to end (calibration pass + smoothing + quantization; the calibration pass does not depend on the dtype, so
it runs once and its time is counted in every row).

    python -m benchmarks.quality_smoothquant [--dtypes int8,fp8_e4m3,fp8_e5m2] [--alpha 0.5] [--n-samples 128]

Writes results/benchmarks/quality_smoothquant.json. Anchors (shared/TARGETS.md, same setting): FP16 94.71;
llm-compressor SmoothQuant 0.5 + GPTQ W8A8 int8 97.03; target: within 2% of FP16.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from benchmarks.common import add_quality_args, add_threads_arg, apply_threads, quality_setting, write_result
from harness.config import CalibConfig
from harness.data import calibration_samples
from harness.environment import environment
from quant.smoothquant.config import SmoothQuantConfig
from quant.smoothquant.linear import W8A8Linear
from quant.smoothquant.method import calibration_stats, smoothquant_, weight_bytes


def weights_only_(model) -> None:
    """W8 weights alone: every W8A8Linear's forward without the per-token activation quantization (a diagnostic)."""
    for m in model.modules():
        if isinstance(m, W8A8Linear):
            w = (m.weight.float() * m.scale)
            m.forward = (lambda x, w=w, b=m.bias: torch.nn.functional.linear(x.float(), w, None if b is None else b.float()).to(x.dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="int8,fp8_e4m3,fp8_e5m2")
    ap.add_argument("--alpha", type=float, default=0.5)
    add_quality_args(ap)
    ap.add_argument("--weights-only", default="int8", help="dtypes for which W8 weights alone are scored too ('' = none)")
    ap.add_argument("--out", default="results/benchmarks/quality_smoothquant.json")
    add_threads_arg(ap)
    args = ap.parse_args()
    apply_threads(args)

    base, calib_ids, ppl = quality_setting(args.eval_split, args.eval_windows)
    calib = CalibConfig(n_samples=args.n_samples, seqlen=args.seqlen, seed=0)

    fp, fp_s = ppl(base)
    rows = {"fp16": {"token_ppl": fp, "eval_s": fp_s}}
    print(f"fp16: PPL {fp:.3f} ({fp_s:.0f} s)", flush=True)
    # the calibration pass (FP model, max|x|) is the same for every dtype: once, timed, its time counted in each row
    t0 = time.perf_counter()
    samples = calibration_samples(calib_ids, calib.n_samples, calib.seqlen, calib.seed)
    stats = calibration_stats(base, samples)
    calib_s = time.perf_counter() - t0
    print(f"calibration pass: {calib_s:.1f} s", flush=True)
    for dt in args.dtypes.split(","):
        cfg = SmoothQuantConfig(alpha=args.alpha, dtype=dt, calib=calib)
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        qtensors, _, stages = smoothquant_(model, cfg, samples, stats={k: v.clone() for k, v in stats.items()})
        stages["calibration"] = calib_s
        secs = time.perf_counter() - t0 + calib_s
        p, eval_s = ppl(model)
        row = {"quantize_s": secs, "stages_s": stages, "token_ppl": p, "eval_s": eval_s,
               "ppl_over_fp16": p / fp - 1, "config": dataclasses.asdict(cfg),
               "weight_bytes_ratio": weight_bytes(model, qtensors)["weight_bytes_ratio"]}
        if args.weights_only and dt in args.weights_only.split(","):
            weights_only_(model)
            row["token_ppl_weights_only"] = ppl(model)[0]
        rows[f"w8a8_{dt}"] = row
        print(f"w8a8 {dt}: {secs:.1f} s, PPL {p:.3f} (+{100 * row['ppl_over_fp16']:.2f}%)"
              + (f", W8 only {row['token_ppl_weights_only']:.3f}" if "token_ppl_weights_only" in row else ""), flush=True)
        del model
    result = {
        "benchmark": "quality_smoothquant",
        "setting": {"model": "embedded SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), bf16",
                    "calibration": f"{args.n_samples}x{args.seqlen} shakespeare_calib, seed 0",
                    "eval": f"{args.eval_split}, {ppl.windows}x512 tokens", "alpha": args.alpha,
                    "numerics": "LMDeploy smooth_quant: max|x| smoothing, per-channel weights, per-token activations"},
        "rows": rows,
        "anchors": {"fp16": 94.71, "llm_compressor_smoothquant_gptq_w8a8_int8": 97.03},
        "target_ppl_over_fp16": 0.02,
        "environment": environment(),
    }
    write_result(Path(args.out), result)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk in ("token_ppl", "quantize_s", "token_ppl_weights_only")}
                      for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
