"""The quantization-method registry. A method is a function `(model, <its config>, QuantContext) -> QuantOutcome`
that changes the model in place; adding one is a new file with its config dataclass (`@quant_config(name)`,
harness.config) and the function (`@method(name, needs_calibration=...)`), a conf/quant/*.yaml, and an import in
quant/__init__.py (README "Adding a method")."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch

from harness.config import FP16Config, QuantConfig
from harness.registry import Registry
from quant.onload import Placement


@dataclass
class QuantContext:
    calibration: Callable[[], torch.Tensor]  # lazily gives [n_samples, seqlen] token ids
    progress: bool = True
    placement: Placement = field(default_factory=Placement)  # where blocks compute, where weights rest (quant.onload)
    # where a block-by-block method keeps each finished block, to resume a killed run (quant.calibration.checkpoint);
    # quantized_cache.quantize_cached names it by the cache key; None: no checkpoints
    checkpoint_dir: Optional[Path] = None


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
# the sequential calibration runner (block loop, capture, propagation, checkpoints, reductions): every method on it
RUNNER_SOURCES = ["quant/calibration/runner.py", "quant/calibration/capture.py", "quant/calibration/checkpoint.py",
                  "quant/calibration/reduce.py"]
METHOD_SOURCES = {
    "fp16": [],
    "rtn": ["quant/rtn.py", *RUNNER_SOURCES],
    "awq": ["quant/awq/method.py", "quant/awq/search.py", "quant/awq/fold.py", "quant/awq/observe.py",
            "quant/awq/config.py", "harness/architectures.py",
            *RUNNER_SOURCES],
    "gptq": ["quant/gptq/method.py", "quant/gptq/algorithm.py", "quant/gptq/config.py",
             "quant/kernels/gptq_columns.py", "harness/architectures.py",
             *RUNNER_SOURCES],
    "awq_gptq": ["quant/gptq/awq_gptq.py", "quant/gptq/method.py", "quant/gptq/algorithm.py", "quant/gptq/config.py",
                 "quant/kernels/gptq_columns.py", "quant/awq/method.py", "quant/awq/search.py", "quant/awq/fold.py",
                 "quant/awq/observe.py", "quant/awq/config.py", "harness/architectures.py", *RUNNER_SOURCES],
    "recipe": ["quant/recipe.py", "quant/rtn.py", "quant/gptq/method.py", "quant/gptq/algorithm.py",
               "quant/gptq/config.py", "quant/kernels/gptq_columns.py", "quant/awq/method.py", "quant/awq/search.py",
               "quant/awq/fold.py", "quant/awq/observe.py", "quant/awq/config.py", "harness/architectures.py",
               *RUNNER_SOURCES],
    "smoothquant": ["quant/smoothquant/method.py", "quant/smoothquant/numerics.py", "quant/smoothquant/linear.py",
                    "quant/smoothquant/calibrate.py", "quant/smoothquant/smooth.py", "quant/smoothquant/config.py",
                    "quant/awq/search.py", "quant/awq/fold.py", "quant/awq/observe.py", "harness/architectures.py",
                    *RUNNER_SOURCES],
}


def method_sources(name: str) -> list[str]:
    if name not in METHOD_SOURCES:
        raise KeyError(f"quantization method {name!r} has no entry in quant.registry.METHOD_SOURCES")
    return COMMON_SOURCES + METHOD_SOURCES[name]


def method(name: str, needs_calibration: bool, cacheable: bool = True):
    """Register a method function under `name`; its config class registers under the same name (@quant_config).
    `cacheable`: its result is the model's own parameters plus codes (quant.quantized_cache stores and restores
    those); a method that swaps modules for others (SmoothQuant's W8A8 Linears) is recomputed every run instead."""
    def deco(fn):
        fn.needs_calibration = needs_calibration
        fn.cacheable = cacheable
        return METHODS.register(name)(fn)

    return deco


@method("fp16", needs_calibration=False)
def fp16(model, cfg: FP16Config, ctx: QuantContext) -> QuantOutcome:
    """The unquantized reference: nothing to do."""
    return QuantOutcome(summary={"method": "fp16"})
