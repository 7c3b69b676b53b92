"""Model surgery shared by the methods: find the Linears to quantize, settle each one's group size (before any long
work), and replace a Linear's weight by its quantize-dequantize image while keeping the integer codes."""
from __future__ import annotations

import torch
import torch.nn as nn

from harness.config import QuantConfig
from quant.layer_maps import LayerMap, get_blocks, layer_map_for
from quant.primitives import QTensor, check_group_size, quantize_tensor


def quantizable_linears(model, lmap: LayerMap | None = None) -> dict[str, nn.Linear]:
    """Qualified name -> Linear for every Linear the layer map quantizes (lm_head and embeddings never are)."""
    lmap = lmap or layer_map_for(model)
    out = {}
    for i, block in enumerate(get_blocks(model, lmap)):
        for rel in lmap.linears:
            out[f"{lmap.blocks}.{i}.{rel}"] = block.get_submodule(rel)
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


@torch.no_grad()
def quantize_linear_(linear: nn.Linear, w_bit: int, group_size: int, zero_point: bool) -> QTensor:
    """Quantize a Linear's weight in place to its dequantized image; return the codes."""
    qt = quantize_tensor(linear.weight.data, w_bit, group_size, zero_point)
    linear.weight.data.copy_(qt.dequantize(linear.weight.dtype))
    return qt


def packed_weight_bytes(model, qtensors: dict[str, QTensor]) -> dict:
    """Bytes of the weights as deployed: packed codes + fp16 scales/zeros for quantized Linears, fp16 for the rest
    (tied parameters counted once)."""
    quantized_params = {id(model.get_submodule(n).weight) for n in qtensors}
    seen, fp16_bytes = set(), 0
    for p in model.parameters():
        if id(p) in seen or id(p) in quantized_params:
            continue
        seen.add(id(p))
        fp16_bytes += p.numel() * 2
    q_bytes = sum(q.nbytes_packed() for q in qtensors.values())
    total_fp16 = sum(p.numel() * 2 for p in {id(p): p for p in model.parameters()}.values())
    return {"weight_bytes": q_bytes + fp16_bytes, "weight_bytes_fp16": total_fp16,
            "quantized_linear_bytes": q_bytes, "unquantized_bytes": fp16_bytes,
            "weight_bytes_ratio": (q_bytes + fp16_bytes) / total_fp16}
