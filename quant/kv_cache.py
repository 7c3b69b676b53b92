"""KV-cache quantization with LMDeploy's numerics (`quant_policy` 8 / 4), and a `transformers` cache that stores only
the quantized K/V.

Reference: LMDeploy's PyTorch engine, lmdeploy/pytorch/kernels/cuda/ at InternLM/lmdeploy@1263d5cd (version.py 0.16.0,
the newest source this harness could read; the 0.18.0 wheel is what the GPU check runs,
benchmarks/kv_lmdeploy_check.py). Function names, not line numbers:

- quantize, fill_kv_cache.py `_quant_int8` / `_quant_int4`, per token and per KV head, min/max over head_dim.
  Triton's `tl.min`/`tl.max` widen fp16/bf16 to fp32, and every division involving fp16/bf16 runs in fp32, so the
  whole step is fp32 (only the inputs are in the model dtype):
      scale = (max - min) / (2^b - 1);  zero = -min / scale          (zero is a float in code units, not rounded)
      q = uint8(x / scale + zero + 0.5)                                (truncating cast; the argument is >= 0)
  Triton's fp32 `/` is the approximate `div.full.f32`; here it is IEEE, so a value on a rounding boundary can land
  one code apart (the GPU check measures how often).
- store, `_fill_page_quant_int8` / `_fill_page_quant_int4`: codes uint8; int4 byte j = q[j] | q[j + D/2] << 4 (the
  two halves of the head, `_quant_int4(val1, val2)`: `q_val1 + q_val2 * 16`); scale and zero in
  `scales_zeros[..., 0]` / `[..., 1]`, cast to the MODEL dtype (cache_engine.py `get_quant_cache_descs`:
  `dtype = model_config.dtype`), fp16 or bf16, round to nearest even. The codes were computed with the unrounded fp32
  scale/zero; dequantization reads the rounded ones (for bf16 that is most of the error: 8 mantissa bits).
- dequantize, two kernels that round differently (Triton promotes uint8 with fp16 to fp16, with bf16 to fp32):
  prefill, flatten_kv_cache.py `_flatten_kv_cache_quant`:  sz = s*z in the model dtype, then
      fp16: x = fp16(fp16(q*s) - sz);          bf16: x = bf16(fp32(q*s) - sz)
  decode, pagedattention.py `_fwd_grouped_split_quant_kernel` (`k = ((k - kz) * ks).to(q.dtype)`):
      fp16: x = fp16(fp16(q - z) * s);         bf16: x = bf16(fp32(q - z) * s)
  Both are pure functions here (`kv_dequantize_prefill`, `kv_dequantize_decode`). The engine uses the prefill one for
  every forward with more than one new token (it flattens the whole cache, history included) and the decode one for
  single-token steps; `QuantizedKVCache(dequant="auto")` does the same per update, "prefill" / "decode" force one.
  (Whether the GPU compiler fuses the prefill's fp16 `q*s - sz` into one FMA is not in the source; the GPU check
  reports both.)

A KV head that is constant at some token (max == min) gets scale 0 and zero = -min/0 = ±inf (NaN when min is 0); its
dequantized values are then 0*(±inf) = NaN, and attention over them is NaN for every query of that KV group, as in the
engine. This module reproduces that rather than substituting a scale (which would hide a difference from the deployed
engine); since a NaN head poisons every later score, the cache counts such (token, head) rows
(`QuantizedKVCache.constant_heads`; also rows whose range underflows the model dtype) so a record can report why.
None occurred in the embedded SmolLM2 (bf16) over 20 x 512 Milton tokens, int8 or int4.
A constant head's codes are 0 (NaN converts to 0 on the GPU); they are never read as numbers.

Effect on the embedded SmolLM2 (bf16, Milton, 20 x 512 tokens, token PPL; fp16 KV 94.006): int8 94.107 (+0.101; with
the former fp16 scale/zero and fp32 dequant +0.106), int4 103.031 (+9.02; formerly +9.39). Storing scale/zero in bf16
makes the int8 K/V error 1.46x (prefill) / 1.29x (decode) the former one, but int8's error is so far below what moves
PPL that the change is noise; int4's error barely changes (+0.2%), its PPL moves by the luck of the roundings.

FP8 (`quant_policy` 16 = float8_e4m3fn, 17 = float8_e5m2; messages.py `QuantPolicy.FP8` / `FP8_E5M2`): no per-token
scale or zero. cache_engine.py allocates the K/V caches in the fp8 dtype with no scale/zero cache tensors
(`get_quant_cache_descs` returns [] for fp8); nn/attention.py `Attention` holds one scalar `k_scale` / `v_scale`
buffer per layer, fixed at 1.0 ("Regular PyTorch FP8 KV cache intentionally uses fixed scalar scales of 1.0");
fill_kv_cache.py `_fill_kv_cache_fp8_scalar_kernel` stores  clamp(fp32(x) / scale, fp8 min, fp8 max)  converted to
fp8 (round to nearest even), and flatten_kv_cache.py / pagedattention.py read fp32(code) * scale back into the model
dtype. With scale 1.0 this is a saturating cast of K/V to fp8 and back; every fp8 value is exact in fp16 and bf16, so
prefill and decode read the same numbers (`kv_fp8_quantize`, `kv_fp8_dequantize`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.cache_utils import get_layer_types_and_kwargs

from harness import storage_bytes

KV_BITS = (16, 8, 4)  # 16 = unquantized; 8 / 4 = LMDeploy quant_policy 8 / 4
DEQUANT_PATHS = ("auto", "prefill", "decode")
# kv.format: "int" = the integer policies above (by kv.bits); fp8 = LMDeploy quant_policy 16 / 17 at kv.bits 8
KV_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
KV_FORMATS = ("int", *KV_FP8)
FP8_KV_SCALE = 1.0  # nn/attention.py: the scalar k_scale / v_scale of every layer


def check_kv_supported(bits: int, fmt: str = "int") -> None:
    if fmt not in KV_FORMATS:
        raise ValueError(f"kv.format={fmt!r} is not supported; allowed values: {', '.join(KV_FORMATS)}")
    if fmt != "int" and bits != 8:
        raise ValueError(f"kv.format={fmt} stores 8-bit values; set kv.bits=8 (got {bits})")
    if bits not in KV_BITS:
        raise ValueError(f"kv.bits={bits} is not supported; allowed values: {{16, 8, 4}} (8 / 4 = LMDeploy quant_policy)")


def kv_fp8_quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """`_fill_kv_cache_fp8_scalar_kernel` at scale 1.0: clamp(fp32(x) / 1.0, fp8 range) cast to fp8 (nearest even)."""
    dtype = KV_FP8[fmt]
    info = torch.finfo(dtype)
    return (x.float() / FP8_KV_SCALE).clamp(info.min, info.max).to(dtype)


def kv_fp8_dequantize(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """flatten_kv_cache.py / pagedattention.py: fp32(code) * scale, in the model dtype (exact: fp8 fits fp16/bf16)."""
    return (codes.float() * FP8_KV_SCALE).to(dtype)


def _check_quant_bits(bits: int) -> None:
    if bits not in (8, 4):
        raise ValueError(f"kv.bits={bits}: quantized KV needs 8 or 4 (16 means an ordinary, unquantized cache)")


class KVCodes(NamedTuple):
    """Quantized K or V [batch, kv_heads, seq, head_dim]: codes uint8 [..., head_dim * bits / 8] (int4: LMDeploy's
    half-split nibbles), scales and zeros [batch, kv_heads, seq] in the model dtype."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))


def pack_int4_halves(q: torch.Tensor) -> torch.Tensor:
    """LMDeploy's int4 KV layout: byte j = q[j] | q[j + D/2] << 4 (fill_kv_cache.py `_quant_int4`)."""
    half = q.shape[-1] // 2
    return q[..., :half] | (q[..., half:] << 4)


def unpack_int4_halves(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4_halves (flatten_kv_cache.py `_dequant_int4`: low nibbles first, then high)."""
    return torch.cat([packed & 0xF, packed >> 4], dim=-1)


def kv_quant_params(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scale and zero [batch, kv_heads, seq] of x [batch, kv_heads, seq, head_dim], as `_quant_int8`/`_quant_int4`
    compute them (before they are stored in the model dtype). A constant head gives scale 0, zero ±inf/NaN."""
    _check_quant_bits(bits)
    x = x.float()
    mn, mx = x.amin(dim=-1), x.amax(dim=-1)
    scales = (mx - mn) / (2**bits - 1)
    return scales, -mn / scales


def kv_codes(x: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpacked uint8 codes uint8(x / scale + zero + 0.5), fp32, from the fp32 (unrounded) scale/zero."""
    u = x.float() / scales[..., None] + zeros[..., None] + 0.5
    # truncation == floor as u >= 0; NaN (constant head) -> 0 as the GPU's float->int conversion; the clamp only
    # guards rounding at the ends, it never moves a finite code (u <= 2^b - 1 + 0.5 + a few ulp)
    return torch.nan_to_num(u.trunc(), nan=0.0).clamp_(0, 2**bits - 1).to(torch.uint8)


def kv_quantize(x: torch.Tensor, bits: int) -> KVCodes:
    """LMDeploy's per-token, per-head asymmetric quantization of K or V [batch, kv_heads, seq, head_dim]; scale and
    zero stored in x's dtype (the model dtype)."""
    scales, zeros = kv_quant_params(x, bits)
    q = kv_codes(x, scales, zeros, bits)
    if bits == 4:
        if q.shape[-1] % 2:
            raise ValueError(f"head_dim={q.shape[-1]} cannot be packed at kv.bits=4")
        q = pack_int4_halves(q)
    return KVCodes(q, scales.to(x.dtype), zeros.to(x.dtype), bits)


def _codes_and_meta(kv: KVCodes):
    q = unpack_int4_halves(kv.codes) if kv.bits == 4 else kv.codes
    return q, kv.scales[..., None], kv.zeros[..., None]


def _op_dtype(meta: torch.dtype) -> torch.dtype:
    """Triton's type of `uint8 op meta`: fp16 stays fp16; bf16 (and fp32) compute in fp32 (semantic.py
    computation_type_impl). fp16/bf16 results below are formed in fp32 and rounded once, which equals the correctly
    rounded fp16/bf16 operation for + - * (fp32 has more than 2p+2 bits)."""
    return torch.float16 if meta == torch.float16 else torch.float32


def round_to_fp16_once(x: torch.Tensor) -> torch.Tensor:
    """float64 -> fp16 rounded once, to nearest with ties to even (torch's float64 -> fp16 cast goes through fp32,
    which can round twice)."""
    x = x.double()
    exp = torch.floor(torch.log2(x.abs().clamp_min(2.0**-24))).clamp_min(-14)
    ulp = torch.exp2(exp - 10)
    r = torch.round(x / ulp) * ulp
    r = torch.where(r.abs() >= 65520, torch.copysign(torch.full_like(r, math.inf), r), r)
    return torch.where(torch.isfinite(x), r, x).to(torch.float16)


def kv_dequantize_prefill(kv: KVCodes, dtype: torch.dtype | None = None) -> torch.Tensor:
    """flatten_kv_cache.py `_flatten_kv_cache_quant`: sz = s*z (model dtype); x = q*s - sz, rounded to the model dtype;
    returned in `dtype` (default: the model dtype).

    fp16: the compiled kernel fuses the multiply-subtract into one FMA, so x = fp16(q*s - sz) is rounded once (on an
    H200 with LMDeploy 0.18.0 this matched 100% of values where codes, scale and zero agree; the unfused reading of the
    source, fp16(fp16(q*s) - sz), matched 14-60%: results/gpu/kv_lmdeploy_check.json, `prefill_fused`). bf16 (and
    fp32) compute in fp32 (Triton's type rules), where q*s is exact: x = bf16(fp32(q*s) - sz)."""
    q, s, z = _codes_and_meta(kv)
    meta = s.dtype
    sz = (s.float() * z.float()).to(meta)
    if meta == torch.float16:
        x = round_to_fp16_once(q.double() * s.double() - sz.double())
    else:
        x = (q.float() * s.float() - sz.float()).to(meta)
    return x if dtype is None else x.to(dtype)


def kv_dequantize_decode(kv: KVCodes, dtype: torch.dtype | None = None) -> torch.Tensor:
    """pagedattention.py `_fwd_grouped_split_quant_kernel`: x = ((q - z) * s) in Triton's types, rounded to the model
    dtype; returned in `dtype` (default: the model dtype)."""
    q, s, z = _codes_and_meta(kv)
    meta, op = s.dtype, _op_dtype(s.dtype)
    d = (q.float() - z.float()).to(op)
    x = (d.float() * s.float()).to(op).to(meta)
    return x if dtype is None else x.to(dtype)


def kv_dequantize(kv: KVCodes, dtype: torch.dtype | None = None, path: str = "prefill") -> torch.Tensor:
    """The engine's dequantization on `path` ("prefill" or "decode")."""
    if path == "prefill":
        return kv_dequantize_prefill(kv, dtype)
    if path == "decode":
        return kv_dequantize_decode(kv, dtype)
    raise ValueError(f"dequant path {path!r}: one of 'prefill', 'decode'")


def degenerate_rows(kv: KVCodes) -> int:
    """(token, head) rows whose stored scale is 0 (constant head, or a range that underflows the model dtype) or whose
    stored zero is not finite (|min| / scale overflows fp16): the engine dequantizes them to NaN / inf."""
    return int(((kv.scales == 0) | ~torch.isfinite(kv.zeros)).sum())


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, bits: int, dtype_bytes: int = 2,
                       fmt: str = "int") -> int:
    """Stored bytes per token for K and V over all layers (harness.storage_bytes): codes plus scale and zero in the
    model dtype (`dtype_bytes`: 2 for fp16/bf16, LMDeploy's dtypes); bits=16: 2 per value; fp8: 1 per value, no
    per-token metadata (the per-layer scalar scales are not per token)."""
    check_kv_supported(bits, fmt)
    meta = 0 if fmt in KV_FP8 else 2 * dtype_bytes
    return storage_bytes.kv_bytes_per_token(num_layers, num_kv_heads, head_dim, bits, meta)


def _cat(a: KVCodes | None, b: KVCodes) -> KVCodes:
    if a is None:
        return b
    return KVCodes(*(torch.cat([x, y], dim=2) for x, y in zip(a[:3], b[:3])), b.bits)


def _map(kv: KVCodes | None, fn) -> KVCodes | None:
    return None if kv is None else KVCodes(*(fn(t) for t in kv[:3]), kv.bits)


def _path(dequant: str, new_tokens: int) -> str:
    """LMDeploy flattens the cache (prefill kernel) for a forward with several new tokens, and reads it inside the
    paged-attention kernel for a one-token decode step."""
    if dequant == "auto":
        return "decode" if new_tokens == 1 else "prefill"
    return dequant


class QuantizedKVLayer(CacheLayerMixin):
    """One layer's K/V, kept only as LMDeploy codes + scales/zeros in the model dtype. Every `update` (prefill chunk or
    decode step) quantizes the new tokens, appends them, and returns the whole cache dequantized, so attention reads
    quantized K/V for the current tokens too (as LMDeploy's prefill reads its flattened, dequantized cache)."""

    is_sliding = False
    is_croppable = True  # per-token scales: dropping the last tokens leaves the rest as it was

    def __init__(self, bits: int, dequant: str = "auto", tally: list | None = None):
        super().__init__()
        _check_quant_bits(bits)
        self.tally = tally  # a one-element list shared by every layer of every cache of a run: its constant rows
        if dequant not in DEQUANT_PATHS:
            raise ValueError(f"dequant={dequant!r}: one of {DEQUANT_PATHS}")
        self.bits, self.dequant = bits, dequant
        self.k: KVCodes | None = None
        self.v: KVCodes | None = None
        self.dtype: torch.dtype | None = None
        self.constant_heads = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        if key_states.shape[-1] * self.bits % 8 or (self.bits == 4 and key_states.shape[-1] % 2):
            raise ValueError(f"head_dim={key_states.shape[-1]} cannot be packed at kv.bits={self.bits}")
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k_new, v_new = kv_quantize(key_states, self.bits), kv_quantize(value_states, self.bits)
        n = degenerate_rows(k_new) + degenerate_rows(v_new)
        self.constant_heads += n
        if self.tally is not None:
            self.tally[0] += n
        self.k, self.v = _cat(self.k, k_new), _cat(self.v, v_new)
        path = _path(self.dequant, key_states.shape[2])
        return (kv_dequantize(self.k, key_states.dtype, path), kv_dequantize(self.v, value_states.dtype, path))

    def get_seq_length(self) -> int:
        return 0 if self.k is None else self.k.codes.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(kv.nbytes() for kv in (self.k, self.v) if kv is not None)

    def _apply(self, fn) -> None:
        self.k, self.v = _map(self.k, fn), _map(self.v, fn)

    def offload(self):
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized:
            self._apply(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self.k = self.v = None
        self.is_initialized = False
        self.constant_heads = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove < 0 and self.k is not None:
            self._apply(lambda t: t[:, :, :tokens_to_remove])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])


class Fp8KVLayer(QuantizedKVLayer):
    """One layer's K/V stored as fp8 (LMDeploy quant_policy 16 / 17): every update casts the new tokens, appends them
    and returns the whole cache read back in the model dtype. No per-token metadata, nothing degenerate to count (a
    value past the fp8 range saturates, as the kernel's clamp does)."""

    def __init__(self, fmt: str, tally: list | None = None):
        CacheLayerMixin.__init__(self)
        if fmt not in KV_FP8:
            raise ValueError(f"kv.format={fmt!r}: one of {', '.join(KV_FP8)}")
        self.fmt, self.bits, self.dequant, self.tally = fmt, 8, "auto", tally
        self.k = self.v = None
        self.dtype = None
        self.constant_heads = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k_new, v_new = kv_fp8_quantize(key_states, self.fmt), kv_fp8_quantize(value_states, self.fmt)
        self.k = k_new if self.k is None else torch.cat([self.k, k_new], dim=2)
        self.v = v_new if self.v is None else torch.cat([self.v, v_new], dim=2)
        return kv_fp8_dequantize(self.k, key_states.dtype), kv_fp8_dequantize(self.v, value_states.dtype)

    def get_seq_length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)

    def _apply(self, fn) -> None:
        self.k, self.v = (None if t is None else fn(t) for t in (self.k, self.v))


class _SlidingWindow:
    """A sliding-window layer's K/V (Gemma-3's local layers) in the same quantized storage, kept as transformers'
    DynamicSlidingWindowLayer keeps its own: after each update only the last sliding_window - 1 tokens stay (a token's
    codes and per-token scale do not depend on the others, so dropping old tokens leaves the rest as they were); the
    update returns the kept tokens and the new ones, and the mask sizes follow the window."""

    is_sliding = True
    is_croppable = False

    def _init_window(self, sliding_window: int) -> None:
        self.sliding_window, self.cumulative_length = sliding_window, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        k, v = super().update(key_states, value_states, *args, **kwargs)
        self.cumulative_length += key_states.shape[-2]
        keep = self.sliding_window - 1
        self._apply(lambda t: t[:, :, -keep:] if t.shape[2] > keep else t)
        return k, v

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        kept = min(self.cumulative_length, self.sliding_window - 1)
        return kept + query_length, offset

    def get_max_length(self) -> int:
        return self.sliding_window

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a sliding-window quantized KV layer cannot be cropped (its evicted tokens are gone)")


class SlidingQuantizedKVLayer(_SlidingWindow, QuantizedKVLayer):
    def __init__(self, sliding_window: int, bits: int, dequant: str = "auto", tally: list | None = None):
        QuantizedKVLayer.__init__(self, bits, dequant, tally)
        self._init_window(sliding_window)


class SlidingFp8KVLayer(_SlidingWindow, Fp8KVLayer):
    def __init__(self, sliding_window: int, fmt: str, tally: list | None = None):
        Fp8KVLayer.__init__(self, fmt, tally)
        self._init_window(sliding_window)


class QuantizedKVCache(Cache):
    """A `transformers` cache holding every layer's K/V as LMDeploy int8 / int4 codes (`bits` = quant_policy), scale
    and zero in the model dtype; or, with `fmt` "fp8_e4m3" / "fp8_e5m2" (bits 8), as fp8 values (quant_policy 16 / 17).

    `dequant`: "auto" (the engine: prefill kernel for a multi-token forward, paged-attention decode kernel for a
    one-token step), or "prefill" / "decode" for one kernel's rounding throughout.
    `constant_heads`: (token, KV head) rows written so far, K and V, with scale 0 (dequantized to NaN, as the engine);
    `tally`: a one-element list to which every layer adds its constant rows (a run's count over all its caches).

    Hand it to a model through eval.forward (`forward(model, ids, QuantizedKVCache(model.config, bits=8))`), which
    uses the cache argument's name of the installed transformers, or to `model.generate` the same way.
    Full-attention and sliding-window layers (Gemma-3's local layers keep their last sliding_window - 1 tokens, as
    transformers' own sliding layers do); other layer kinds (chunked attention, ...) are refused."""

    def __init__(self, config, bits: int, dequant: str = "auto", tally: list | None = None, fmt: str = "int"):
        _check_quant_bits(bits)
        check_kv_supported(bits, fmt)
        text = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        other = set(layer_types) - {"full_attention", "sliding_attention"}
        if other:
            raise ValueError(f"QuantizedKVCache supports full-attention and sliding-window layers; the model has "
                             f"{sorted(other)}")
        self.bits, self.dequant, self.fmt = bits, dequant, fmt

        def layer(kind, kw):
            if kind == "sliding_attention":
                w = kw["sliding_window"]
                if fmt == "int":
                    return SlidingQuantizedKVLayer(w, bits, dequant, tally)
                return SlidingFp8KVLayer(w, fmt, tally)
            return QuantizedKVLayer(bits, dequant, tally) if fmt == "int" else Fp8KVLayer(fmt, tally)

        super().__init__(layers=[layer(k, kw) for k, kw in zip(layer_types, layer_kwargs)])

    @property
    def constant_heads(self) -> int:
        return sum(layer.constant_heads for layer in self.layers)

    def nbytes(self) -> int:
        """Bytes actually stored: codes + scales and zeros (model dtype), over all layers."""
        return sum(layer.nbytes() for layer in self.layers)
