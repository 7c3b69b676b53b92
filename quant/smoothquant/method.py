"""SmoothQuant W8A8 (Xiao et al. 2023) as LMDeploy's `lmdeploy lite smooth_quant` computes it:

  1. calibrate: max|x| per input channel of every scaling group's input, one FP pass over the calibration tokens;
  2. smooth: s = max|x|^alpha / w_stat^(1 - alpha) folded into the previous norm / Linear (FP output unchanged);
  3. quantize: every decoder Linear to per-output-channel symmetric codes (int8 or fp8) with dynamic per-token
     activations (quant.smoothquant.linear.W8A8Linear). lm_head and the embeddings stay in the model dtype.
"""
from __future__ import annotations

import time

from harness.architectures import architecture_for, get_blocks
from harness.storage_bytes import FP16_BYTES, fp16_param_bytes, quantized_weight_bytes
from quant.registry import QuantContext, QuantOutcome, method
from quant.smoothquant.calibrate import input_absmax
from quant.smoothquant.config import as_smoothquant_config
from quant.smoothquant.linear import swap_w8a8_
from quant.smoothquant.numerics import quant_dtype
from quant.smoothquant.smooth import smooth_block_


def weight_bytes(model, qtensors: dict) -> dict:
    """Bytes as LMDeploy stores the W8A8 checkpoint (harness.storage_bytes layout "w8a8"): 1-byte codes and an fp32
    scale per row for the quantized Linears, 2 bytes for every parameter (the codes are buffers, not parameters)."""
    rest = fp16_param_bytes(model)
    n_codes = sum(q.q.numel() for q in qtensors.values())
    q_bytes = sum(quantized_weight_bytes(q.q.numel(), q.scales.numel(), 8, False, layout="w8a8") for q in qtensors.values())
    total_fp16 = rest + n_codes * FP16_BYTES
    return {"weight_bytes": q_bytes + rest, "weight_bytes_fp16": total_fp16, "quantized_linear_bytes": q_bytes,
            "unquantized_bytes": rest, "weight_bytes_ratio": (q_bytes + rest) / total_fp16}


def calibration_stats(model, samples) -> dict:
    """max|x| of every scaling group's input (qualified name of its first Linear), from one FP pass over samples."""
    arch = architecture_for(model)
    heads = sorted({g.linears[0] for g in arch.groups})
    base = model.get_submodule(arch.blocks.rpartition(".")[0])
    n = len(get_blocks(model, arch))
    return input_absmax(model, base, [f"{arch.blocks}.{i}.{h}" for i in range(n) for h in heads], samples)


def smoothquant_(model, cfg, samples, stats: dict | None = None) -> tuple[dict, dict, dict]:
    """Calibrate (unless `stats` from calibration_stats of this FP model are given: they do not depend on alpha or
    the dtype), smooth and quantize `model` in place. Returns (qtensors, scales by Linear, timings)."""
    sq = as_smoothquant_config(cfg)
    arch = architecture_for(model)  # unsupported architecture: fails here, naming the registry
    dtype = quant_dtype(sq.dtype)
    blocks = get_blocks(model, arch)
    heads = sorted({g.linears[0] for g in arch.groups})
    t = time.perf_counter()
    stats = calibration_stats(model, samples) if stats is None else stats
    timings = {"calibration": time.perf_counter() - t}
    t = time.perf_counter()
    scales = {}
    for i, block in enumerate(blocks):
        p = f"{arch.blocks}.{i}."
        got = smooth_block_(block, arch, {h: stats[p + h] for h in heads}, sq.alpha)
        scales.update({p + k: v for k, v in got.items()})
    timings["smooth"] = time.perf_counter() - t
    t = time.perf_counter()
    qtensors = {}
    for i, block in enumerate(blocks):
        for rel in arch.linears:
            qtensors[f"{arch.blocks}.{i}.{rel}"] = swap_w8a8_(block, rel, dtype).qtensor()
    timings["quantize"] = time.perf_counter() - t
    return qtensors, scales, timings


@method("smoothquant", needs_calibration=True, cacheable=False)
def smoothquant(model, cfg, ctx: QuantContext) -> QuantOutcome:
    sq = as_smoothquant_config(cfg)
    t = time.perf_counter()
    samples = ctx.calibration()
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(samples.max()) >= vocab:
        raise ValueError(f"calibration token id {int(samples.max())} is outside the model's vocabulary ({vocab})")
    sample_s = time.perf_counter() - t
    qtensors, scales, timings = smoothquant_(model, sq, samples)
    timings["calibration"] += sample_s
    summary = {
        "method": "smoothquant", "alpha": sq.alpha, "dtype": sq.dtype, "w_bit": 8, "a_bit": 8,
        "weights": "per-output-channel symmetric", "activations": "dynamic per-token symmetric",
        "calibration": {"dataset": sq.calib.dataset, "n_samples": sq.calib.n_samples, "seqlen": sq.calib.seqlen,
                        "seed": sq.calib.seed},
        "layers_quantized": len(qtensors), "groups_smoothed": len(scales),
        **weight_bytes(model, qtensors),
    }
    return QuantOutcome(summary=summary, timings_s=timings, qtensors=qtensors)
