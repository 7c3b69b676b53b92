"""Model surgery shared by the methods: find the Linears to quantize, settle each one's group size (before any long
work), and replace a Linear's weight by its quantize-dequantize image while keeping the integer codes."""
from __future__ import annotations

import torch
import torch.nn as nn

from harness.architectures import ARCHITECTURES, Architecture, architecture_for, get_blocks
from harness.config import QuantConfig
from quant.primitives import QTensor, check_group_size, quantize_tensor


def quantizable_linears(model, arch: Architecture | None = None) -> dict[str, nn.Linear]:
    """Qualified name -> Linear for every Linear the layer map quantizes (lm_head and embeddings never are)."""
    arch = arch or architecture_for(model)
    out = {}
    for i, block in enumerate(get_blocks(model, arch)):
        for rel in arch.linears:
            out[f"{arch.blocks}.{i}.{rel}"] = block.get_submodule(rel)
    return out


def group_size_for(in_features: int, cfg: QuantConfig, name: str) -> int:
    """The group size used for a layer; with group_fallback=per_channel a non-dividing size becomes -1 (recorded)."""
    try:
        check_group_size(in_features, cfg.group_size, name)
        return cfg.group_size
    except ValueError:
        if cfg.group_fallback == "per_channel":
            return -1
        raise


def plan_group_sizes(model, cfg: QuantConfig) -> tuple[dict[str, int], list[str]]:
    """Group size per quantized Linear, and the layers that fell back; raises before any long work on bad input."""
    sizes, fallbacks = {}, []
    for name, lin in quantizable_linears(model).items():
        g = group_size_for(lin.in_features, cfg, name)
        sizes[name] = g
        if g != cfg.group_size:
            fallbacks.append(name)
    return sizes, fallbacks


def check_group_sizes(cfg: QuantConfig, hf_config: dict) -> None:
    """plan_group_sizes from the model's config.json alone, so a group size that does not divide a layer fails before
    the model loads (the layer map gives each Linear's in_features; an unknown architecture is left to the method)."""
    if cfg.method == "fp16" or hf_config.get("model_type") not in ARCHITECTURES:
        return
    try:
        tensors = ARCHITECTURES.get(hf_config["model_type"]).tensors(hf_config)
    except KeyError:  # a config.json without the usual dimension names: the method checks the loaded model
        return
    for t in tensors:
        if t.kind == "linear":
            group_size_for(t.shape[1], cfg, t.name)


@torch.no_grad()
def quantize_linear_(linear: nn.Linear, w_bit: int, group_size: int, zero_point: bool) -> QTensor:
    """Quantize a Linear's weight in place to its dequantized image; return the codes."""
    qt = quantize_tensor(linear.weight.data, w_bit, group_size, zero_point)
    linear.weight.data.copy_(qt.dequantize(linear.weight.dtype))
    return qt
