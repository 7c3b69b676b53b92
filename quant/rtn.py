"""Round-to-nearest weight-only quantization: the baseline every method is compared against."""
from __future__ import annotations

import time

from tqdm.auto import tqdm

from harness.config import QuantConfig
from quant.registry import QuantContext, QuantOutcome, method
from harness.storage_bytes import packed_weight_bytes
from quant.surgery import plan_group_sizes, quantizable_linears, quantize_linear_


@method("rtn", needs_calibration=False)
def rtn(model, cfg: QuantConfig, ctx: QuantContext) -> QuantOutcome:
    t0 = time.perf_counter()
    sizes, fallbacks = plan_group_sizes(model, cfg)
    qtensors = {}
    for name, lin in tqdm(quantizable_linears(model).items(), desc="rtn", disable=not ctx.progress, leave=False):
        qtensors[name] = quantize_linear_(lin, cfg.w_bit, sizes[name], cfg.zero_point)
    summary = {"method": "rtn", "w_bit": cfg.w_bit, "group_size": cfg.group_size, "zero_point": cfg.zero_point,
               "layers_quantized": len(qtensors), "group_fallback_layers": fallbacks,
               **packed_weight_bytes(model, qtensors)}
    return QuantOutcome(summary=summary, timings_s={"rtn": time.perf_counter() - t0}, qtensors=qtensors)
