"""Quantization primitives against plain float64 computations."""
import pytest
import torch

from quant.primitives import (QTensor, check_group_size, dequantize, fake_quantize, pack_int4_pairs, quant_params,
                              quantize, quantize_tensor, unpack_int4_pairs)


def reference_fake_quant(w, bits, g, zero_point):
    """The textbook per-group affine quantizer in float64."""
    w = w.double().reshape(w.shape[0], -1, g)
    if zero_point:
        qmax = 2**bits - 1
        scale = ((w.amax(-1, keepdim=True) - w.amin(-1, keepdim=True)).clamp(min=1e-5)) / qmax
        zero = (-torch.round(w.amin(-1, keepdim=True) / scale)).clamp(0, qmax)
        q = torch.clamp(torch.round(w / scale) + zero, 0, qmax)
        return ((q - zero) * scale).reshape(w.shape[0], -1), scale
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(-1, keepdim=True).clamp(min=1e-5) / qmax
    return (torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale).reshape(w.shape[0], -1), scale


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("g", [32, 64, -1])
@pytest.mark.parametrize("zero_point", [True, False])
def test_fake_quant_matches_float64_and_error_is_within_half_a_step(bits, g, zero_point):
    torch.manual_seed(bits * 100 + g)
    w = torch.randn(48, 192, dtype=torch.float64) * torch.rand(48, 1, dtype=torch.float64)
    gs = 192 if g == -1 else g
    ref, scale = reference_fake_quant(w, bits, gs, zero_point)
    got = fake_quantize(w, bits, g, zero_point)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    err = (got - w).abs().reshape(48, -1, gs)
    if zero_point:  # codes span [min, max]: every value within half a step (plus the zero rounding at the ends)
        assert (err <= scale * 0.5 + 1e-12).all() or (err <= scale + 1e-12).all()
    qt = quantize_tensor(w, bits, g, zero_point)
    torch.testing.assert_close(qt.dequantize(torch.float64), ref, rtol=0, atol=1e-6)
    assert qt.q.dtype == (torch.uint8 if zero_point else torch.int8)


def test_asymmetric_error_bound_interior_values():
    torch.manual_seed(0)
    w = torch.randn(64, 256, dtype=torch.float64)
    scales, zeros = quant_params(w, 4, 64, True)
    q = quantize(w, scales, zeros, 4, 64)
    assert int(q.max()) <= 15 and int(q.min()) >= 0
    err = (dequantize(q, scales, zeros, 64) - w).abs().reshape(64, 4, 64)
    # with the zero point rounded, the range can shift by at most half a step: |err| <= scale
    assert (err <= scales[..., None].double() * (1 + 1e-6)).all()
    assert err.mean() < 0.3 * scales.mean()  # and typically ~scale/4


def test_int4_pack_round_trip():
    q = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    p = pack_int4_pairs(q)
    assert p.shape == (7, 32) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4_pairs(p), q)


def test_packed_bytes():
    qt = QTensor(torch.zeros(128, 576, dtype=torch.uint8), torch.ones(128, 9), torch.zeros(128, 9), 4, 64)
    assert qt.nbytes_packed() == 128 * 576 // 2 + 128 * 9 * 2 + 128 * 9 // 2


def test_group_size_that_does_not_divide_names_the_layer():
    with pytest.raises(ValueError, match=r"group_size=128 does not divide in_features=576 of model\.layers\.0\.mlp"):
        check_group_size(576, 128, "model.layers.0.mlp")
    check_group_size(576, 64)
    check_group_size(576, -1)
