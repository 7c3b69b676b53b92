"""The quantization-method registry. A method is a function `(model, QuantConfig, QuantContext) -> QuantOutcome`
that changes the model in place; adding one is a new file with `@METHODS.register(name)` and a conf/quant/*.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from harness.config import QuantConfig
from harness.registry import Registry
from quant.onload import Placement


@dataclass
class QuantContext:
    calibration: Callable[[], torch.Tensor]  # lazily gives [n_samples, seqlen] token ids
    progress: bool = True
    placement: Placement = field(default_factory=Placement)  # where blocks compute, where weights rest (quant.onload)


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

# the sources that determine what each method computes (its code version: harness.environment.code_version), beside
# what every method shares; a method registered without an entry fails tests/quant/test_code_version.py
COMMON_SOURCES = ["quant/primitives.py", "quant/surgery.py", "quant/registry.py"]
METHOD_SOURCES = {
    "fp16": [],
    "rtn": ["quant/rtn.py"],
    "awq": ["quant/awq/method.py", "quant/awq/search.py", "quant/awq/fold.py", "harness/architectures.py"],
    "gptq": ["quant/gptq/method.py", "quant/gptq/algorithm.py", "quant/gptq/config.py", "quant/awq/method.py",
             "harness/architectures.py"],
    "awq_gptq": ["quant/gptq/awq_gptq.py", "quant/gptq/method.py", "quant/gptq/algorithm.py", "quant/gptq/config.py",
                 "quant/awq/method.py", "quant/awq/search.py", "quant/awq/fold.py", "harness/architectures.py"],
}


def method_sources(name: str) -> list[str]:
    if name not in METHOD_SOURCES:
        raise KeyError(f"quantization method {name!r} has no entry in quant.registry.METHOD_SOURCES")
    return COMMON_SOURCES + METHOD_SOURCES[name]


def method(name: str, needs_calibration: bool):
    def deco(fn):
        fn.needs_calibration = needs_calibration
        return METHODS.register(name)(fn)

    return deco


@method("fp16", needs_calibration=False)
def fp16(model, cfg: QuantConfig, ctx: QuantContext) -> QuantOutcome:
    """The unquantized reference: nothing to do."""
    return QuantOutcome(summary={"method": "fp16"})
