"""W8A8 linears on a GPU for SmoothQuant's configs: weights per output channel, activations per token (dynamic),
both symmetric, through the tensor cores' 8-bit products: fp8 e4m3 via `torch._scaled_mm` (H100/H200, row-wise
scales, bf16 out) and int8 via `torch._int_mm` (int32 out, scaled after). The numerics are SmoothQuant's as the
harness simulates them (quant/smoothquant): w_q = round(w / s_w), s_w = max|w_row| / qmax; x_q likewise per token."""
from __future__ import annotations

import torch
from torch import nn

FORMATS = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "int8": (torch.int8, 127.0)}


def quantize_rows(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of a 2-D tensor: (codes in the format's dtype, fp32 scales [rows, 1])."""
    dtype, qmax = FORMATS[fmt]
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    y = x.float() / scale
    y = y.round().clamp(-qmax, qmax) if dtype == torch.int8 else y.clamp(-qmax, qmax)
    return y.to(dtype), scale


class W8A8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str = "fp8_e4m3",
                 out_dtype: torch.dtype = torch.float16):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"W8A8 format {fmt!r}: choose one of {', '.join(FORMATS)}")
        self.fmt, self.out_dtype = fmt, out_dtype
        self.out_features, self.in_features = weight.shape
        wq, ws = quantize_rows(weight.detach(), fmt)
        self.register_buffer("weight_q", wq.contiguous())  # [N, K]; .t() is the column-major operand _scaled_mm takes
        self.register_buffer("weight_scale", ws.t().contiguous())  # [1, N]
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs = quantize_rows(x.reshape(-1, self.in_features), self.fmt)
        if self.fmt == "int8":
            y = (torch._int_mm(xq, self.weight_q.t()).float() * xs * self.weight_scale).to(self.out_dtype)
        else:
            y = torch._scaled_mm(xq, self.weight_q.t(), scale_a=xs, scale_b=self.weight_scale,
                                 out_dtype=torch.bfloat16).to(self.out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def packed_bytes(self) -> int:
        return self.weight_q.numel() * self.weight_q.element_size() + self.weight_scale.numel() * 4

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same product in float32 from the same codes (what the kernel must match up to accumulation order)."""
        xq, xs = quantize_rows(x.reshape(-1, self.in_features), self.fmt)
        w = self.weight_q.float() * self.weight_scale.t()
        return ((xq.float() * xs) @ w.t()).reshape(*x.shape[:-1], self.out_features)
