"""Round-to-nearest weight-only quantization: the baseline every method is compared against. Block by block through
the sequential runner (quant.calibration.runner) without calibration data, on the placement's compute device
(quant.onload), so a model larger than the GPU quantizes there too."""
from __future__ import annotations

import time
from dataclasses import dataclass

from harness.architectures import architecture_for
from harness.config import WeightQuantConfig, quant_config
from harness.storage_bytes import packed_weight_bytes
from quant.calibration.runner import BlockResult, run_sequential
from quant.registry import QuantContext, QuantOutcome, method
from quant.surgery import plan_layers, quantize_linear_


@quant_config("rtn")
@dataclass
class RTNConfig(WeightQuantConfig):
    """RTN has no knobs of its own: bits, grouping, zero point and per-layer overrides (WeightQuantConfig)."""

    method: str = "rtn"


class RTN:
    """The runner's per-block step: nothing observed, every Linear of the layer map rounded to nearest with its
    planned bits and group size (skipped layers left as they are)."""

    def __init__(self, plan, prefix: str, linears):
        self.plan, self.prefix, self.linears = plan, prefix, linears

    def observers(self, block, index: int) -> dict:
        return {}

    def quantize_block(self, block, index, stats, kwargs, reduce) -> BlockResult:
        out = {}
        for rel in self.linears:
            spec = self.plan.specs[f"{self.prefix}.{index}.{rel}"]
            if not spec.skip:
                out[rel] = quantize_linear_(block.get_submodule(rel), spec.w_bit, spec.group_size, spec.zero_point)
        return BlockResult(out)


@method("rtn", needs_calibration=False)
def rtn(model, cfg: RTNConfig, ctx: QuantContext) -> QuantOutcome:
    t0 = time.perf_counter()
    plan = plan_layers(model, cfg)  # bad group size or override: fails here, naming the layer
    arch, place = architecture_for(model), ctx.placement
    # seconds per model: not worth checkpoints
    run = run_sequential(model, arch, RTN(plan, arch.blocks, arch.linears), None, place, desc="rtn",
                         progress=ctx.progress)
    qtensors = run.qtensors
    summary = {"method": "rtn", "w_bit": cfg.w_bit, "group_size": cfg.group_size, "zero_point": cfg.zero_point,
               "layers_quantized": len(qtensors), "group_fallback_layers": plan.fallbacks, **plan.summary(),
               "placement": {"compute": str(place.compute), "offload": place.offload},
               **packed_weight_bytes(model, qtensors)}
    return QuantOutcome(summary=summary, timings_s={"rtn": time.perf_counter() - t0}, qtensors=qtensors)
