"""AWQ end to end on the embedded model: calibration capture + scale search + clipping search + quantization, timed,
with the quality it buys (held-out token PPL against FP16 and RTN, same run, same machine).

    python -m benchmarks.awq_time [--n-samples 128] [--seqlen 512] [--eval-windows 40] [--variants rtn,awq_full,...]

Writes results/benchmarks/awq_time.json. Target (shared/TARGETS.md): full method <= 140 s on this 2-core CPU, and a
PPL gap to FP16 <= 40% of RTN's.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from benchmarks.common import add_quality_args, preset_fields, quality_setting
from harness.config import QUANT_CONFIGS, CalibConfig
from harness.data import calibration_samples
from harness.records import provenance, write_json_atomic
from quant import METHODS, QuantContext



# the quantizations compared, as fields of each method's config (w4 g64 and the calibration set are common to all)
VARIANTS = {
    "rtn": {"method": "rtn"},
    # LMDeploy `lite auto_awq` default: fixed smoothing ratio, no search, no clip
    "awq_lmdeploy_smoothing": {"method": "awq", "search_scale": False, "clip": False},
    # llm-awq's search exactly: every grid point scored on the first 16 sequences, clipping scored on 512 tokens
    "awq_llm_awq": {"method": "awq", "scale_grid": "full", "search_samples": 16, "search_tokens": 0, "clip_tokens": 512},
    # the same scale search, clipping scored on every calibration token
    "awq_full_grid": {"method": "awq", "scale_grid": "full", "search_samples": 16, "search_tokens": 0, "clip_tokens": 0},
    # the harness default: conf/quant/awq_w4.yaml as it is
    "awq_default": preset_fields("awq_w4", drop=("calib", "w_bit", "group_size")),
}


def _config(fields: dict, calib: CalibConfig):
    """The method's config with these fields at w4 g64 (and `calib` where the method calibrates)."""
    cls = QUANT_CONFIGS.get(fields["method"])
    extra = {"calib": calib} if "calib" in {f.name for f in dataclasses.fields(cls)} else {}
    return cls(**{"w_bit": 4, "group_size": 64, **fields, **extra})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(ap)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--out", default="results/benchmarks/awq_time.json")
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "rtn" not in names:
        ap.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)}); rtn is needed for the gap ratio")

    base, calib_ids, ppl_s = quality_setting(args.eval_split, args.eval_windows)

    def ppl(model) -> float:
        return ppl_s(model)[0]

    calib = CalibConfig(n_samples=args.n_samples, seqlen=args.seqlen)
    configs = {n: _config(VARIANTS[n], calib) for n in names}
    rows = {"fp16": {"token_ppl": ppl(base)}}
    for name, q in configs.items():
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        # end to end: sampling the calibration tokens is inside the timed region
        out = METHODS.get(q.method)(model, q, QuantContext(
            calibration=lambda: calibration_samples(calib_ids, calib.n_samples, calib.seqlen, calib.seed), progress=True))
        secs = time.perf_counter() - t0
        rows[name] = {"quantize_s": secs, "stages_s": out.timings_s, "token_ppl": ppl(model), "config": dataclasses.asdict(q)}
        print(f"{name}: {secs:.1f} s, PPL {rows[name]['token_ppl']:.2f}", flush=True)
        del model
    fp = rows["fp16"]["token_ppl"]
    gap = {k: rows[k]["token_ppl"] - fp for k in configs}
    headline = "awq_default" if "awq_default" in configs else next((k for k in configs if k.startswith("awq")), None)
    result = {
        "benchmark": "awq_time",
        "setting": {"model": "embedded SmolLM2-135M-Instruct (Q4_1 GGUF dequantized)", "w_bit": 4, "group_size": 64,
                    "calibration": f"{args.n_samples}x{args.seqlen} shakespeare_calib",
                    "eval": f"{args.eval_split}, {ppl_s.windows}x512 tokens, bf16", "threads": torch.get_num_threads()},
        "rows": rows,
        "headline": headline,
        "awq_seconds": rows[headline]["quantize_s"] if headline else None,
        "target_seconds": 140.0,
        "awq_gap_over_rtn_gap": {k: gap[k] / gap["rtn"] for k in configs if k != "rtn"},
        "target_gap_ratio": 0.40,
        "provenance": provenance(),
    }
    write_json_atomic(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "provenance")}, indent=1))


if __name__ == "__main__":
    main()
