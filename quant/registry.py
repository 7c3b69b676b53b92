"""The quantization-method registry. A method is a function `(model, QuantConfig, QuantContext) -> QuantOutcome`
that changes the model in place; adding one is a new file with `@METHODS.register(name)` and a conf/quant/*.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from harness.config import QuantConfig
from harness.registry import Registry


@dataclass
class QuantContext:
    calibration: Callable[[], torch.Tensor]  # lazily gives [n_samples, seqlen] token ids
    progress: bool = True


@dataclass
class QuantOutcome:
    summary: dict = field(default_factory=dict)  # what the method did: layers, fallbacks, bytes
    timings_s: dict = field(default_factory=dict)
    # per quantized Linear (by qualified name): integer codes, scales, zeros, for export and real-kernel runs
    qtensors: dict = field(default_factory=dict)


class QuantMethod(Protocol):
    needs_calibration: bool

    def __call__(self, model, cfg: QuantConfig, ctx: QuantContext) -> QuantOutcome: ...


METHODS: Registry[QuantMethod] = Registry("quantization method (quant.method)")


def method(name: str, needs_calibration: bool):
    def deco(fn):
        fn.needs_calibration = needs_calibration
        return METHODS.register(name)(fn)

    return deco


@method("fp16", needs_calibration=False)
def fp16(model, cfg: QuantConfig, ctx: QuantContext) -> QuantOutcome:
    """The unquantized reference: nothing to do."""
    return QuantOutcome(summary={"method": "fp16"})
