"""Round-to-nearest weight-only quantization: the baseline every method is compared against. Block by block through
the sequential runner (quant.calibration.runner) without calibration data, on the placement's compute device
(quant.onload), so a model larger than the GPU quantizes there too."""
from __future__ import annotations

import time
from dataclasses import dataclass

from harness.config import WeightQuantConfig
from quant.calibration.runner import BlockResult, run_sequential
from quant.registry import Method, QuantOutcome, method
from quant.setup import Setup
from quant.surgery import format_summary, quantize_linear_


@dataclass
class RTNConfig(WeightQuantConfig):
    """RTN has no knobs of its own: bits, grouping, zero point, weight format and per-layer overrides
    (WeightQuantConfig)."""

    method: str = "rtn"
    weight_formats = ("int", "nvfp4", "mxfp4")


class RTNBlocks:
    """The runner's per-block step: nothing observed, every Linear of the layer map rounded to nearest with its
    planned bits and group size, or in its planned FP4 format (skipped layers left as they are)."""

    def __init__(self, plan, prefix: str, linears):
        self.plan, self.prefix, self.linears = plan, prefix, linears

    def observers(self, block, index: int) -> dict:
        return {}

    def quantize_block(self, block, index, stats, kwargs, reduce) -> BlockResult:
        out = {}
        for rel in self.linears:
            spec = self.plan.specs[f"{self.prefix}.{index}.{rel}"]
            if not spec.skip:
                out[rel] = quantize_linear_(block.get_submodule(rel), spec.w_bit, spec.group_size, spec.zero_point,
                                           spec.format)
        return BlockResult(out)


@method
class RTN(Method):
    name, config = "rtn", RTNConfig
    formats = ("awq", "compressed-tensors")  # AWQ first: what LMDeploy loads and exports wrote before
    rounds = True
    streams = True  # one pass over the blocks in order (quant.streaming)
    order = 1  # the baseline: right after FP16

    def quantize(self, model, cfg: RTNConfig, ctx, setup: Setup) -> QuantOutcome:
        arch = setup.arch
        # seconds per model: not worth checkpoints
        run = run_sequential(model, arch, RTNBlocks(setup.plan, arch.blocks, arch.linears), None, setup.placement,
                             desc="rtn", progress=ctx.progress)
        return QuantOutcome(summary=self.summary(cfg, setup, model, run.qtensors, **format_summary(cfg)),
                            timings_s={"rtn": time.perf_counter() - setup.started_s}, qtensors=run.qtensors)
