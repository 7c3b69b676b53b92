"""Round-to-nearest weight-only quantization: the baseline every method is compared against. Block by block through
the sequential runner (quant.calibration.runner) without calibration data, on the placement's compute device
(quant.onload), so a model larger than the GPU quantizes there too."""
from __future__ import annotations

import time

from harness.architectures import architecture_for
from harness.config import QuantConfig
from harness.storage_bytes import packed_weight_bytes
from quant.calibration.runner import BlockResult, run_sequential
from quant.registry import QuantContext, QuantOutcome, method
from quant.surgery import plan_group_sizes, quantize_linear_


class RTN:
    """The runner's per-block step: nothing observed, every Linear of the layer map rounded to nearest."""

    def __init__(self, cfg: QuantConfig, prefix: str, sizes: dict[str, int], linears):
        self.cfg, self.prefix, self.sizes, self.linears = cfg, prefix, sizes, linears

    def observers(self, block, index: int) -> dict:
        return {}

    def quantize_block(self, block, index, stats, kwargs, reduce) -> BlockResult:
        cfg = self.cfg
        return BlockResult({rel: quantize_linear_(block.get_submodule(rel), cfg.w_bit,
                                                  self.sizes[f"{self.prefix}.{index}.{rel}"], cfg.zero_point)
                            for rel in self.linears})


@method("rtn", needs_calibration=False)
def rtn(model, cfg: QuantConfig, ctx: QuantContext) -> QuantOutcome:
    t0 = time.perf_counter()
    sizes, fallbacks = plan_group_sizes(model, cfg)
    arch, place = architecture_for(model), ctx.placement
    # seconds per model: not worth checkpoints
    run = run_sequential(model, arch, RTN(cfg, arch.blocks, sizes, arch.linears), None, place, desc="rtn",
                         progress=ctx.progress)
    qtensors = run.qtensors
    summary = {"method": "rtn", "w_bit": cfg.w_bit, "group_size": cfg.group_size, "zero_point": cfg.zero_point,
               "layers_quantized": len(qtensors), "group_fallback_layers": fallbacks,
               "placement": {"compute": str(place.compute), "offload": place.offload},
               **packed_weight_bytes(model, qtensors)}
    return QuantOutcome(summary=summary, timings_s={"rtn": time.perf_counter() - t0}, qtensors=qtensors)
