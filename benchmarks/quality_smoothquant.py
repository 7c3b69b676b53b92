"""SmoothQuant W8A8 quality on the embedded model, LMDeploy's numerics (quant/smoothquant/): token PPL on Milton
beside FP16 and beside W8 weights alone (same smoothing, activations left in bf16), with the time each quantization
takes end to end (calibration pass + smoothing + quantization). Each row is a pipeline run (experiments.pipeline):
its record goes to results/runs/<run_id>.json, where the report and the paper table read it.

    python -m benchmarks.quality_smoothquant [--dtypes int8,fp8_e4m3,fp8_e5m2] [--alpha 0.5] [--n-samples 128]

Writes results/benchmarks/quality_smoothquant.json. Anchors (shared/TARGETS.md, same setting): FP16 94.71;
llm-compressor SmoothQuant 0.5 + GPTQ W8A8 int8 97.03; target: within 2% of FP16.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import (add_quality_args, add_record_args, add_threads_arg, apply_threads, quality_config,
                               quality_row, write_result)
from eval.perplexity import ppl_metrics, window_nll
from experiments import pipeline
from harness.config import CalibConfig
from harness.environment import environment
from quant.smoothquant.config import SmoothQuantConfig
from quant.smoothquant.linear import W8A8Linear


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
    add_record_args(ap)
    add_threads_arg(ap)
    args = ap.parse_args()
    apply_threads(args)

    calib = CalibConfig(n_samples=args.n_samples, seqlen=args.seqlen, seed=0)
    setting = dict(eval_split=args.eval_split, n_windows=args.eval_windows, results_dir=args.results_dir,
                   reuse=args.reuse)
    fp16 = quality_config(**setting)  # every row's config validated before the first runs
    configs = {dt: quality_config(quant=SmoothQuantConfig(alpha=args.alpha, dtype=dt, calib=calib), **setting)
               for dt in args.dtypes.split(",")}
    weights_only = set(args.weights_only.split(",")) if args.weights_only else set()

    rows = {"fp16": quality_row(fp16)}  # each row a pipeline record under <results-dir>/runs/
    fp = rows["fp16"]["token_ppl"]
    print(f"fp16: PPL {fp:.3f} ({rows['fp16']['eval_s']:.0f} s)", flush=True)
    for dt, cfg in configs.items():
        # SmoothQuant is never cached (its W8A8 Linears replace the model's): each row calibrates, smooths and
        # quantizes, so its quantize_s is end to end; a row whose W8-only diagnostic is asked for keeps its model
        computed = pipeline.compute(cfg) if dt in weights_only else None
        row = quality_row(cfg, computed)
        row["ppl_over_fp16"] = row["token_ppl"] / fp - 1
        row["weight_bytes_ratio"] = weight_bytes_ratio(cfg)
        if computed is not None:
            weights_only_(computed.model)
            windows = computed.prep.windows[args.eval_split]  # the row's own windows
            nll, secs = window_nll(computed.model, windows, cfg.eval.perplexity.batch_size, progress=False)
            row["token_ppl_weights_only"] = ppl_metrics(nll, secs, windows.shape[1])["token_ppl"]
            del computed
        rows[f"w8a8_{dt}"] = row
        print(f"w8a8 {dt}: {row['quantize_s']:.1f} s, PPL {row['token_ppl']:.3f} (+{100 * row['ppl_over_fp16']:.2f}%)"
              + (f", W8 only {row['token_ppl_weights_only']:.3f}" if "token_ppl_weights_only" in row else ""), flush=True)
    result = {
        "benchmark": "quality_smoothquant",
        "setting": {"model": "embedded SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), bf16",
                    "calibration": f"{args.n_samples}x{args.seqlen} shakespeare_calib, seed 0",
                    "eval": f"{args.eval_split}, {args.eval_windows}x512 tokens", "alpha": args.alpha,
                    "numerics": "LMDeploy smooth_quant: max|x| smoothing, per-channel weights, per-token activations"},
        "rows": rows,
        "anchors": {"fp16": 94.71, "llm_compressor_smoothquant_gptq_w8a8_int8": 97.03},
        "target_ppl_over_fp16": 0.02,
        "environment": environment(),
    }
    write_result(Path(args.out), result)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk in ("token_ppl", "quantize_s", "token_ppl_weights_only")}
                      for k, v in rows.items()}, indent=1))


def weight_bytes_ratio(cfg) -> float:
    """The W8A8 weights' bytes over FP16's in LMDeploy's layout, as the row's record states them (eval.memory)."""
    from harness.records import load_record, record_path

    return load_record(record_path(cfg))["metrics"]["memory"]["weights"]["w8a8"]["ratio_to_fp16"]


if __name__ == "__main__":
    main()
