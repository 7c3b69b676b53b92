"""Checkpoint formats a run's quantized weights are written in, one registry keyed by the format's name; a method
says which of them its codes fit (quant.registry.Method.formats): grouped integer weight-only codes (RTN, AWQ,
GPTQ with static groups, AutoRound, recipes) as an AutoAWQ GEMM checkpoint, which LMDeploy's engines load as
`model_format='awq'`, or in the compressed-tensors layout (vLLM, llm-compressor, transformers), which also holds FP4
codes (NVFP4, MXFP4); SmoothQuant W8A8 in LMDeploy's `smooth_quant` layout (PyTorch engine)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from harness.config import user_error
from harness.registry import Registry


@dataclass(frozen=True)
class Format:
    name: str  # quantization_config.quant_method of the written checkpoint
    export: Callable  # (model, qtensors, out_dir, tokenizer=None, **kw) -> Path; kw: quant_meta, manifest (not all)
    # the weight grids (quant.format: harness.config.WEIGHT_FORMATS) its layout holds: a method's formats narrow to
    # these per config (formats_of)
    weight_formats: tuple[str, ...] = ("int",)
    # (quant_cfg, model=None) -> None: refuses, before any weight is read, a config (and with `model`, any module
    # tree with the real shapes) the layout cannot hold; None: the format checks when it writes
    check: Optional[Callable] = None


def _awq(model, qtensors, out_dir, tokenizer=None, **kw):
    from quant.export.awq import export_awq

    return export_awq(model, qtensors, out_dir, tokenizer=tokenizer, **kw)


def _check_awq(quant_cfg, model=None):
    from quant.export.awq import check_awq_config

    check_awq_config(quant_cfg, model)


def _compressed_tensors(model, qtensors, out_dir, tokenizer=None, **kw):
    from quant.export.compressed_tensors import export_compressed_tensors

    return export_compressed_tensors(model, qtensors, out_dir, tokenizer=tokenizer, **kw)


def _check_compressed_tensors(quant_cfg, model=None):
    from quant.export.compressed_tensors import check_compressed_tensors_config

    check_compressed_tensors_config(quant_cfg, model)


def _smoothquant(model, qtensors, out_dir, tokenizer=None):
    from quant.export.smoothquant import export_smoothquant

    return export_smoothquant(model, qtensors, out_dir, tokenizer=tokenizer)


FORMATS: Registry[Format] = Registry("checkpoint format")
FORMATS.add("awq", Format("awq", _awq, check=_check_awq))
FORMATS.add("compressed-tensors", Format("compressed-tensors", _compressed_tensors, ("int", "nvfp4", "mxfp4"),
                                         _check_compressed_tensors))
FORMATS.add("smooth_quant", Format("smooth_quant", _smoothquant))


def formats_of(quant_cfg) -> tuple[str, ...]:
    """The formats a run's codes can be written in, preferred first: its method's (for this config) whose layout holds
    the config's weight grid (an FP4 config: compressed-tensors only)."""
    from quant import METHODS

    grid = getattr(quant_cfg, "format", "int")
    return tuple(f for f in METHODS.get(quant_cfg.method).export_formats(quant_cfg)
                 if grid in FORMATS.get(f).weight_formats)


def format_for(quant_cfg, accepted=None) -> Format:
    """The format a run's weights are written in: the first of its formats (formats_of) that `accepted` (format
    names; None: any) holds. A ConfigError before any work when there is none, so a method that cannot be written
    fails at its preflight, not after quantizing."""
    own = formats_of(quant_cfg)
    fit = [f for f in own if accepted is None or f in accepted]
    if not fit:
        has = f"its formats are {', '.join(own)}" if own else "it has no checkpoint format"
        raise user_error("quant.method", quant_cfg.method, f"{has}; this needs one of {', '.join(accepted or FORMATS)}",
                         "choose a method that has one (e.g. quant=awq_w4), or evaluate with backend=hf")
    return FORMATS.get(fit[0])
