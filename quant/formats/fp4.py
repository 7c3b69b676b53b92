"""FP4 weight formats: e2m1 values under NVFP4's or MXFP4's block scales, as pure functions over a weight [out, in]
(blocks along in, like quant/primitives.py's groups).

e2m1 (OCP Microscaling Formats v1.0, Sec. 5.3.3): 1 sign, 2 exponent, 1 mantissa bit; a code is sign << 3 | index,
index 0..7 -> 0, 0.5, 1, 1.5, 2, 3, 4, 6. No inf/NaN; max 6 (emax 2). Rounding is to nearest, ties to the even
index (mantissa bit 0), saturating at +-6, as the MX spec's conversion and NVIDIA's `cvt.rn.satfinite.e2m1x2.f32` do.
The sign survives rounding to zero (-0.1 -> code 8, -0), as with that instruction and compressed-tensors' packing.

NVFP4 (NVIDIA; compressed-tensors' definition, which llm-compressor writes and vLLM reads:
compressed_tensors/quantization/utils/helpers.py `generate_gparam` and `calculate_qparams`,
lifecycle/forward_helpers.py `_quantize` / `_dequantize`): blocks of 16, and
  global_scale = 448 * 6 / amax|w|                      (fp32; checkpoint tensor `weight_global_scale`)
  block_scale  = fp8_e4m3(global_scale * amax_block / 6), 0 replaced by 0.125 (fp8's eps)   (`weight_scale`)
  codes = e2m1(w / (block_scale / global_scale));  w_hat = value(codes) * (block_scale / global_scale).
NVIDIA's ModelOpt stores the reciprocal (`weight_scale_2 = amax / (6 * 448)`) and multiplies; the value is the same
up to the last bit of the per-tensor factor. The harness's arithmetic is float32 throughout; compressed-tensors
additionally rounds w / scale through bfloat16 before the e2m1 thresholds (fp4_utils.cast_to_fp4), a double rounding
the harness does not copy (a value within bf16's ulp of a midpoint may land on the other side).

MXFP4 (OCP MX v1.0, Sec. 6.3): blocks of 32, a shared scale X = 2^e stored as e8m0 (biased exponent, bias 127),
  e = floor(log2(amax_block)) - emax_elem,  emax_elem = 2 for e2m1,  clamped to e8m0's [-127, 127],
  codes = e2m1(w / X) (saturating);  w_hat = value(codes) * X.
The spec's floor leaves a block whose amax has mantissa >= 1.75 past 6 after scaling (saturated to 6, an error up
to 2 X); compressed-tensors (mx_utils.round_to_power_2) rounds amax up to the next power of two in that case, and
other tools use ceil: the harness follows the spec. A zero block takes e = -127 (e8m0 code 0), as Microsoft's
microxcaling reference does (log2(0) clamped to the smallest scale).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from harness.config import WEIGHT_FORMATS, ConfigError
from quant.primitives import pack_int4_pairs, unpack_int4_pairs

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # by code & 7; code bit 3 is the sign
E2M1_MAX = 6.0
E2M1_EMAX = 2  # 6 = 1.5 * 2^2
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between consecutive magnitudes
FP8_E4M3_MAX = 448.0
FP8_E4M3_EPS = 0.125  # compressed-tensors' stand-in for a zero fp8 block scale (helpers._get_dtype_eps)
E8M0_BIAS, E8M0_MIN_EXP, E8M0_MAX_EXP = 127, -127, 127  # 0xFF is NaN, never produced
FP4_FORMATS = {f: b for f, b in WEIGHT_FORMATS.items() if b}  # format -> block size along in_features: 16, 32


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 of the nearest e2m1 values (ties to even, saturating at +-6); x finite (+-inf saturate)."""
    a = x.abs()
    mids = torch.tensor(_MIDPOINTS, dtype=a.dtype, device=a.device)
    idx = torch.bucketize(a, mids)  # how many midpoints lie strictly below |x|: the lower neighbour at a tie
    tie = (a == mids[idx.clamp(max=len(_MIDPOINTS) - 1)]) & (idx % 2 == 1)
    idx = idx + tie.long()  # at a tie the even index wins
    return (idx | (torch.signbit(x).long() << 3)).to(torch.uint8)


def e2m1_values(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of e2m1 codes (code 8 is -0.0)."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=dtype, device=codes.device)
    table = torch.cat([mags, -mags])
    return table[codes.long()]


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded onto the e2m1 grid, in x's dtype."""
    return e2m1_values(e2m1_codes(x), x.dtype)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Two codes a byte, low nibble first (the even index), as compressed-tensors' pack_fp4_to_uint8: [..., 2k] ->
    [..., k] uint8."""
    return pack_int4_pairs(codes)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    return unpack_int4_pairs(packed)


def check_blocks(in_features: int, fmt: str, where: str = "") -> None:
    b = FP4_FORMATS[fmt]
    if in_features % b:
        raise ConfigError(f"quant.format={fmt} takes blocks of {b} along in_features, which {in_features}"
                          f"{' of ' + where if where else ''} is not a multiple of; skip the layer "
                          f"(quant.layer_overrides with skip: true) or use quant.format=int")


def _blocks(w: torch.Tensor, fmt: str) -> torch.Tensor:
    out, inn = w.shape
    check_blocks(inn, fmt)
    b = FP4_FORMATS[fmt]
    return w.reshape(out, inn // b, b)


def nvfp4_global_scale(w: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' `weight_global_scale`: 448 * 6 / amax|w|, fp32 [1], one correctly rounded division.
    (compressed-tensors writes `2688 / amax_tensor`, which torch computes as 2688 * (1 / amax), rounded twice: it may
    differ in the last bit.) amax is clamped so the scale stays finite (compressed-tensors clamps at float32's tiny,
    which overflows to inf for an all-zero tensor)."""
    amax = w.float().abs().amax().clamp(min=FP8_E4M3_MAX * E2M1_MAX / torch.finfo(torch.float32).max)
    return torch.div(torch.tensor(FP8_E4M3_MAX * E2M1_MAX, device=amax.device), amax).reshape(1)


def nvfp4_block_scales(w: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """fp8 e4m3 scale per block of 16 [out, in // 16]: global_scale * amax_block / 6, clamped to +-448, rounded to
    nearest even by the cast; a zero becomes 0.125 (compressed-tensors' calculate_qparams)."""
    amax = _blocks(w.float(), "nvfp4").abs().amax(dim=-1)
    s = (global_scale * (amax / E2M1_MAX)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return torch.where(s.float() == 0, torch.tensor(FP8_E4M3_EPS, dtype=s.dtype, device=s.device), s)


def mxfp4_scale_exponents(w: torch.Tensor) -> torch.Tensor:
    """The e8m0 shared scale per block of 32 [out, in // 32], as uint8 biased exponents (X = 2^(code - 127)):
    floor(log2(amax_block)) - 2, clamped to [-127, 127] (OCP MX v1.0 Sec. 6.3). floor(log2) is read off frexp,
    exact where log2 rounds up just below a power of two."""
    amax = _blocks(w.float(), "mxfp4").abs().amax(dim=-1)
    _, ex = torch.frexp(amax)  # amax = m * 2^ex, m in [0.5, 1): floor(log2 amax) = ex - 1
    e = torch.where(amax > 0, ex - 1 - E2M1_EMAX, torch.full_like(ex, E8M0_MIN_EXP))
    return (e.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP) + E8M0_BIAS).to(torch.uint8)


def block_scales(scales: torch.Tensor, global_scale: Optional[torch.Tensor], fmt: str) -> torch.Tensor:
    """The float32 factor each block's e2m1 values are multiplied by [out, n_blocks]: block_scale / global_scale
    (NVFP4) or 2^e (MXFP4)."""
    if fmt == "nvfp4":
        return scales.float() / global_scale
    e = scales.to(torch.int32) - E8M0_BIAS
    return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e)


def quantize_blocks(w: torch.Tensor, factors: torch.Tensor, fmt: str) -> torch.Tensor:
    """e2m1 codes [out, in] of w under per-block factors (block_scales)."""
    return e2m1_codes(_blocks(w.float(), fmt) / factors[..., None]).reshape(w.shape)


def dequantize_blocks(codes: torch.Tensor, factors: torch.Tensor, fmt: str) -> torch.Tensor:
    return (_blocks(e2m1_values(codes), fmt) * factors[..., None]).reshape(codes.shape)


@dataclass
class FP4Tensor:
    """A weight in an FP4 format: e2m1 codes [out, in] (one a byte; `packed()` holds two), block scales
    [out, in // block] (float8_e4m3fn for NVFP4, uint8 biased e8m0 exponents for MXFP4) and NVFP4's fp32 global
    scale. `zeros`, `w_bit` and `group_size` answer as the integer QTensor's do (symmetric, 4 bits, the block)."""

    q: torch.Tensor
    scales: torch.Tensor
    global_scale: Optional[torch.Tensor]
    format: str

    zeros = None
    w_bit = 4

    @property
    def group_size(self) -> int:
        return FP4_FORMATS[self.format]

    def factors(self) -> torch.Tensor:
        return block_scales(self.scales, self.global_scale, self.format)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_blocks(self.q, self.factors(), self.format).to(dtype)

    def packed(self) -> torch.Tensor:
        return pack_e2m1(self.q)

    def nbytes_packed(self) -> int:
        """Bytes as stored (harness.storage_bytes): codes at 4 bits, one byte a block scale, NVFP4's fp32 global."""
        from harness.storage_bytes import quantized_weight_bytes

        return quantized_weight_bytes(self.q.numel(), self.scales.numel(), 4, False, layout=self.format)


def fp4_scales(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(block scales [out, in // block], NVFP4's global scale [1] or None) of a weight [out, in]: what the codes are
    chosen under, by RTN here and column by column by GPTQ (quant/gptq/algorithm.py)."""
    if fmt == "nvfp4":
        g = nvfp4_global_scale(w)
        return nvfp4_block_scales(w, g), g
    if fmt == "mxfp4":
        return mxfp4_scale_exponents(w), None
    raise ValueError(f"unknown FP4 format {fmt!r} ({', '.join(FP4_FORMATS)})")


def quantize_fp4(w: torch.Tensor, fmt: str) -> FP4Tensor:
    """A weight [out, in] in `fmt` (nvfp4 | mxfp4), round to nearest."""
    scales, g = fp4_scales(w, fmt)
    return FP4Tensor(quantize_blocks(w, block_scales(scales, g, fmt), fmt), scales, g, fmt)


def fake_quantize_fp4(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize then dequantize, in w's dtype."""
    return quantize_fp4(w, fmt).dequantize(w.dtype)
