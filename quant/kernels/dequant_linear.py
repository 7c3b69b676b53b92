"""The reference W4A16 "kernel": the codes dequantized once, (q - z) * s cast to the activation dtype, and an ordinary
matrix product (cuBLAS on a GPU); it takes any bit width, so `auto` always ends here. It multiplies by exactly the weights of the fake-quantized simulation, at FP16's
speed and size: the row every real kernel is compared with."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from quant.kernels.w4a16 import W4A16Kernel, register
from quant.primitives import QTensor


class DequantLinear(nn.Module):
    def __init__(self, qt: QTensor, bias: torch.Tensor | None, dtype: torch.dtype, device):
        super().__init__()
        self.out_features, self.in_features = qt.q.shape
        self.register_buffer("weight", qt.dequantize(torch.float32).to(device=device, dtype=dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def packed_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


register(W4A16Kernel(
    name="dequant", description="dequantized weights (simulation; FP16 matmul)",
    build=lambda qt, bias, dtype, device, where: DequantLinear(qt, bias, dtype, device),
    unavailable=lambda device, dtype: None,
    check=lambda qt, where: None, exact=True))  # any bit width, with or without a zero point
