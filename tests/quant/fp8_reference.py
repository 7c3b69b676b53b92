"""A float64 reference for rounding to the OCP fp8 formats (round to nearest, ties to even; subnormals included),
written from the format definitions, not from torch: e4m3fn 3 mantissa bits, smallest normal exponent -6, max 448;
e5m2 2 mantissa bits, smallest normal exponent -14, max 57344."""
import torch

FP8_FORMATS = {torch.float8_e4m3fn: (3, -6, 448.0), torch.float8_e5m2: (2, -14, 57344.0)}


def fp8_round_ref(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y (already within +-max) rounded to the fp8 grid, as float64."""
    mant, emin, vmax = FP8_FORMATS[dtype]
    y = y.double()
    a = y.abs()
    e = torch.floor(torch.log2(a.clamp_min(2.0 ** (emin - mant - 4)))).clamp_min(emin)
    ulp = torch.exp2(e - mant)
    r = torch.round(a / ulp) * ulp  # torch.round: ties to even, exact in float64 here
    return torch.copysign(r.clamp_max(vmax), y)
