"""AWQ then GPTQ, llm-compressor's AWQ->GPTQ recipe: AWQ's activation-aware scales (and, with quant.clip, its
clipping) are searched and folded into the weights without AWQ's final rounding; GPTQ then collects its Hessians on
the smoothed model and rounds the smoothed weights. The output of the FP model is unchanged by the fold, so GPTQ
starts from an equivalent model whose weights are easier to round."""
from __future__ import annotations

import copy

from quant.awq.method import awq
from quant.gptq.method import gptq
from quant.registry import QuantContext, QuantOutcome, method


@method("awq_gptq", needs_calibration=True)
def awq_gptq(model, cfg, ctx: QuantContext) -> QuantOutcome:
    smooth_cfg = copy.copy(cfg)
    smooth_cfg.round_weights = False  # read by quant/awq/method.py step 5
    samples, draw = None, ctx.calibration

    def calibration():  # one draw of the calibration tokens for both stages
        nonlocal samples
        if samples is None:
            samples = draw()
        return samples

    ctx = QuantContext(calibration=calibration, progress=ctx.progress, placement=ctx.placement)
    smooth = awq(model, smooth_cfg, ctx)
    out = gptq(model, cfg, ctx)
    out.summary = {**out.summary, "method": "awq_gptq",
                   "awq": {k: v for k, v in smooth.summary.items() if k not in ("layers_quantized", "block_seconds")}}
    out.timings_s = {**{f"awq_{k}": v for k, v in smooth.timings_s.items()},
                     **{f"gptq_{k}": v for k, v in out.timings_s.items()}}
    return out
