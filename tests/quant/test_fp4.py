"""FP4 weight formats (quant/formats/fp4.py) against float64 references written here from the definitions: the e2m1
grid enumerated from its bits and the nearest value found by brute force (ties to the even mantissa), NVFP4's and
MXFP4's scales computed in float64 and rounded through the casts the formats document (float32, fp8 e4m3 by
tests/quant/fp8_reference.py, a power of two found by search)."""
import math

import pytest
import torch

from harness.config import ConfigError
from harness.storage_bytes import quantized_weight_bytes
from quant.formats.fp4 import (FP4Tensor, e2m1_codes, e2m1_round, e2m1_values, fake_quantize_fp4, mxfp4_scale_exponents,
                               nvfp4_block_scales, nvfp4_global_scale, pack_e2m1, quantize_fp4, unpack_e2m1)
from tests.quant.fp8_reference import fp8_round_ref


def e2m1_grid() -> torch.Tensor:
    """The 16 codes' values from the bit layout s|e1 e0|m, exponent bias 1, e = 0 subnormal (OCP MX v1.0 5.3.3)."""
    vals = []
    for code in range(16):
        s, e, m = code >> 3, (code >> 1) & 3, code & 1
        mag = (m / 2) if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)
        vals.append(-mag if s else mag)
    return torch.tensor(vals, dtype=torch.float64)


def e2m1_ref(y: torch.Tensor) -> torch.Tensor:
    """Codes by brute force over the grid: saturate at +-6, nearest value, a tie to the even mantissa, a zero keeps
    y's sign."""
    grid = e2m1_grid()
    codes = torch.arange(16)
    y = y.double().clamp(-6, 6)
    d = (y[..., None] - grid).abs()
    nearest = d == d.amin(dim=-1, keepdim=True)
    even = (codes & 1) == 0
    same_sign = (codes >> 3).bool() == torch.signbit(y)[..., None]
    key = nearest.long() * 4 + even.long() * 2 + same_sign.long()
    return key.argmax(dim=-1).to(torch.uint8)


def nvfp4_ref(w: torch.Tensor):
    """(global scale, block scales as float64, codes, dequantized) with every step in float64, rounded to float32
    where the definition computes in float32, and to fp8 e4m3 for the block scale."""
    w64 = w.double()
    amax = w64.abs().max()
    g = (448.0 * 6.0 / amax).float().double()
    blocks = w64.reshape(w.shape[0], -1, 16)
    t = (blocks.abs().amax(-1) / 6).float().double()
    s = fp8_round_ref((g * t).float().double().clamp(-448, 448), torch.float8_e4m3fn)
    s = torch.where(s == 0, torch.full_like(s, 0.125), s)
    factor = (s / g).float().double()
    codes = e2m1_ref((blocks / factor[..., None]).float())
    deq = grid_values(codes) * factor[..., None]
    return g, s, codes.reshape(w.shape), deq.reshape(w.shape)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """The largest integer k with 2^k <= a (a > 0), by search from log2's estimate."""
    k = torch.floor(torch.log2(a))
    k = k - (torch.exp2(k) > a).double()
    return k + (torch.exp2(k + 1) <= a).double()


def mxfp4_ref(w: torch.Tensor):
    """(shared exponents e, codes, dequantized): e = floor(log2 amax) - 2 clamped to [-127, 127], -127 for zeros."""
    blocks = w.double().reshape(w.shape[0], -1, 32)
    amax = blocks.abs().amax(-1)
    e = torch.where(amax > 0, floor_log2(amax.clamp_min(1e-300)) - 2, torch.full_like(amax, -127.0)).clamp(-127, 127)
    x = torch.exp2(e)
    codes = e2m1_ref(blocks / x[..., None])
    return e, codes.reshape(w.shape), (grid_values(codes) * x[..., None]).reshape(w.shape)


def grid_values(codes):
    return e2m1_grid()[codes.long()]


def half_step(y: torch.Tensor) -> torch.Tensor:
    """Half the e2m1 grid's spacing around |y| <= 6: 0.25 below 2, 0.5 below 4, 1 up to 6."""
    a = y.abs()
    return torch.where(a <= 2, 0.25, torch.where(a <= 4, 0.5, 1.0)).double()


def hard_weights(out=16, inn=256, seed=0) -> torch.Tensor:
    """Random rows with outliers, an all-zero block, all-equal blocks, negative zeros, tiny blocks and a row of
    widely scaled blocks."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) * torch.rand(out, 1, generator=g)
    w[0, 5] = 40.0  # an outlier: the tensor's amax
    w[1, 100] = -25.0
    w[2, :32] = 0.0
    w[3, :32] = 0.37  # all equal
    w[3, 32:64] = -1.75
    w[4, :32] = -0.0
    w[4, 40] = -0.0
    w[5, :32] *= 1e-6  # small against the tensor's amax: NVFP4's fp8 scale near its subnormals
    w[6] = w[6] * torch.logspace(-4, 1, inn)  # 1e-4 .. 10, below the outlier
    w[7, :32] = torch.tensor([1.75, 1.9, -1.99, 0.1] * 8)  # amax mantissa >= 1.75: past 6 under the MX floor
    return w


def test_e2m1_grid_is_the_sixteen_values():
    assert torch.equal(e2m1_values(torch.arange(16, dtype=torch.uint8)).double(), e2m1_grid())
    assert sorted(set(e2m1_grid().abs().tolist())) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert torch.signbit(e2m1_values(torch.tensor([8], dtype=torch.uint8))).item()  # code 8 is -0


def test_e2m1_rounding_matches_brute_force_ties_to_even_and_saturates():
    grid = e2m1_grid()
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float64)
    special = torch.cat([grid, mids, -mids, mids + 1e-6, mids - 1e-6, -(mids + 1e-6),
                         torch.tensor([6.0001, 7.0, 100.0, -8.0, 1e30, float("inf"), -float("inf"), -0.0, 0.0,
                                       -0.1, -1e-30, 1e-45])])
    y = torch.cat([special, torch.randn(4000, dtype=torch.float64) * 4]).float()
    assert torch.equal(e2m1_codes(y), e2m1_ref(y))
    # the ties by hand: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    assert e2m1_round(mids.float()).tolist() == [0, 1, 1, 2, 2, 4, 4]
    assert e2m1_codes(torch.tensor([-0.0, -0.1, 0.0])).tolist() == [8, 8, 0]
    assert e2m1_round(torch.tensor([7.0, -1e9])).tolist() == [6, -6]
    assert torch.equal(e2m1_codes(y.half()), e2m1_ref(y.half()))  # in fp16 too


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nvfp4_matches_float64_reference(dtype):
    w = hard_weights().to(dtype)
    g, s, codes, deq = nvfp4_ref(w)
    qt = quantize_fp4(w, "nvfp4")
    assert qt.global_scale.dtype == torch.float32 and qt.global_scale.shape == (1,)
    assert qt.global_scale.item() == g.item() == pytest.approx(448 * 6 / 40)
    assert qt.scales.dtype == torch.float8_e4m3fn and qt.scales.shape == (16, 16)
    assert torch.equal(qt.scales.double(), s)
    assert torch.equal(qt.q, codes)
    assert torch.equal(qt.dequantize(torch.float64), deq.float().double())
    assert torch.equal(fake_quantize_fp4(w, "nvfp4"), deq.to(dtype))
    assert qt.scales[2, :2].float().tolist() == [0.125, 0.125] and (qt.q[2, :32] == 0).all()  # zero block
    assert (qt.q[4, :32] == 8).all() and torch.signbit(qt.dequantize()[4, :32]).all()  # -0 stays -0


def test_nvfp4_error_is_within_half_a_grid_step_of_the_scale():
    w = hard_weights(seed=1)
    qt = quantize_fp4(w, "nvfp4")
    f = qt.factors().double().repeat_interleave(16, dim=1)
    y = w.double() / f
    err = (qt.dequantize(torch.float64) - w.double()).abs()
    inside = y.abs() <= 6
    slack = 1e-6 * f  # w_hat = value * factor is rounded to float32
    assert (err[inside] <= half_step(y[inside]) * f[inside] + slack[inside]).all()
    # fp8 rounds the block scale by at most half its 3-bit mantissa's ulp: a block's max lands within 6 * (1 + 1/16)
    assert y.abs().max() <= 6 * (1 + 1 / 16)
    assert (err[~inside] <= (y[~inside].abs() - 6) * f[~inside] + slack[~inside]).all()


def test_nvfp4_all_zero_tensor_stays_finite():
    w = torch.zeros(4, 32)
    qt = quantize_fp4(w, "nvfp4")
    assert torch.isfinite(qt.global_scale).all() and torch.equal(qt.dequantize(), w)
    assert nvfp4_block_scales(w, nvfp4_global_scale(w)).float().eq(0.125).all()


def test_mxfp4_matches_float64_reference():
    w = hard_weights(seed=2)
    w[8, :32] = 1e-39  # a subnormal block: floor(log2) - 2 = -132, clamped to e8m0's -127
    w[9, :32] = torch.linspace(-2.0**-120, 2.0**-120, 32)
    e, codes, deq = mxfp4_ref(w)
    qt = quantize_fp4(w, "mxfp4")
    assert qt.global_scale is None and qt.scales.dtype == torch.uint8 and qt.scales.shape == (16, 8)
    assert torch.equal(qt.scales.double() - 127, e)
    assert qt.scales[2, 0] == 0 and qt.scales[8, 0] == 0  # zero block, clamped block: e8m0 code 0 = 2^-127
    assert torch.equal(qt.q, codes)
    assert torch.equal(qt.dequantize(torch.float64), deq)
    # the spec's floor: amax 1.99 -> X = 2^(0 - 2) = 0.25, so 1.9 / 0.25 = 7.6 saturates to 6 -> 1.5
    assert qt.scales[7, 0].item() - 127 == -2 and qt.dequantize()[7, 1].item() == 1.5


def test_mxfp4_error_within_half_a_step_and_saturation_below_two_scales():
    w = hard_weights(seed=3)
    qt = quantize_fp4(w, "mxfp4")
    x = qt.factors().double().repeat_interleave(32, dim=1)
    assert torch.equal(torch.log2(x), torch.round(torch.log2(x)))  # powers of two
    y = w.double() / x
    err = (qt.dequantize(torch.float64) - w.double()).abs()
    inside = y.abs() <= 6
    assert (err[inside] <= half_step(y[inside]) * x[inside]).all()
    assert y.abs().max() < 8 and (err[~inside] < 2 * x[~inside]).all()  # amax / 2^floor(log2 amax) < 2


def test_mxfp4_scale_exponents_by_hand():
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 40] = 6.0, 0.75  # floor(log2 6) = 2 -> e = 0; floor(log2 0.75) = -1 -> e = -3
    assert (mxfp4_scale_exponents(w).long() - 127).tolist() == [[0, -3]]
    qt = quantize_fp4(w, "mxfp4")
    assert qt.dequantize()[0, 0] == 6.0 and qt.dequantize()[0, 40] == 0.75


def test_pack_unpack_round_trip_low_nibble_first():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_e2m1(packed), codes)
    assert pack_e2m1(torch.tensor([[1, 15]], dtype=torch.uint8)).item() == 0xF1  # 0.5 low, -6 high
    qt = quantize_fp4(hard_weights(), "nvfp4")
    back = FP4Tensor(unpack_e2m1(qt.packed()), qt.scales, qt.global_scale, "nvfp4")
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_bytes_by_hand():
    n = 128 * 576
    # NVFP4: 4 bits a weight, one fp8 byte per 16, one fp32 per tensor; MXFP4: 4 bits, one e8m0 byte per 32
    assert quantize_fp4(torch.randn(128, 576), "nvfp4").nbytes_packed() == n // 2 + n // 16 + 4 == 41476
    assert quantize_fp4(torch.randn(128, 576), "mxfp4").nbytes_packed() == n // 2 + n // 32 == 39168
    assert quantized_weight_bytes(n, n // 16, 4, False, layout="nvfp4") * 8 / n == pytest.approx(4.5 + 32 / n)
    assert math.isclose(quantized_weight_bytes(n, n // 32, 4, False, layout="mxfp4") * 8 / n, 4.25)


def test_a_block_that_does_not_divide_in_features_is_named():
    with pytest.raises(ConfigError, match=r"quant.format=mxfp4 takes blocks of 32 along in_features, which 48"):
        quantize_fp4(torch.randn(4, 48), "mxfp4")
