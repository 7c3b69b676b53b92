"""GPTQ W4 g64 on the embedded model: quantization time and held-out token PPL beside FP16 and RTN, same run, same
machine (the setting of shared/TARGETS.md's first row: 128x512 calibration tokens of shakespeare_calib, seed 0;
Milton 40x512; bf16).

    python -m benchmarks.quality_gptq [--variants rtn,gptq] [--n-samples 128] [--seqlen 512] [--eval-windows 40]

Each row (FP16 and every variant) is a pipeline run (experiments.pipeline, the stages every front door calls): its
record goes to results/runs/<run_id>.json, where the report and the paper table read it; --reuse takes a record the
same code made instead of recomputing it. Writes results/benchmarks/quality_gptq.json (each row names its run_id).
Anchors (TARGETS.md): FP16 94.71, RTN 119.94, llm-compressor GPTQ with static activation ordering 106.75 (228 s),
without activation ordering 118.66; AWQ->GPTQ 100.78.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import (add_quality_args, add_record_args, add_threads_arg, apply_threads, preset_fields,
                               quality_config, quality_row, write_result)
from harness.config import CalibConfig
from harness.records import provenance
from quant.gptq.awq_gptq import AWQGPTQConfig
from quant.gptq.config import GPTQConfig
from quant.rtn import RTNConfig

# the harness's AWQ search settings (conf/quant/awq_w4.yaml), for the AWQ->GPTQ recipe
AWQ_SEARCH = preset_fields("awq_w4", drop=("method", "calib", "w_bit", "group_size"))

# the quantizations compared (w4 g64 asymmetric and the calibration set are common to all)
VARIANTS = {
    "rtn": lambda calib: RTNConfig(w_bit=4, group_size=64),
    # llm-compressor's default: static activation ordering
    "gptq": lambda calib: GPTQConfig(w_bit=4, group_size=64, calib=calib),
    # the paper's order, dynamic groups
    "gptq_no_act_order": lambda calib: GPTQConfig(w_bit=4, group_size=64, act_order=False, static_groups=False,
                                                  calib=calib),
    # the GPTQ reference's MSE grid per group (Quantizer(mse=True)) instead of each group's min/max
    "gptq_mse": lambda calib: GPTQConfig(w_bit=4, group_size=64, grid="mse", calib=calib),
    # llm-compressor's AWQ->GPTQ recipe: AWQ's scales (and clipping) folded, GPTQ's rounding (anchor 100.78)
    "awq_gptq": lambda calib: AWQGPTQConfig(w_bit=4, group_size=64, calib=calib, **AWQ_SEARCH),
    # the recipe with GPTQ's MSE grid
    "awq_gptq_mse": lambda calib: AWQGPTQConfig(w_bit=4, group_size=64, grid="mse", calib=calib, **AWQ_SEARCH),
    # the recipe as llm-compressor's AWQModifier runs its AWQ stage (scales from activations and weights: duo
    # scaling; no clip search, the GPTQ grid does the range), with the MSE grid
    "awq_gptq_mse_duo": lambda calib: AWQGPTQConfig(w_bit=4, group_size=64, grid="mse", calib=calib,
                                                    **{**AWQ_SEARCH, "duo_scaling": True, "clip": False}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(ap)
    ap.add_argument("--variants", default="rtn,gptq", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--out", default="results/benchmarks/quality_gptq.json")
    add_record_args(ap)
    add_threads_arg(ap)
    args = ap.parse_args()
    apply_threads(args)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")
    configs = variant_configs(names, args)  # every row's config validated before the first runs

    rows = {}
    for name, cfg in configs.items():
        rows[name] = quality_row(cfg)  # a pipeline record under <results-dir>/runs/, and this file's row
        r = rows[name]
        print(f"{name}: " + (f"{r['quantize_s']:.1f} s {r['stages_s']}, " if "quantize_s" in r else "")
              + f"PPL {r['token_ppl']:.2f} (run_id {r['run_id']})", flush=True)
        write(rows, names, args)  # after every row: a run that dies keeps the rows it finished
    result = write(rows, names, args)
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "provenance")}, indent=1))


def variant_configs(names: list[str], args) -> dict:
    """fp16 and each variant as a pipeline config (benchmarks.common.quality_config): the setting plus its quant."""
    calib = CalibConfig(n_samples=args.n_samples, seqlen=args.seqlen)
    setting = dict(eval_split=args.eval_split, n_windows=args.eval_windows, results_dir=args.results_dir,
                   reuse=args.reuse)
    return {"fp16": quality_config(**setting),
            **{name: quality_config(quant=VARIANTS[name](calib), **setting) for name in names}}


def write(rows: dict, names: list[str], args, ppl_s=None) -> dict:
    """The benchmark's JSON from the rows so far (`ppl_s`: unused, kept for callers of the earlier signature)."""
    fp = rows["fp16"]["token_ppl"]
    done = [k for k in names if k in rows]
    result = {
        "benchmark": "quality_gptq",
        "setting": {"model": "embedded SmolLM2-135M-Instruct (Q4_1 GGUF dequantized)", "w_bit": 4, "group_size": 64,
                    "calibration": f"{args.n_samples}x{args.seqlen} shakespeare_calib seed 0",
                    "eval": f"{args.eval_split}, {args.eval_windows}x512 tokens, bf16",
                    "threads": torch.get_num_threads()},
        "rows": rows,
        "gap_over_rtn_gap": ({k: (rows[k]["token_ppl"] - fp) / (rows["rtn"]["token_ppl"] - fp)
                              for k in done if k != "rtn"} if "rtn" in rows else None),
        "complete": len(done) == len(names),
        "anchors": {"fp16": 94.71, "rtn": 119.94, "llm_compressor_gptq_static_act_order": 106.75,
                    "llm_compressor_gptq_no_act_order": 118.66, "llm_compressor_awq_gptq": 100.78},
        "provenance": provenance(),
    }
    write_result(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
