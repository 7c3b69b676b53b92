"""KV-cache quantization with LMDeploy's numerics (`quant_policy` 8 / 4), and a `transformers` cache that stores only
the quantized K/V.

The math follows LMDeploy's PyTorch engine (InternLM/lmdeploy @ 1263d5cd, lmdeploy/pytorch/kernels/cuda/):
- quantize, fill_kv_cache.py `_quant_int8` (lines 23-29) / `_quant_int4` (lines 33-43), per token and per KV head,
  min/max over head_dim:
      scale = (max - min) / (2^b - 1);  zero = -min / scale          (zero is a float in code units, not rounded)
      q = uint8(x / scale + zero + 0.5)                                (round half up; the argument is >= 0)
  The codes use the in-register fp32 scale/zero; the cache stores scale and zero separately (`scales_zeros[..., 0/1]`,
  lines 266-276) in the model dtype (cache_engine.py `get_quant_cache_descs`); here always fp16.
- dequantize, flatten_kv_cache.py lines 368-372: x_hat = q * scale - scale * zero, from the stored scale/zero.
Because zero is not rounded, u = (x - min) / scale lies in [0, 2^b - 1] exactly, so nothing clips and the error is
at most scale/2 per element (plus the fp16 rounding of the stored scale and zero).

Differences, all outside the numerics: LMDeploy's int8 kernel does its arithmetic in the model dtype, here in fp32 (its
int4 kernel casts to fp32 too); LMDeploy packs int4 as byte j = q[j] | q[j + D/2] << 4, here adjacent pairs
(`pack_int4_pairs`): the same bytes per token. A token whose K (or V) head is constant has max == min, where LMDeploy
divides by zero; here its scale is set to 1 so it round-trips to fp16(min).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.cache_utils import get_layer_types_and_kwargs

from harness import storage_bytes
from quant.primitives import pack_int4_pairs, unpack_int4_pairs

KV_BITS = (16, 8, 4)  # 16 = unquantized; 8 / 4 = LMDeploy quant_policy 8 / 4
META_DTYPE = torch.float16  # stored scale and zero
META_BYTES = 2 * 2  # fp16 scale + fp16 zero, per token per KV head


def check_kv_supported(bits: int) -> None:
    if bits not in KV_BITS:
        raise ValueError(f"kv.bits={bits} is not supported; allowed values: {{16, 8, 4}} (8 / 4 = LMDeploy quant_policy)")


def _check_quant_bits(bits: int) -> None:
    if bits not in (8, 4):
        raise ValueError(f"kv.bits={bits}: quantized KV needs 8 or 4 (16 means an ordinary, unquantized cache)")


class KVCodes(NamedTuple):
    """Quantized K or V [batch, kv_heads, seq, head_dim]: codes uint8 [..., head_dim * bits / 8], scales and zeros
    fp16 [batch, kv_heads, seq]."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))


def kv_quant_params(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scale and zero [batch, kv_heads, seq] of x [batch, kv_heads, seq, head_dim], as LMDeploy computes them."""
    _check_quant_bits(bits)
    x = x.float()
    mn, mx = x.amin(dim=-1), x.amax(dim=-1)
    scales = (mx - mn) / (2**bits - 1)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # constant head: LMDeploy would divide by 0
    zeros = -mn / scales
    return scales, zeros


def kv_quantize(x: torch.Tensor, bits: int) -> KVCodes:
    """LMDeploy's per-token, per-head asymmetric quantization of K or V [batch, kv_heads, seq, head_dim]."""
    scales, zeros = kv_quant_params(x, bits)
    # floor(u + 0.5) == LMDeploy's truncating uint8 cast, as u >= 0; the clamp only guards fp32 rounding at the ends
    q = torch.floor(x.float() / scales[..., None] + zeros[..., None] + 0.5).clamp_(0, 2**bits - 1).to(torch.uint8)
    if bits == 4:
        q = pack_int4_pairs(q)
    return KVCodes(q, scales.to(META_DTYPE), zeros.to(META_DTYPE), bits)


def kv_dequantize(kv: KVCodes, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_hat = q * scale - scale * zero (LMDeploy's flatten_kv_cache), in fp32, returned in `dtype`."""
    q = unpack_int4_pairs(kv.codes) if kv.bits == 4 else kv.codes
    s, z = kv.scales.float()[..., None], kv.zeros.float()[..., None]
    return (q.float() * s - s * z).to(dtype)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, bits: int) -> int:
    """Stored bytes per token for K and V over all layers (harness.storage_bytes; bits=16: 2 per value)."""
    check_kv_supported(bits)
    return storage_bytes.kv_bytes_per_token(num_layers, num_kv_heads, head_dim, bits, META_BYTES)


def _cat(a: KVCodes | None, b: KVCodes) -> KVCodes:
    if a is None:
        return b
    return KVCodes(*(torch.cat([x, y], dim=2) for x, y in zip(a[:3], b[:3])), b.bits)


def _map(kv: KVCodes | None, fn) -> KVCodes | None:
    return None if kv is None else KVCodes(*(fn(t) for t in kv[:3]), kv.bits)


class QuantizedKVLayer(CacheLayerMixin):
    """One layer's K/V, kept only as LMDeploy codes + fp16 scales/zeros. Every `update` (prefill chunk or decode step)
    quantizes the new tokens, appends them, and returns the whole cache dequantized, so attention reads quantized K/V
    for the current tokens too (as LMDeploy's prefill reads its flattened, dequantized cache)."""

    is_sliding = False
    is_croppable = True  # per-token scales: dropping the last tokens leaves the rest as it was

    def __init__(self, bits: int):
        super().__init__()
        _check_quant_bits(bits)
        self.bits = bits
        self.k: KVCodes | None = None
        self.v: KVCodes | None = None
        self.dtype: torch.dtype | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        if key_states.shape[-1] * self.bits % 8:
            raise ValueError(f"head_dim={key_states.shape[-1]} cannot be packed at kv.bits={self.bits}")
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.k = _cat(self.k, kv_quantize(key_states, self.bits))
        self.v = _cat(self.v, kv_quantize(value_states, self.bits))
        return kv_dequantize(self.k, key_states.dtype), kv_dequantize(self.v, value_states.dtype)

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


class QuantizedKVCache(Cache):
    """A `transformers` cache holding every layer's K/V as LMDeploy int8 / int4 codes (`bits` = quant_policy).

    Hand it to a model through eval.forward (`forward(model, ids, QuantizedKVCache(model.config, bits=8))`), which
    uses the cache argument's name of the installed transformers, or to `model.generate` the same way.
    Full-attention decoders only (a sliding-window layer would need its own eviction)."""

    def __init__(self, config, bits: int):
        _check_quant_bits(bits)
        text = config.get_text_config(decoder=True)
        layer_types, _ = get_layer_types_and_kwargs(text)
        other = set(layer_types) - {"full_attention"}
        if other:
            raise ValueError(f"QuantizedKVCache supports full-attention layers only; the model has {sorted(other)}")
        self.bits = bits
        super().__init__(layers=[QuantizedKVLayer(bits) for _ in range(text.num_hidden_layers)])

    def nbytes(self) -> int:
        """Bytes actually stored: codes + fp16 scales and zeros, over all layers."""
        return sum(layer.nbytes() for layer in self.layers)
