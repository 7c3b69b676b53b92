"""Pure quantization math over tensors: per-group affine quantization of a weight matrix [out, in] along `in`.

Conventions follow llm-awq's `pseudo_quantize_tensor` (and so LMDeploy's AWQ and AutoAWQ):
- asymmetric (zero_point=True): scale = (max - min) / (2^b - 1), zero = clamp(-round(min / scale), 0, 2^b - 1),
  q = clamp(round(w / scale) + zero, 0, 2^b - 1), w_hat = (q - zero) * scale. Codes are unsigned.
- symmetric: scale = max|w| / (2^(b-1) - 1), q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1), w_hat = q * scale.
`group_size=-1` means one group per output row (per-channel).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from harness.config import ConfigError

SCALE_EPS = 1e-5  # llm-awq clamps (max - min) and max|w| to this, so constant groups do not divide by zero


@dataclass
class QTensor:
    """A weight quantized per group: integer codes [out, in], scales and zeros [out, n_groups]."""

    q: torch.Tensor  # uint8 codes (asymmetric) or int8 codes (symmetric)
    scales: torch.Tensor  # float32
    zeros: Optional[torch.Tensor]  # float32 holding integers, or None when symmetric
    w_bit: int
    group_size: int  # the effective group size (in_features when per-channel)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scales, self.zeros, self.group_size).to(dtype)

    def nbytes_packed(self) -> int:
        """Bytes when stored in AWQ's layout (harness.storage_bytes): codes and zeros at w_bit bits, fp16 scales."""
        from harness.storage_bytes import quantized_weight_bytes

        return quantized_weight_bytes(self.q.numel(), self.scales.numel(), self.w_bit, self.zeros is not None)


def effective_group_size(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


def check_group_size(in_features: int, group_size: int, where: str = "") -> None:
    g = effective_group_size(in_features, group_size)
    if in_features % g:
        raise ConfigError(
            f"quant.group_size={group_size} does not divide in_features={in_features}{' of ' + where if where else ''}; "
            f"choose a divisor of {in_features} (e.g. 32 or 64), or set quant.group_fallback=per_channel"
        )


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, inn = w.shape
    g = effective_group_size(inn, group_size)
    check_group_size(inn, group_size)
    return w.reshape(out, inn // g, g)


def quant_params(w: torch.Tensor, w_bit: int, group_size: int, zero_point: bool = True):
    """Scales and zeros [out, n_groups] (float32) for the weight w [out, in]."""
    wg = _grouped(w.float(), group_size)
    if zero_point:
        return range_params(wg.amax(dim=-1), wg.amin(dim=-1), w_bit, True)
    return range_params(wg.abs().amax(dim=-1), None, w_bit, False)


def range_params(mx: torch.Tensor, mn: Optional[torch.Tensor], w_bit: int, zero_point: bool = True):
    """The grid's scales and zeros for each group's range: [mn, mx] (asymmetric) or [-mx, mx] with mx = max |w|
    (symmetric; mn unused). `quant_params` takes the weights' own range; a clipping search passes a shrunk one."""
    if zero_point:
        max_int = 2**w_bit - 1
        scales = (mx - mn).clamp(min=SCALE_EPS) / max_int
        zeros = (-torch.round(mn / scales)).clamp(0, max_int)
        return scales, zeros
    return mx.clamp(min=SCALE_EPS) / (2 ** (w_bit - 1) - 1), None


def quantize(w: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], w_bit: int, group_size: int) -> torch.Tensor:
    """Integer codes [out, in] for w given per-group scales/zeros."""
    wg = _grouped(w.float(), group_size)
    if zeros is not None:
        q = torch.clamp(torch.round(wg / scales[..., None]) + zeros[..., None], 0, 2**w_bit - 1)
        return q.reshape(w.shape).to(torch.uint8)
    q = torch.clamp(torch.round(wg / scales[..., None]), -(2 ** (w_bit - 1)), 2 ** (w_bit - 1) - 1)
    return q.reshape(w.shape).to(torch.int8)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int) -> torch.Tensor:
    qg = _grouped(q.float(), group_size)
    if zeros is not None:
        qg = qg - zeros[..., None]
    return (qg * scales[..., None]).reshape(q.shape)


def quantize_tensor(w: torch.Tensor, w_bit: int, group_size: int, zero_point: bool = True) -> QTensor:
    scales, zeros = quant_params(w, w_bit, group_size, zero_point)
    q = quantize(w, scales, zeros, w_bit, group_size)
    return QTensor(q, scales, zeros, w_bit, effective_group_size(w.shape[1], group_size))


def fake_quantize(w: torch.Tensor, w_bit: int, group_size: int, zero_point: bool = True) -> torch.Tensor:
    """Quantize then dequantize, in w's dtype (llm-awq's pseudo_quantize_tensor). Differentiable-free, in-graph cheap."""
    wg = _grouped(w, group_size)
    if zero_point:
        max_int = 2**w_bit - 1
        mx, mn = wg.amax(dim=-1, keepdim=True), wg.amin(dim=-1, keepdim=True)
        scales = (mx - mn).clamp(min=SCALE_EPS) / max_int
        zeros = (-torch.round(mn / scales)).clamp(0, max_int)
        out = (torch.clamp(torch.round(wg / scales) + zeros, 0, max_int) - zeros) * scales
    else:
        max_int = 2 ** (w_bit - 1) - 1
        scales = wg.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_EPS) / max_int
        out = torch.clamp(torch.round(wg / scales), -max_int - 1, max_int) * scales
    return out.reshape(w.shape)


def pack_int4_pairs(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., 2k] -> bytes [..., k], low nibble first."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4_pairs(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
