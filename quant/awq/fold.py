"""Folding an AWQ input-channel scale s into the op before the scaled Linears: X W^T = (X / s)(W s)^T, so dividing
the previous op's output channels by s and multiplying the Linears' input columns by s leaves the FP output
unchanged (before quantization)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


@torch.no_grad()
def fold_into_norm_(norm: nn.Module, s: torch.Tensor, kind: str) -> None:
    w = norm.weight.data.float()
    if kind == "norm":  # y = n(x) * w  ->  w / s
        new = w / s
    elif kind == "norm_plus_one":  # Gemma: y = n(x) * (1 + w)  ->  (1 + w) / s - 1
        new = (1.0 + w) / s - 1.0
    else:
        raise ValueError(f"unknown norm kind {kind!r}")
    norm.weight.data = new.to(norm.weight.dtype)
    if getattr(norm, "bias", None) is not None:
        norm.bias.data = (norm.bias.data.float() / s).to(norm.bias.dtype)


@torch.no_grad()
def fold_into_linear_(prev: nn.Linear, s: torch.Tensor) -> None:
    """Divide the previous Linear's output rows by s (only its last len(s) rows when it is a fused projection)."""
    n = s.numel()
    rows = slice(prev.weight.shape[0] - n, prev.weight.shape[0])
    prev.weight.data[rows] = (prev.weight.data[rows].float() / s.view(-1, 1)).to(prev.weight.dtype)
    if getattr(prev, "bias", None) is not None:
        prev.bias.data[rows] = (prev.bias.data[rows].float() / s).to(prev.bias.dtype)


@torch.no_grad()
def scale_linears_(linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    for lin in linears:
        lin.weight.data = (lin.weight.data.float() * s.view(1, -1)).to(lin.weight.dtype)


def apply_scale_(block: nn.Module, prev_op: str, prev_kind: str, linears: Sequence[str], s: torch.Tensor) -> None:
    prev = block.get_submodule(prev_op)
    if prev_kind == "linear":
        fold_into_linear_(prev, s)
    else:
        fold_into_norm_(prev, s, prev_kind)
    scale_linears_([block.get_submodule(n) for n in linears], s)
