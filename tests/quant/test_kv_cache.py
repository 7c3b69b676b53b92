"""KV-cache quantization (LMDeploy quant_policy 8 / 4): the harness against a plain-torch transcription of LMDeploy's
Triton kernels (bit for bit, fp16 and bf16), the formula against a float64 recomputation, the round-trip bound, the
stored bytes, and the cache inside the real embedded model (perplexity, greedy generation)."""
from __future__ import annotations

import math
import operator

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from eval.forward import cache_kwargs, forward
from quant.kv_cache import (
    KVCodes,
    QuantizedKVCache,
    check_kv_supported,
    kv_bytes_per_token,
    kv_dequantize,
    kv_dequantize_decode,
    kv_dequantize_prefill,
    kv_quant_params,
    kv_quantize,
    unpack_int4_halves,
)

UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
TINY = {torch.float16: 2.0**-14, torch.bfloat16: 2.0**-126, torch.float32: 2.0**-126}  # smallest normal


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
    return unpack_int4_halves(kv.codes) if kv.bits == 4 else kv.codes


def test_check_kv_supported():
    for bits in (16, 8, 4):
        check_kv_supported(bits)
    with pytest.raises(ValueError, match=r"kv\.bits=3.*\{16, 8, 4\}"):
        check_kv_supported(3)
    with pytest.raises(ValueError, match=r"kv\.bits"):
        QuantizedKVCache(LlamaConfig(num_hidden_layers=1), bits=16)


# ---- LMDeploy's kernels, transcribed from the Triton source (lmdeploy/pytorch/kernels/cuda/,
# InternLM/lmdeploy@1263d5cd)
# Written independently of quant/kv_cache.py: every Triton operation is computed in float64 and rounded to the type
# Triton gives its result (triton/language/semantic.py `computation_type_impl`); float64 holds every product and
# difference of these operands, and f64 -> f32 -> f16/bf16 is one correct rounding for a single such operation.
# Division is IEEE (Triton's fp32 `/` is the approximate div.full.f32: the GPU check measures that difference).

def _tl_type(a: torch.Tensor, b, div: bool) -> torch.dtype:
    """Result type of `a op b` in Triton; b may be a Python scalar (which never widens a float tensor)."""
    if not isinstance(b, torch.Tensor):
        return torch.float32 if div and a.dtype in (torch.float16, torch.bfloat16) else a.dtype
    types = {a.dtype, b.dtype}
    if torch.float32 in types:
        return torch.float32
    if torch.float16 in types:
        return torch.float32 if div else torch.float16
    if types == {torch.bfloat16}:
        return torch.float32 if div else torch.bfloat16
    if torch.bfloat16 in types:
        return torch.float32
    return a.dtype  # integer op integer (nibble shifts and masks)


def _tl(op, a, b, div=False):
    t = _tl_type(a, b, div)
    b64 = b.to(torch.float64) if isinstance(b, torch.Tensor) else b
    return op(a.to(torch.float64), b64).to(t)


def _tl_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """`.to(tl.uint8)` of fp32: round toward zero; NaN converts to 0 on the GPU (PTX cvt.rzi)."""
    finite = torch.isfinite(x)
    assert ((x[finite] >= 0) & (x[finite] < 256)).all()
    return torch.where(finite, x.to(torch.float64).trunc(), 0).to(torch.uint8)


def lmdeploy_quant_int8(val: torch.Tensor):
    """fill_kv_cache.py `_quant_int8(val)`, val [rows, head_dim] in the model dtype."""
    val_min = val.float().amin(1)  # tl.min / tl.max widen fp16/bf16 to fp32 (triton/language/standard.py)
    val_max = val.float().amax(1)
    scales = _tl(operator.truediv, _tl(operator.sub, val_max, val_min), 255, div=True)
    zeros = _tl(operator.truediv, -val_min, scales, div=True)
    q = _tl(operator.add, _tl(operator.add, _tl(operator.truediv, val, scales[:, None], div=True), zeros[:, None]), 0.5)
    return _tl_to_uint8(q), scales, zeros


def lmdeploy_quant_int4(val1: torch.Tensor, val2: torch.Tensor):
    """fill_kv_cache.py `_quant_int4(val1, val2)`: the two halves of the head, low nibble from the first."""
    val1, val2 = val1.to(torch.float32), val2.to(torch.float32)
    val_min = torch.minimum(val1, val2).amin(1)
    val_max = torch.maximum(val1, val2).amax(1)
    scales = _tl(operator.truediv, _tl(operator.sub, val_max, val_min), 15, div=True)
    zeros = _tl(operator.truediv, -val_min, scales, div=True)

    def q(v):
        return _tl_to_uint8(_tl(operator.add, _tl(operator.add, _tl(operator.truediv, v, scales[:, None], div=True),
                                                  zeros[:, None]), 0.5))

    return q(val1) + q(val2) * 16, scales, zeros


def lmdeploy_fill(x: torch.Tensor, bits: int):
    """`_fill_page_quant_int8/int4` on x [rows, head_dim]: stored codes, and scale/zero stored into the model-dtype
    `scales_zeros` cache (tl.store casts, round to nearest even)."""
    if bits == 8:
        codes, s, z = lmdeploy_quant_int8(x)
    else:
        half = x.shape[1] // 2
        codes, s, z = lmdeploy_quant_int4(x[:, :half], x[:, half:])
    return codes, s.to(x.dtype), z.to(x.dtype)


def _lmdeploy_codes(codes: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """The codes per output position d: int4 reads byte d % (D/2), shifted by (d // (D/2)) % 2 * 4 (`_dequant_int4`)."""
    if bits == 8:
        return codes
    offs = torch.arange(head_dim)
    val = codes[:, offs % (head_dim // 2)]
    shift = ((offs // (head_dim // 2)) % 2 * 4).to(torch.uint8)
    return (val >> shift) & 0xF


def lmdeploy_flatten(codes, s, z, bits, head_dim):
    """flatten_kv_cache.py `_flatten_kv_cache_quant`: ksz = ks * kz; kq = (kc * ks - ksz).to(out dtype). In fp16 the
    compiled kernel evaluates `kc * ks - ksz` as one FMA (measured on the GPU: results/gpu/kv_lmdeploy_check.json,
    prefill_fused 100% bit-identical): the exact value, rounded once to fp16."""
    kc = _lmdeploy_codes(codes, bits, head_dim)
    ksz = _tl(operator.mul, s, z)
    if s.dtype == torch.float16:
        exact = kc.double() * s[:, None].double() - ksz[:, None].double()  # exact in float64
        return _fp16_round_once(exact)
    return _tl(operator.sub, _tl(operator.mul, kc, s[:, None]), ksz[:, None]).to(s.dtype)


def _fp16_round_once(x: torch.Tensor) -> torch.Tensor:
    """float64 -> fp16, rounded once to nearest-even, written independently of the harness: the two fp16 neighbours
    of x from nextafter, the nearer one (ties: the even significand)."""
    lo = x.to(torch.float32).to(torch.float16)  # may be off by one ulp after double rounding: fix below
    down = torch.where(lo.double() > x, torch.nextafter(lo, torch.tensor(-math.inf, dtype=torch.float16)), lo)
    up = torch.nextafter(down, torch.tensor(math.inf, dtype=torch.float16))
    dd, du = (x - down.double()).abs(), (up.double() - x).abs()
    even_up = (up.view(torch.int16) & 1) == 0
    pick_up = (du < dd) | ((du == dd) & even_up)
    return torch.where(torch.isfinite(x), torch.where(pick_up, up, down), x.to(torch.float16))


def lmdeploy_paged_decode(codes, s, z, bits, head_dim):
    """pagedattention.py `_fwd_grouped_split_quant_kernel`: k = ((k - kz) * ks).to(q.dtype)."""
    kc = _lmdeploy_codes(codes, bits, head_dim)
    return _tl(operator.mul, _tl(operator.sub, kc, z[:, None]), s[:, None]).to(s.dtype)


def _kv_with_outliers_and_constant_heads(dtype, head_dim, seed=0):
    """[batch 2, kv_heads 4, seq 300, head_dim]: normal values with per-head offsets, 3 outlier channels x20, and
    constant heads at three tokens (positive, negative, all zero)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 300, head_dim, generator=g) + torch.randn(2, 4, 1, 1, generator=g)
    x[..., torch.randperm(head_dim, generator=g)[:3]] *= 20
    x[0, 1, 7] = 0.37
    x[1, 2, 100] = -2.5
    x[1, 3, 299] = 0.0
    return x.to(dtype)


def _assert_bitwise(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == torch.uint8:
        assert torch.equal(a, b), f"{(a != b).sum().item()} codes differ"
        return
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b)), "NaN at different places"
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    diff = (a.view(bits) != b.view(bits)) & ~nan
    assert not diff.any(), f"{diff.sum().item()} of {a.numel()} values differ, e.g. {a[diff][:3]} vs {b[diff][:3]}"


@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_bit_for_bit_against_lmdeploy_kernels(dtype, bits, head_dim):
    """Codes (int4: LMDeploy's nibble order), scale/zero in the model dtype, and both dequantization paths equal a
    transcription of LMDeploy's kernels bit for bit, outlier channels and constant heads (NaN) included."""
    x = _kv_with_outliers_and_constant_heads(dtype, head_dim)
    kv = kv_quantize(x, bits)
    rows = x.reshape(-1, head_dim)
    codes, s, z = lmdeploy_fill(rows, bits)
    _assert_bitwise(kv.codes.reshape(codes.shape), codes)
    _assert_bitwise(kv.scales.reshape(-1), s)
    _assert_bitwise(kv.zeros.reshape(-1), z)
    prefill, decode = kv_dequantize_prefill(kv), kv_dequantize_decode(kv)
    _assert_bitwise(prefill.reshape(rows.shape), lmdeploy_flatten(codes, s, z, bits, head_dim))
    _assert_bitwise(decode.reshape(rows.shape), lmdeploy_paged_decode(codes, s, z, bits, head_dim))
    _assert_bitwise(kv_dequantize(kv, path="decode"), decode)
    _assert_bitwise(kv_dequantize(kv), prefill)
    # not vacuous: the constant heads are NaN rows (scale 0), the rest finite; the two paths round differently
    nan_rows = torch.isnan(prefill).all(-1)
    assert nan_rows.sum() == 3 and not torch.isnan(prefill[~nan_rows]).any()
    assert (kv.scales[nan_rows] == 0).all() and not torch.isfinite(kv.zeros[nan_rows]).any()
    assert (prefill[~nan_rows] != decode[~nan_rows]).any()
    if bits == 4:  # byte j = q[j] | q[j + D/2] << 4: the high nibble holds the second half of the head
        q = _codes(kv)
        half = head_dim // 2
        assert torch.equal(kv.codes >> 4, q[..., half:]) and torch.equal(kv.codes & 0xF, q[..., :half])


def test_dequant_rounding_per_dtype():
    """One hand-checked value per path and dtype: q = 200, scale 0.01, zero 37.3 (stored in the model dtype)."""
    for dtype, op in ((torch.float16, torch.float16), (torch.bfloat16, torch.float32)):
        s, z = torch.tensor([[[0.01]]], dtype=dtype), torch.tensor([[[37.3]]], dtype=dtype)
        kv = KVCodes(torch.full((1, 1, 1, 1), 200, dtype=torch.uint8), s, z, 8)
        s64, z64 = s.double().item(), z.double().item()
        sz = torch.tensor(s64 * z64).to(dtype).double()
        # fp16: one FMA, rounded once (exact in float64, then a correctly rounded cast via nextafter neighbours)
        prefill = (_fp16_round_once(torch.tensor(200 * s64 - sz.item(), dtype=torch.float64)) if dtype == torch.float16
                   else (torch.tensor(200 * s64).to(op).double() - sz).to(dtype))
        decode = (torch.tensor(200 - z64).to(op).double() * s64).to(op).to(dtype)
        assert kv_dequantize_prefill(kv).item() == prefill.item()
        assert kv_dequantize_decode(kv).item() == decode.item()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_codes_follow_lmdeploy_formula(bits, dtype):
    """scale = (max-min)/(2^b-1), zero = -min/scale (unrounded), q = floor(x/scale + zero + 0.5), in float64."""
    x = (torch.randn(2, 3, 50, 64, generator=torch.Generator().manual_seed(0)) * 3 + 0.5).to(dtype)
    kv = kv_quantize(x, bits)
    x64 = x.double()
    mn, mx = x64.amin(-1), x64.amax(-1)
    s = (mx - mn) / (2**bits - 1)
    z = -mn / s
    q_ref = torch.floor(x64 / s[..., None] + z[..., None] + 0.5)
    q = _codes(kv).double()
    assert kv.codes.dtype == torch.uint8 and kv.codes.shape[-1] == 64 * bits // 8
    assert kv.scales.dtype == kv.zeros.dtype == dtype  # LMDeploy stores scale/zero in the model dtype
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    # fp32 vs float64 can only move a value sitting on a rounding boundary, by one code
    diff = (q - q_ref).abs()
    assert diff.max() <= 1 and (diff > 0).double().mean() < 1e-3
    u = UNIT_ROUNDOFF[dtype]
    torch.testing.assert_close(kv.scales.double(), s, rtol=max(u, 1e-6), atol=0)
    torch.testing.assert_close(kv.zeros.double(), z, rtol=max(u, 1e-6), atol=1e-6)
    # the fp32 params are the ones the codes were computed with
    s32, z32 = kv_quant_params(x, bits)
    torch.testing.assert_close(s32.double(), s, rtol=1e-6, atol=0)


def _round_trip_check(x: torch.Tensor, bits: int, path: str) -> float:
    """Asserts |x_hat - x| <= the bound below, per element, in float64; returns max |x_hat - x| / scale.

    With s, z the fp32 scale/zero the codes used, S, Z the stored ones (model dtype, unit roundoff u) and
    v = x/s + z:  S(q - Z) - x = S(q - v) + (x/s)(S - s) + S(z - Z), so with |q - v| <= 1/2 (+ fp32 rounding of v,
    < 1e-3), |S - s| <= u s, |z - Z| <= u |z|:
      |S(q - Z) - x| <= S (1/2 + 1e-3) + u |x| + u S |z| (1 + u);
    each dequant path then rounds at most three times in the model dtype or fp32 (q*S or q - Z, S*Z, the result):
      + u S (q + |Z|) (1 + u) + u |x_hat|.
    The first term is the analytic scale/2; the rest is storing scale and zero and dequantizing in the model dtype."""
    kv = kv_quantize(x, bits)
    x_hat = kv_dequantize(kv, path=path).double()
    err = (x_hat - x.double()).abs()
    u = max(UNIT_ROUNDOFF[x.dtype], 2.0**-24)
    S, Z, q = kv.scales.double()[..., None], kv.zeros.double()[..., None].abs(), _codes(kv).double()
    assert S.min() >= TINY[x.dtype]
    tol = (S * (0.5 + 1e-3) + u * x.double().abs() + 2 * u * S * Z * (1 + u) + u * S * q * (1 + u)
           + u * x_hat.abs())
    assert (err <= tol).all(), f"worst excess {(err - tol).max().item():.3g}"
    ratio = (err / S).max().item()
    assert ratio > 0.45  # the bound is met with little room: not vacuous
    return ratio


@pytest.mark.parametrize("path", ["prefill", "decode"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_round_trip_random(bits, dtype, path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=g) * (torch.rand(2, 3, 64, 1, generator=g) * 4 + 0.25) - 1
    _round_trip_check(x.to(dtype), bits, path)


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_real_kv(real_kv, bits):
    for keys, values in real_kv[::5]:
        for dtype in (torch.float32, torch.bfloat16):
            for path in ("prefill", "decode"):
                _round_trip_check(keys.to(dtype), bits, path)
                _round_trip_check(values.to(dtype), bits, path)


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
        # scale and zero in the model dtype: this test model is fp32 (4 bytes each) ...
        assert cache.nbytes() == 40 * kv_bytes_per_token(L, H, D, bits, dtype_bytes=4)
        # ... a bf16 / fp16 model (what LMDeploy serves, and the default count) stores 2 bytes each
        for dtype in (torch.bfloat16, torch.float16):
            small = QuantizedKVCache(LlamaConfig(num_hidden_layers=1), bits=bits)
            small.update(*torch.randn(2, 1, H, 40, D).to(dtype), 0)
            assert small.nbytes() == 40 * kv_bytes_per_token(1, H, D, bits)


class _RecordingCache(QuantizedKVCache):
    """Keeps what each update was given and what it returned to attention."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.log = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.log.append((layer_idx, key_states.clone(), value_states.clone(), k, v))
        return k, v


def _quantize_all(states, bits):
    kvs = [kv_quantize(x, bits) for x in states]
    return KVCodes(*(torch.cat([kv[i] for kv in kvs], dim=2) for i in range(3)), bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_attention_reads_quantized_kv(model, milton_ids, bits):
    """Prefill + two decode steps: every update returns exactly the dequantized codes of everything written to that
    layer so far, in the incoming dtype, through the engine's kernel for that step (dequant="auto": the prefill
    kernel for the 16-token forward, the paged-attention decode kernel for the one-token steps)."""
    cache = _RecordingCache(model.config, bits=bits)
    ids = milton_ids[None, :18]
    with torch.no_grad():
        forward(model, ids[:, :16], cache)
        forward(model, ids[:, 16:17], cache)
        forward(model, ids[:, 17:18], cache)
    assert cache.get_seq_length() == 18 and cache.constant_heads == 0
    written: dict[int, list] = {}
    for layer_idx, k_in, v_in, k_out, v_out in cache.log:
        written.setdefault(layer_idx, []).append((k_in, v_in))
        path = "prefill" if k_in.shape[2] > 1 else "decode"
        k_ref = kv_dequantize(_quantize_all([k for k, _ in written[layer_idx]], bits), k_in.dtype, path)
        v_ref = kv_dequantize(_quantize_all([v for _, v in written[layer_idx]], bits), v_in.dtype, path)
        assert k_out.dtype == k_in.dtype and torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
        assert not torch.equal(k_out[:, :, -k_in.shape[2]:], k_in)  # really quantized
    assert len(written) == model.config.num_hidden_layers and all(len(w) == 3 for w in written.values())


def test_constant_head_is_nan_and_counted():
    """As the engine: a (token, head) row with max == min dequantizes to NaN (scale 0, zero ±inf/NaN); the cache
    counts it. dequant must name a kernel."""
    k = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    v = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    k[0, 1, 3] = 1.5
    v[0, 0, 0] = 0.0
    cache = QuantizedKVCache(LlamaConfig(num_hidden_layers=1), bits=8)
    k_hat, v_hat = cache.update(k, v, 0)
    assert cache.constant_heads == 2
    assert torch.isnan(k_hat[0, 1, 3]).all() and torch.isnan(v_hat[0, 0, 0]).all()
    assert torch.isnan(k_hat).sum() == 8 and torch.isnan(v_hat).sum() == 8
    cache.layers[0].reset()
    assert cache.constant_heads == 0
    with pytest.raises(ValueError, match="dequant"):
        QuantizedKVCache(LlamaConfig(num_hidden_layers=1), bits=8, dequant="fast")


def test_cache_batch_ops_are_lossless():
    """Per-token scales: crop and beam reordering act on the stored codes exactly."""
    cfg = LlamaConfig(num_hidden_layers=1)
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(3, 2, 10, 8, generator=g), torch.randn(3, 2, 10, 8, generator=g)
    cache = QuantizedKVCache(cfg, bits=4, dequant="prefill")  # one kernel's rounding for every update
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


def test_a_runs_caches_count_constant_rows_into_the_record():
    """experiments.stages.KVCaches: every cache it makes adds its constant (token, head) rows to one tally, which
    the record carries (metrics.kv_cache), also after the caches themselves are gone."""
    from experiments.stages import KVCaches

    cfg = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16)
    caches = KVCaches(cfg, 8)
    k = torch.randn(1, 2, 5, 16)
    k[0, 1, 3] = 0.25  # one constant row in K of layer 0
    for _ in range(2):  # two caches, as two forwards would make
        c = caches()
        c.update(k, torch.randn(1, 2, 5, 16), 0)
        c.update(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), 1)
        del c
    assert caches.summary() == {"bits": 8, "caches": 2, "constant_heads": 2}


@torch.no_grad()
@pytest.mark.parametrize("bits,fmt", [(8, "int"), (4, "int"), (8, "fp8_e4m3")])
def test_sliding_window_layers_keep_their_window_and_decode_as_they_prefill(bits, fmt):
    """Gemma-3's local layers (window 4 here, every other layer): the quantized cache keeps only the last window - 1
    tokens of those layers, and a token decoded step by step past the window gets the logits the one-pass prefill
    gives it (both read the same quantized K/V: one dequantization path), close to the unquantized model's."""
    from eval.forward import forward
    from tests.quant.test_awq import _tiny_gemma3

    model = _tiny_gemma3().float()
    ids = torch.randint(0, 128, (2, 14), generator=torch.Generator().manual_seed(3))
    full = forward(model, ids, QuantizedKVCache(model.config, bits=bits, fmt=fmt, dequant="prefill"))
    cache = QuantizedKVCache(model.config, bits=bits, fmt=fmt, dequant="prefill")
    assert [type(layer).__name__.startswith("Sliding") for layer in cache.layers] == [True, False] * 2
    steps = [forward(model, ids[:, :6], cache).logits]
    for t in range(6, 14):
        steps.append(forward(model, ids[:, t : t + 1], cache).logits)
    stepwise = torch.cat(steps, dim=1)
    torch.testing.assert_close(stepwise, full.logits, rtol=1e-4, atol=1e-4)
    window = model.config.sliding_window
    assert cache.layers[0].get_seq_length() == 14 and cache.layers[1].get_seq_length() == 14
    stored = cache.layers[0].k if fmt != "int" else cache.layers[0].k.codes
    assert stored.shape[2] == window - 1  # the sliding layer evicted the rest
    plain = model(ids).logits
    err = (full.logits - plain).abs().max().item()
    assert 0 < err < {8: 0.05, 4: 0.5}[bits] * plain.abs().max().item()  # quantized, yet the same model
