"""Checkpoint formats a run's quantized weights are written in, one registry keyed by quant.method: grouped
integer weight-only codes (RTN, AWQ, and GPTQ with static groups) as an AutoAWQ GEMM checkpoint, which LMDeploy's
engines load as `model_format='awq'`; SmoothQuant W8A8 in LMDeploy's `smooth_quant` layout (PyTorch engine)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from harness.registry import Registry


@dataclass(frozen=True)
class Format:
    name: str  # quantization_config.quant_method of the written checkpoint
    export: Callable  # (model, qtensors, out_dir, tokenizer=None) -> Path


def _awq(model, qtensors, out_dir, tokenizer=None):
    from quant.export.awq import export_awq

    return export_awq(model, qtensors, out_dir, tokenizer=tokenizer)


def _smoothquant(model, qtensors, out_dir, tokenizer=None):
    from quant.export.smoothquant import export_smoothquant

    return export_smoothquant(model, qtensors, out_dir, tokenizer=tokenizer)


FORMATS: Registry[Format] = Registry("checkpoint format (by quant.method)")
for _m in ("rtn", "awq", "gptq", "awq_gptq", "recipe"):
    FORMATS.add(_m, Format("awq", _awq))
FORMATS.add("smoothquant", Format("smooth_quant", _smoothquant))
