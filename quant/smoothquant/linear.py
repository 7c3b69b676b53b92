"""The W8A8 Linear as LMDeploy's engine runs it (pytorch/nn/linear/w8a8.py `W8A8Linear` with the Triton
`TritonLinearW8A8Impl`), simulated on the CPU: weight codes and per-row scales stored as LMDeploy stores them, the
input quantized per token on every call, the product of codes scaled back in fp32 (quant.smoothquant.numerics).

Its state_dict holds `weight` (codes, int8 / float8), `scale` (fp32 [out, 1]) and `bias`, the tensor names and dtypes
of LMDeploy's W8A8 layer, so a model that went through `swap_w8a8_` is not loadable into a plain model's state_dict
by accident (a plain Linear would silently drop the activation quantization)."""
from __future__ import annotations

import torch
import torch.nn as nn

from quant.primitives import QTensor
from quant.smoothquant.numerics import per_channel_quant, per_token_quant, w8a8_matmul


class W8A8Linear(nn.Module):
    def __init__(self, weight_codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_codes.shape
        self.quant_dtype = weight_codes.dtype
        self.register_buffer("weight", weight_codes)
        self.register_buffer("scale", scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> "W8A8Linear":
        q, s = per_channel_quant(linear.weight.data, dtype)
        return cls(q, s, linear.bias)

    def qtensor(self) -> QTensor:
        """The codes as the harness's QTensor: symmetric, one group per row (scales [out, 1])."""
        return QTensor(q=self.weight, scales=self.scale, zeros=None, w_bit=8, group_size=self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = per_token_quant(x, self.quant_dtype)
        return w8a8_matmul(xq, xs, self.weight, self.scale, self.bias, out_dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant_dtype={self.quant_dtype}"


@torch.no_grad()
def swap_w8a8_(parent: nn.Module, name: str, dtype: torch.dtype) -> W8A8Linear:
    """Replace the Linear `name` (relative to parent) by its W8A8Linear; return it."""
    lin = parent.get_submodule(name)
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"{name}: expected nn.Linear, got {type(lin).__name__}")
    q = W8A8Linear.from_linear(lin, dtype).to(lin.weight.device)
    owner_name, _, child = name.rpartition(".")
    setattr(parent.get_submodule(owner_name) if owner_name else parent, child, q)
    return q
