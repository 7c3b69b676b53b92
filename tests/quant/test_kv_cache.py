"""KV-cache quantization (LMDeploy quant_policy 8 / 4): the formula against a float64 recomputation, the round-trip
bound, the stored bytes, and the cache inside the real embedded model (perplexity, greedy generation)."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from eval.forward import cache_kwargs, forward
from quant.kv_cache import (
    QuantizedKVCache,
    check_kv_supported,
    kv_bytes_per_token,
    kv_dequantize,
    kv_quant_params,
    kv_quantize,
)
from quant.primitives import unpack_int4_pairs

U16 = 2.0**-11  # unit roundoff of fp16 (10 stored mantissa bits)
FP16_TINY = 2.0**-14  # smallest normal fp16: below it the relative bound on the stored scale does not hold


@pytest.fixture(scope="module")
def model(smollm2_fp32_shared):
    # fp32 weights, so the only K/V rounding in the comparisons is the cache's
    return smollm2_fp32_shared


@pytest.fixture(scope="module")
def real_kv(model, milton_ids):
    """K and V of every layer for one 128-token Milton window, written by an ordinary (fp32) cache."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        forward(model, milton_ids[None, :128], cache)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _codes(kv):
    return unpack_int4_pairs(kv.codes) if kv.bits == 4 else kv.codes


def test_check_kv_supported():
    for bits in (16, 8, 4):
        check_kv_supported(bits)
    with pytest.raises(ValueError, match=r"kv\.bits=3.*\{16, 8, 4\}"):
        check_kv_supported(3)
    with pytest.raises(ValueError, match=r"kv\.bits"):
        QuantizedKVCache(LlamaConfig(num_hidden_layers=1), bits=16)


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_follow_lmdeploy_formula(bits):
    """scale = (max-min)/(2^b-1), zero = -min/scale (unrounded), q = floor(x/scale + zero + 0.5), in float64."""
    x = torch.randn(2, 3, 50, 64, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    kv = kv_quantize(x, bits)
    x64 = x.double()
    mn, mx = x64.amin(-1), x64.amax(-1)
    s = (mx - mn) / (2**bits - 1)
    z = -mn / s
    q_ref = torch.floor(x64 / s[..., None] + z[..., None] + 0.5)
    q = _codes(kv).double()
    assert kv.codes.dtype == torch.uint8 and kv.codes.shape[-1] == 64 * bits // 8
    assert kv.scales.dtype == kv.zeros.dtype == torch.float16
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    # fp32 vs float64 can only move a value sitting on a rounding boundary, by one code
    diff = (q - q_ref).abs()
    assert diff.max() <= 1 and (diff > 0).double().mean() < 1e-3
    torch.testing.assert_close(kv.scales.double(), s, rtol=2 * U16, atol=0)
    torch.testing.assert_close(kv.zeros.double(), z, rtol=2 * U16, atol=1e-6)
    # the fp32 params are the ones the codes were computed with
    s32, z32 = kv_quant_params(x, bits)
    torch.testing.assert_close(s32.double(), s, rtol=1e-6, atol=0)


def _round_trip_check(x: torch.Tensor, bits: int) -> float:
    """Asserts |x_hat - x| <= the bound below, per element, in float64; returns max |x_hat - x| / scale.

    With s, z the fp32 scale/zero the codes used and s16, z16 the stored fp16 ones, u = x/s + z:
      x_hat - x = (q - u) s16 + (x/s)(s16 - s) + (z - z16) s16
    |q - u| <= 1/2 (+ fp32 rounding of u <= 2^b: < 1e-3), |s16 - s| <= u16 s, |z - z16| <= u16 |z|, so
      |x_hat - x| <= s16 (1/2 + 1e-3 + u16 |z|) + u16 |x|,   plus the fp32 dequant rounding, 2^-23 (q + |z16|) s16.
    The first term is the analytic scale/2; the rest is the fp16 storage of scale and zero."""
    kv = kv_quantize(x, bits)
    err = (kv_dequantize(kv).double() - x.double()).abs()
    s16, z16 = kv.scales.double()[..., None], kv.zeros.double()[..., None].abs()
    assert s16.min() >= FP16_TINY
    tol = s16 * (0.5 + 1e-3 + U16 * z16 * (1 + U16) + 2.0**-23 * (2**bits + z16)) + U16 * x.double().abs()
    assert (err <= tol).all(), f"worst excess {(err - tol).max().item():.3g}"
    ratio = (err / s16).max().item()
    assert ratio > 0.45  # the bound is met with little room: not vacuous
    return ratio


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_random(bits):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=g) * (torch.rand(2, 3, 64, 1, generator=g) * 4 + 0.25) - 1
    _round_trip_check(x, bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_real_kv(real_kv, bits):
    for keys, values in real_kv[::5]:
        _round_trip_check(keys, bits)
        _round_trip_check(values, bits)


def test_bytes_per_token(model, milton_ids):
    c = model.config
    L, H, D = c.num_hidden_layers, c.num_key_value_heads, c.head_dim
    assert (L, H, D) == (30, 3, 64)
    fp16 = kv_bytes_per_token(L, H, D, 16)
    assert fp16 == L * 2 * H * D * 2
    assert kv_bytes_per_token(L, H, D, 8) == L * 2 * H * (D + 4)
    assert kv_bytes_per_token(L, H, D, 4) == L * 2 * H * (D // 2 + 4)
    # 68/128 and 36/128: the "0.53x" and "0.28x" of fp16, rounded to two places
    assert kv_bytes_per_token(L, H, D, 8) / fp16 == 0.53125
    assert kv_bytes_per_token(L, H, D, 4) / fp16 == 0.28125
    for bits in (8, 4):
        cache = QuantizedKVCache(c, bits=bits)
        with torch.no_grad():
            forward(model, milton_ids[None, :40], cache)
        assert cache.get_seq_length() == 40
        assert cache.nbytes() == 40 * kv_bytes_per_token(L, H, D, bits)


class _RecordingCache(QuantizedKVCache):
    """Keeps what each update was given and what it returned to attention."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.log = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.log.append((layer_idx, key_states.clone(), value_states.clone(), k, v))
        return k, v


@pytest.mark.parametrize("bits", [8, 4])
def test_attention_reads_quantized_kv(model, milton_ids, bits):
    """Prefill + two decode steps: every update returns exactly kv_dequantize(kv_quantize(.)) of everything written
    to that layer so far, in the incoming dtype."""
    cache = _RecordingCache(model.config, bits=bits)
    ids = milton_ids[None, :18]
    with torch.no_grad():
        forward(model, ids[:, :16], cache)
        forward(model, ids[:, 16:17], cache)
        forward(model, ids[:, 17:18], cache)
    assert cache.get_seq_length() == 18
    written: dict[int, list] = {}
    for layer_idx, k_in, v_in, k_out, v_out in cache.log:
        written.setdefault(layer_idx, []).append((k_in, v_in))
        k_ref = torch.cat([kv_dequantize(kv_quantize(k, bits), k.dtype) for k, _ in written[layer_idx]], dim=2)
        v_ref = torch.cat([kv_dequantize(kv_quantize(v, bits), v.dtype) for _, v in written[layer_idx]], dim=2)
        assert k_out.dtype == k_in.dtype and torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
        assert not torch.equal(k_out[:, :, -k_in.shape[2]:], k_in)  # really quantized
    assert len(written) == model.config.num_hidden_layers and all(len(w) == 3 for w in written.values())


def test_cache_batch_ops_are_lossless():
    """Per-token scales: crop and beam reordering act on the stored codes exactly."""
    cfg = LlamaConfig(num_hidden_layers=1)
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(3, 2, 10, 8, generator=g), torch.randn(3, 2, 10, 8, generator=g)
    cache = QuantizedKVCache(cfg, bits=4)
    k_hat, v_hat = cache.update(k, v, 0)
    cache.crop(-3)
    assert cache.get_seq_length() == 7
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    k2, _ = cache.update(k[:, :, :1], v[:, :, :1], 0)
    torch.testing.assert_close(k2[:, :, :7], k_hat[[2, 0, 1], :, :7], rtol=0, atol=0)


@pytest.fixture(scope="module")
def ppl(model, milton_ids):
    from eval.perplexity import window_nll
    from harness.data import eval_windows

    windows = eval_windows(milton_ids, 128, 2)
    out = {}
    for bits in (16, 8, 4):
        factory = None if bits == 16 else (lambda b=bits: QuantizedKVCache(model.config, bits=b))
        nll, _ = window_nll(model, windows, batch_size=2, cache_factory=factory, progress=False)
        out[bits] = math.exp(nll.double().mean().item())
    return out


def test_perplexity_with_quantized_kv(ppl):
    print(f"Milton 2x128 token PPL: fp32 KV {ppl[16]:.3f}, int8 {ppl[8]:.3f}, int4 {ppl[4]:.3f}")
    assert abs(ppl[8] / ppl[16] - 1) < 0.02
    assert abs(ppl[4] / ppl[16] - 1) > abs(ppl[8] / ppl[16] - 1)
    assert ppl[4] > ppl[16]


def test_greedy_generate(model, milton_ids):
    prompt = milton_ids[None, :24]
    kw = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt))
    ref = model.generate(prompt, **kw)[0, 24:]
    for bits in (8, 4):
        cache = QuantizedKVCache(model.config, bits=bits)
        out = model.generate(prompt, **cache_kwargs(model, cache), **kw)[0, 24:]
        assert out.shape == ref.shape
        assert cache.get_seq_length() == 24 + 8 - 1  # the last token is sampled, never written
        if bits == 8:
            assert torch.equal(out[:4], ref[:4]), (out.tolist(), ref.tolist())
