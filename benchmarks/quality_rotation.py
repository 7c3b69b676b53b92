"""Hadamard rotation (quant/rotation/) before RTN and GPTQ on the embedded SmolLM2, beside plain RTN and GPTQ: held-out
token PPL at w4 g64 and w3 g64, same run, same machine, same calibration draw (quality_gptq's setting: shakespeare_calib
seed 0, Milton 40x512, bf16; the calibration size is a flag, 32x512 by default here: see the README of the result).

    python -m benchmarks.quality_rotation [--variants fp16_rotated,rtn_w4,rotation_rtn_w4,...] [--n-samples 32]
    python -m benchmarks.quality_rotation --pack DIR        # the same setting as files (model, windows, calibration)
    python -m benchmarks.quality_rotation --payload DIR --device cuda --n-samples 128   # there, e.g. on a GPU machine

Writes results/benchmarks/rotation/quality_rotation.json (a row after every variant). Rotation rows are the presets
rotation_{rtn,gptq}_w{4,3} (conf/quant/): R1 residual + R2 heads + R4 online Hadamard before down_proj, seed 0.
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
from harness.records import provenance
from quant import METHODS, QuantContext
from quant.gptq.config import GPTQConfig
from quant.onload import Placement
from quant.recipe import RecipeConfig
from quant.rotation.method import RotationConfig
from quant.rtn import RTNConfig


def _rotated(last: str, w_bit: int, calib: CalibConfig, **rot) -> RecipeConfig:
    return RecipeConfig(w_bit=w_bit, group_size=64, calib=calib, steps=[{"method": "rotation", **rot}, {"method": last}])


# the quantizations compared (g64 asymmetric; one calibration set for all)
VARIANTS = {
    # the rotation alone, no rounding: the FP model in bf16 after rotating (its weights rounded to bf16 again)
    "fp16_rotated": lambda c: RotationConfig(),
    "rtn_w4": lambda c: RTNConfig(w_bit=4, group_size=64),
    "rotation_rtn_w4": lambda c: _rotated("rtn", 4, c),
    "gptq_w4": lambda c: GPTQConfig(w_bit=4, group_size=64, calib=c),
    "rotation_gptq_w4": lambda c: _rotated("gptq", 4, c),
    "rtn_w3": lambda c: RTNConfig(w_bit=3, group_size=64),
    "rotation_rtn_w3": lambda c: _rotated("rtn", 3, c),
    "gptq_w3": lambda c: GPTQConfig(w_bit=3, group_size=64, calib=c),
    "rotation_gptq_w3": lambda c: _rotated("gptq", 3, c),
    # which rotation does what (an ablation at w4): the residual stream alone, the per-head and online ones alone
    "rotation_r1_rtn_w4": lambda c: _rotated("rtn", 4, c, heads=False, online=False),
    "rotation_r2r4_rtn_w4": lambda c: _rotated("rtn", 4, c, residual="off"),
    "rotation_r1_gptq_w4": lambda c: _rotated("gptq", 4, c, heads=False, online=False),
}


def quantize(name: str, model, calib: CalibConfig, samples: torch.Tensor, device: str) -> tuple[dict, dict]:
    """Quantize `model` in place as the variant says; (its config as a dict, the method's timings)."""
    ctx = QuantContext(calibration=lambda: samples, progress=False, placement=Placement.of(device, False))
    q = VARIANTS[name](calib)
    out = METHODS.get(q.method)(model, q, ctx)
    return {"method": q.method, **dataclasses.asdict(q)}, out.timings_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(ap)
    ap.set_defaults(n_samples=32)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--out", default="results/benchmarks/rotation/quality_rotation.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pack", default=None, help="write the model, windows and calibration text's token ids to DIR, "
                    "for --payload on a machine without the embedded assets")
    ap.add_argument("--payload", default=None, help="read them from DIR (written by --pack)")
    ap.add_argument("--layer-errors", type=int, default=None, metavar="W_BIT",
                    help="print each layer's hidden-state error of RTN at W_BIT against the same FP model, with and "
                         "without each rotation (fp32, 2 windows of 128 tokens)")
    ap.add_argument("--table", nargs="+", default=None, help="print the markdown table of these result JSONs (rows of "
                    "runs of one setting: each run's own FP16 row is its reference)")
    add_threads_arg(ap)
    args = ap.parse_args()
    apply_threads(args)
    if args.table:
        return print(table([json.loads(Path(f).read_text()) for f in args.table]))
    if args.layer_errors:
        return layer_errors(args.layer_errors, args.eval_split)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")

    calib = CalibConfig(n_samples=args.n_samples, seqlen=args.seqlen)
    if args.pack:
        return pack(Path(args.pack), args.eval_split, args.eval_windows, calib)
    if args.payload:
        base, samples, ppl_s = from_payload(Path(args.payload), calib, args.device)
    else:
        base, calib_ids, ppl_s = quality_setting(args.eval_split, args.eval_windows)
        samples = calibration_samples(calib_ids, calib.n_samples, calib.seqlen, calib.seed)
    t = time.perf_counter()
    rows = {"fp16": {"token_ppl": ppl_s(base)[0], "eval_s": time.perf_counter() - t}}
    print(f"fp16: PPL {rows['fp16']['token_ppl']:.2f}", flush=True)
    for name in names:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        config, stages = quantize(name, model, calib, samples, args.device)
        secs = time.perf_counter() - t0
        t = time.perf_counter()
        rows[name] = {"quantize_s": secs, "stages_s": stages, "token_ppl": ppl_s(model)[0],
                      "eval_s": time.perf_counter() - t, "config": config}
        print(f"{name}: {secs:.1f} s, PPL {rows[name]['token_ppl']:.2f}", flush=True)
        del model
        write(rows, names, args, ppl_s)
    write(rows, names, args, ppl_s)


def pack(d: Path, eval_split: str, n_windows: int, calib: CalibConfig) -> None:
    """The setting as plain files: the bf16 model (save_pretrained), the evaluation windows and the calibration
    samples, each as quality_setting and the CPU run make them."""
    from benchmarks.common import load_embedded
    from harness.data import eval_windows, load_text, tokenize_cached

    model, tok = load_embedded("bfloat16")
    windows = eval_windows(tokenize_cached(tok, load_text(eval_split)), 512, n_windows)
    calib_ids = tokenize_cached(tok, load_text("shakespeare_calib"))
    d.mkdir(parents=True, exist_ok=True)
    model.config.quantization_config = None
    model.hf_quantizer = None  # a GGUF-loaded model refuses to save otherwise (shared CPU.md)
    model.save_pretrained(d / "model")
    samples = calibration_samples(calib_ids, calib.n_samples, calib.seqlen, calib.seed)
    torch.save({"windows": windows.int(), "samples": samples.int(), "calib": dataclasses.asdict(calib)}, d / "tokens.pt")


def from_payload(d: Path, calib: CalibConfig, device: str):
    """(model on `device`, calibration samples, ppl) from a --pack directory."""
    from transformers import AutoModelForCausalLM

    from eval.perplexity import ppl_metrics, window_nll

    model = AutoModelForCausalLM.from_pretrained(d / "model", dtype=torch.bfloat16).to(device).eval()
    tokens = torch.load(d / "tokens.pt", weights_only=True)
    windows = tokens["windows"].long()
    if tokens["calib"] != dataclasses.asdict(calib):
        raise SystemExit(f"the payload's calibration is {tokens['calib']}, not {dataclasses.asdict(calib)}")

    def ppl(m) -> tuple[float, float]:
        nll, secs = window_nll(m, windows, 8, progress=False)
        return ppl_metrics(nll, secs, windows.shape[1])["token_ppl"], secs

    ppl.windows = int(windows.shape[0])
    return model, tokens["samples"].long(), ppl


@torch.no_grad()
def layer_errors(w_bit: int, eval_split: str) -> None:
    """Relative error of every layer's hidden states after RTN (g64) against the same model unrounded (rotated or
    not), on 2 windows of 128 tokens: where the rounding error grows."""
    from benchmarks.common import load_embedded
    from harness.data import eval_windows, load_text, tokenize_cached

    base, tok = load_embedded("float32")
    ids = eval_windows(tokenize_cached(tok, load_text(eval_split)), 128, 2)
    ctx = QuantContext(calibration=None, progress=False)
    for name, rot in [("rtn", None), ("R1+R2+R4", {}), ("R1", {"heads": False, "online": False}),
                      ("R2+R4", {"residual": "off"})]:
        model = copy.deepcopy(base)
        if rot is not None:
            METHODS.get("rotation")(model, RotationConfig(**rot), ctx)
        fp = model(ids, output_hidden_states=True).hidden_states
        METHODS.get("rtn")(model, RTNConfig(w_bit=w_bit, group_size=64), ctx)
        err = [float((a - b).norm() / b.norm()) for a, b in zip(model(ids, output_hidden_states=True).hidden_states, fp)]
        print(f"{name}: " + " ".join(f"{e:.3f}" for e in err), flush=True)


def table(results: list[dict]) -> str:
    """Token PPL, its gap to FP16 as a share of RTN's gap at the same bits, and quantize seconds, one line per row.
    Runs of one setting are merged when their FP16 rows agree (the same model and windows); else refused."""
    fp16 = {round(r["rows"]["fp16"]["token_ppl"], 6) for r in results}
    keys = set.intersection(*(set(r["setting"]) for r in results)) - {"threads", "device", "gpu"}
    settings = {json.dumps({k: r["setting"][k] for k in keys}, sort_keys=True) for r in results}
    if len(fp16) != 1 or len(settings) != 1:
        raise SystemExit(f"these runs differ in their setting or FP16 PPL ({sorted(fp16)}): not one table")
    rows = {k: v for r in results for k, v in r["rows"].items()}
    fp = rows["fp16"]["token_ppl"]
    out = ["| variant | token PPL | gap / RTN gap | quantize s |", "|---|---:|---:|---:|"]
    for name, row in rows.items():
        rtn = rows.get(f"rtn_{name[-2:]}")
        gap = (row["token_ppl"] - fp) / (rtn["token_ppl"] - fp) if rtn and name[-2:] in ("w4", "w3") else None
        out.append(f"| {name} | {row['token_ppl']:.2f} | {'' if gap is None else f'{gap:.2f}'} | "
                   f"{row.get('quantize_s', 0):.0f} |")
    return "\n".join(out)


def write(rows: dict, names: list[str], args, ppl_s) -> dict:
    fp = rows["fp16"]["token_ppl"]
    gaps = {}
    for w in ("w4", "w3"):
        if f"rtn_{w}" in rows:
            rtn_gap = rows[f"rtn_{w}"]["token_ppl"] - fp
            gaps.update({k: (rows[k]["token_ppl"] - fp) / rtn_gap for k in rows if k.endswith(w) and k != f"rtn_{w}"})
    result = {
        "benchmark": "quality_rotation",
        "setting": {"model": "embedded SmolLM2-135M-Instruct (Q4_1 GGUF dequantized)", "group_size": 64,
                    "zero_point": True, "calibration": f"{args.n_samples}x{args.seqlen} shakespeare_calib seed 0",
                    "eval": f"{args.eval_split}, {ppl_s.windows}x512 tokens, bf16", "rotation_seed": 0,
                    "threads": torch.get_num_threads(), "device": args.device,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "rows": rows,
        "gap_over_rtn_gap": gaps,
        "complete": all(k in rows for k in names),
        "provenance": provenance(),
    }
    write_result(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
