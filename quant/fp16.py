"""The unquantized reference (run in model.dtype): nothing to set up or do, on any architecture."""
from __future__ import annotations

from harness.config import FP16Config
from quant.registry import Method, QuantOutcome, method


@method
class FP16(Method):
    name, config = "fp16", FP16Config
    label, order = "FP16", 0  # the first row: every delta refers to it

    def __call__(self, model, cfg, ctx) -> QuantOutcome:
        return QuantOutcome(summary={"method": "fp16"})
