"""SmoothQuant W8A8 (Xiao et al. 2023) numerics as pure functions, following LMDeploy's PyTorch engine.

Reference: InternLM/lmdeploy@1263d5cd, function names, not line numbers:
- weights, kernels/default/w8a8_kernels.py `per_channel_quant` (used by lite `smooth_quant` through
  models/q_modules.py `QLinear.from_float`): symmetric, one fp32 scale per output row,
      scale = max|w_row| / qmax;  q = clamp(w / scale, qmin, qmax), rounded half-to-even (torch.round) for int8,
      a plain cast (round to nearest even) for fp8.   qmax: int8 127, float8_e4m3fn 448, float8_e5m2 57344.
- activations, kernels/cuda/w8a8_triton_kernels.py `per_token_quant_int8` (and `rms_norm_dynamic_quant`, the same
  per-token absmax on the norm's output), dynamic, one fp32 scale per token:
      scale = max(max|x_token|, eps) / qmax;  q = x / scale, rounded half AWAY from zero (libdevice `round`) for
      int8, cast for fp8. eps = 1e-7 (`TritonLinearW8A8Impl.forward`).
- matmul, `matmul_kernel_dynamic_quant`: int32 (int8) or fp32 (fp8) accumulation of codes, then
      y = acc * x_scale[token] * w_scale[row] in fp32, stored in the output dtype, then + bias.
- smoothing, lite/quantization/awq.py `smooth_ln_fcs` / `smooth_fc_fcs` (fixed alpha; lite `smooth_quant` passes
  none, so alpha = 0.5): s = max|x|^alpha / w_stat^(1 - alpha), clamped below at 1e-4, normalised so that
  sqrt(max(s) * min(s)) = 1, where w_stat is `get_weight_scale`: the mean over output rows of |w| / max|w_row| (not
  the paper's max|W|; quant.awq.search.weight_absmean). Positions where the norm weight is 0 keep s = 1 and are left
  out of the normalisation.
Differences, on purpose: IEEE fp32 division here vs Triton's approximate `div.full.f32` (a value on a rounding boundary
can land one code apart); the smoothing scale in fp32 rather than the model dtype; an all-zero weight row gets scale 1
(LMDeploy divides 0 by 0 and stores NaN codes; both dequantize to 0 only here).
"""
from __future__ import annotations

import torch

from harness.config import ConfigError

# harness names -> the torch dtype LMDeploy stores (quantization_config.quant_dtype is str(dtype) without "torch.")
QUANT_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
ACT_EPS = 1e-7  # TritonLinearW8A8Impl.forward: per_token_quant_int8(x, 1e-7)


def quant_dtype(name: str) -> torch.dtype:
    if name not in QUANT_DTYPES:
        raise ConfigError(f"quant.dtype: {name!r} is not one of {', '.join(QUANT_DTYPES)}")
    return QUANT_DTYPES[name]


def qrange(dtype: torch.dtype) -> tuple[float, float]:
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    return float(info.min), float(info.max)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """CUDA libdevice `round` (Triton's tl_round): ties away from zero. torch.round (ties to even) everywhere, then the
    exact ties (x - round(x) = +-0.5, exact in binary FP) moved away from zero; ties are rare, so this costs one
    rounding pass, not five."""
    r = torch.round(x)
    tie = torch.sub(x, r).abs_() == 0.5
    if bool(tie.any()):
        r = torch.where(tie, x + 0.5 * torch.sign(x), r)
    return r


def _to_codes(y: torch.Tensor, dtype: torch.dtype, rounding) -> torch.Tensor:
    lo, hi = qrange(dtype)
    if not dtype.is_floating_point:
        y = rounding(y)
    # for fp8 the clamp only catches a quotient an ulp past qmax (float8_e4m3fn has no inf: it would become NaN)
    return y.clamp_(lo, hi).to(dtype)


def per_channel_quant(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """LMDeploy `per_channel_quant`: codes [out, in] in `dtype`, fp32 scales [out, 1]."""
    if w.dim() != 2:
        raise ValueError(f"per_channel_quant takes a 2-D weight, got shape {tuple(w.shape)}")
    w = w.float()
    absmax = w.abs().amax(dim=1, keepdim=True)
    scale = absmax / qrange(dtype)[1]
    scale = torch.where(absmax > 0, scale, torch.ones_like(scale))  # an all-zero row: codes 0 either way
    return _to_codes(w / scale, dtype, torch.round), scale


def per_token_quant(x: torch.Tensor, dtype: torch.dtype, eps: float = ACT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """LMDeploy `per_token_quant_int8` over the last dim: codes in `dtype`, fp32 scales [..., 1]."""
    y = x.float() if x.dtype != torch.float32 else x.clone()  # a private fp32 copy, divided in place
    mn, mx = torch.aminmax(y, dim=-1, keepdim=True)
    scale = torch.maximum(mx, -mn).clamp_(min=eps).div_(qrange(dtype)[1])
    return _to_codes(y.div_(scale), dtype, round_half_away), scale


def fake_quant_per_token(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """per_token_quant then dequantize, fp32."""
    q, s = per_token_quant(x, dtype)
    return q.float() * s


def w8a8_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """`matmul_kernel_dynamic_quant`: (codes x codes^T) * x_scale * w_scale in fp32, to out_dtype, + bias. The codes
    are exact in fp32 and so are the products; the sums are exact while they stay below 2^24 (int8: in_features up to
    1040 always, in practice far more), i.e. equal to the kernel's int32 accumulation."""
    acc = torch.nn.functional.linear(xq.float(), wq.float())
    out = (acc * xs * ws.view(1, -1)).to(out_dtype)
    return out if bias is None else out + bias.to(out_dtype)


def smooth_scale(x_absmax: torch.Tensor, w_stat: torch.Tensor, alpha: float,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
    """LMDeploy `smooth_ln_fcs` (keep = norm weight != 0) / `smooth_fc_fcs` (keep = None): the per-input-channel
    smoothing scale, through the one implementation of the formula (quant.awq.search.smoothing_scale)."""
    from quant.awq.search import smoothing_scale

    if keep is None or bool(keep.all()):
        s = smoothing_scale(x_absmax.float(), w_stat.float(), alpha)
    else:
        s = torch.ones_like(x_absmax, dtype=torch.float32)
        s[keep] = smoothing_scale(x_absmax[keep].float(), w_stat[keep].float(), alpha)
    if not bool(torch.isfinite(s).all()):
        raise FloatingPointError("smoothing scale is not finite (an input channel with zero weight in every row, or "
                                 "NaN/Inf calibration activations)")
    return s
