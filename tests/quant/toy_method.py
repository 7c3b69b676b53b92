"""A method as a new one is written (README "Adding a method"), for tests/quant/test_method_registry.py: its config and
its class in one file. Not decorated with @method: each test registers it, and the registries are restored after."""
from __future__ import annotations

from dataclasses import dataclass

from harness.config import WeightQuantConfig
from quant.registry import Method, QuantOutcome
from quant.surgery import quantize_linear_


@dataclass
class ToyConfig(WeightQuantConfig):
    method: str = "toy"


class Toy(Method):
    """Round to nearest from the shared setup's plan, with the shared summary; no checkpoint format."""

    name, config = "toy", ToyConfig
    rounds = True
    label, order = "Toy", 5

    def quantize(self, model, cfg, ctx, setup) -> QuantOutcome:
        qt = {n: quantize_linear_(model.get_submodule(n), s.w_bit, s.group_size, s.zero_point)
              for n, s in setup.plan.quantized().items()}
        return QuantOutcome(summary=self.summary(cfg, setup, model, qt), qtensors=qt)
