"""SmoothQuant W8A8 (Xiao et al. 2023) as LMDeploy's `lmdeploy lite smooth_quant` computes it, block by block on the
sequential calibration runner (quant.calibration.runner: onloading, data-parallel reductions):

  1. calibrate: max|x| per input channel of every scaling group's input over every calibration token, the block fed
     the unquantized model's hidden states (fp16 propagation: the statistics of one FP pass, as LMDeploy's
     `calibrate` collects them);
  2. smooth: s = max|x|^alpha / w_stat^(1 - alpha) folded into the previous norm / Linear (FP output unchanged);
  3. quantize: every decoder Linear to per-output-channel symmetric codes (int8 or fp8) with dynamic per-token
     activations (quant.smoothquant.linear.W8A8Linear). lm_head and the embeddings stay in the model dtype.
With model.device=cuda one block at a time is on the GPU, so a model larger than the GPU quantizes.
"""
from __future__ import annotations

import time

import torch

from harness.architectures import architecture_for
from harness.storage_bytes import FP16_BYTES, fp16_param_bytes, quantized_weight_bytes
from quant.awq.observe import AbsMax
from quant.calibration.reduce import Reducer
from quant.calibration.runner import BlockResult, run_sequential
from quant.onload import Placement
from quant.registry import Method, QuantOutcome, method
from quant.setup import Setup
from quant.smoothquant.config import SmoothQuantConfig, as_smoothquant_config
from quant.smoothquant.linear import swap_w8a8_
from quant.smoothquant.numerics import quant_dtype
from quant.smoothquant.smooth import smooth_block_


class SmoothQuantBlocks:
    """SmoothQuant's per-block step for the runner. `stats` (qualified name -> max|x|, from `calibration_stats`): use
    them instead of observing (no data pass); `apply=False`: only collect the statistics (into self.stats)."""

    def __init__(self, arch, alpha: float, dtype: torch.dtype, stats: dict | None = None, apply: bool = True):
        self.arch, self.alpha, self.dtype, self.apply = arch, alpha, dtype, apply
        if arch.moe is not None:  # its groups read per-Linear inputs; an MoE's norm group spans routed experts
            raise NotImplementedError(f"SmoothQuant on a mixture of experts ({arch.family}) is not supported yet")
        self.heads = sorted({g.linears[0] for g in arch.groups})
        self.given = stats is not None
        self.stats = dict(stats or {})
        self.scales: dict[str, torch.Tensor] = {}

    def observers(self, block, index: int) -> dict:
        return {} if self.given else {h: AbsMax() for h in self.heads}

    @torch.no_grad()
    def quantize_block(self, block, index: int, stats: dict, kwargs, reduce: Reducer) -> BlockResult:
        p = f"{self.arch.blocks}.{index}."
        if not self.given:
            for h in self.heads:
                if not bool(torch.isfinite(stats[h]).all()):
                    raise FloatingPointError(f"calibration activations at the input of {p + h} contain NaN/Inf "
                                             f"(check model.dtype and the calibration data)")
                self.stats[p + h] = stats[h].detach().cpu()
        if not self.apply:
            return BlockResult({})
        dev = next(block.parameters()).device
        got = smooth_block_(block, self.arch, {h: self.stats[p + h].to(dev) for h in self.heads}, self.alpha)
        self.scales.update({p + k: v for k, v in got.items()})
        return BlockResult({rel: swap_w8a8_(block, rel, self.dtype).qtensor() for rel in self.arch.linears})


def weight_bytes(model, qtensors: dict) -> dict:
    """Bytes as LMDeploy stores the W8A8 checkpoint (harness.storage_bytes layout "w8a8"): 1-byte codes and an fp32
    scale per row for the quantized Linears, 2 bytes for every parameter (the codes are buffers, not parameters)."""
    rest = fp16_param_bytes(model)
    n_codes = sum(q.q.numel() for q in qtensors.values())
    q_bytes = sum(quantized_weight_bytes(q.q.numel(), q.scales.numel(), 8, False, layout="w8a8") for q in qtensors.values())
    total_fp16 = rest + n_codes * FP16_BYTES
    return {"weight_bytes": q_bytes + rest, "weight_bytes_fp16": total_fp16, "quantized_linear_bytes": q_bytes,
            "unquantized_bytes": rest, "weight_bytes_ratio": (q_bytes + rest) / total_fp16}


def calibration_stats(model, samples, placement: Placement = Placement(), progress: bool = False) -> dict:
    """max|x| of every scaling group's input (qualified name of its first Linear) over the calibration samples, the
    blocks fed the FP model's hidden states; they depend neither on alpha nor on the quantized dtype."""
    arch = architecture_for(model)
    m = SmoothQuantBlocks(arch, 0.0, torch.int8, apply=False)
    run_sequential(model, arch, m, samples, placement, propagate="fp16", reduce=Reducer.current(),
                   desc="smoothquant statistics", progress=progress)
    return m.stats


def smoothquant_(model, cfg, samples, stats: dict | None = None, placement: Placement = Placement(),
                 progress: bool = False) -> tuple[dict, dict, dict]:
    """Calibrate (unless `stats` from calibration_stats of this FP model are given), smooth and quantize `model` in
    place, block by block. Returns (qtensors, scales by Linear, timings)."""
    sq = as_smoothquant_config(cfg)
    arch = architecture_for(model)  # unsupported architecture: fails here, naming the registry
    m = SmoothQuantBlocks(arch, sq.alpha, quant_dtype(sq.dtype), stats)
    t = time.perf_counter()
    run = run_sequential(model, arch, m, None if stats is not None else samples, placement, propagate="fp16",
                         reduce=Reducer.current(), desc=f"smoothquant {sq.dtype} alpha {sq.alpha}", progress=progress)
    total = time.perf_counter() - t
    # calibration = the capture and the block forwards; the rest is smoothing and quantizing
    calib = run.timings_s["calibration_capture"] + run.timings_s["block_forward"]
    return run.qtensors, m.scales, {"calibration": calib, "smooth_quantize": total - calib}


@method
class SmoothQuant(Method):
    name, config = "smoothquant", SmoothQuantConfig
    needs_calibration = True
    cacheable = False  # its W8A8 Linears replace the model's: recomputed every run (quant.quantized_cache)
    formats = ("smooth_quant",)
    label = "SmoothQuant"

    def quantize(self, model, cfg: SmoothQuantConfig, ctx, setup: Setup) -> QuantOutcome:
        qtensors, scales, timings = smoothquant_(model, cfg, setup.samples, placement=setup.placement,
                                                 progress=ctx.progress)
        timings["calibration"] += setup.samples_s
        summary = self.summary(cfg, setup, model, qtensors, alpha=cfg.alpha, dtype=cfg.dtype, w_bit=8, a_bit=8,
                               weights="per-output-channel symmetric", activations="dynamic per-token symmetric",
                               groups_smoothed=len(scales))
        return QuantOutcome(summary=summary, timings_s=timings, qtensors=qtensors)

    def weight_bytes(self, model, qtensors: dict) -> dict:
        return weight_bytes(model, qtensors)
