"""How many bytes weights and the KV cache take as stored: one implementation of each count, used by the quantizers'
summaries, the memory evaluator, synthetic checkpoints, rooflines and the report.

Layouts:
- "awq": AutoAWQ GEMM / LMDeploy `model_format='awq'`: codes packed at w_bit bits, an fp16 scale per group and, with
  a zero point, the zero packed at w_bit bits too;
- "int4_kernel": torch's CPU/CUDA int4 weight-only kernel: codes at 4 bits, a 16-bit scale and a 16-bit float zero
  per group (quant/kernels/int4_linear.py).
- "w8a8": LMDeploy's SmoothQuant checkpoint (`quant_method: smooth_quant`): 1-byte codes (int8 / fp8), an fp32 scale
  per output row (pytorch/nn/linear/w8a8.py `create_weights`).
- "nvfp4" / "mxfp4" (quant/formats/fp4.py): e2m1 codes at 4 bits, two a byte; a 1-byte scale per block (fp8 e4m3 per
  16 / e8m0 per 32); NVFP4 adds one fp32 global scale per tensor: 4.5 bits a weight + 4 bytes (NVFP4), 4.25 (MXFP4).
- KV cache (LMDeploy `quant_policy` 8 / 4): K and V codes at kv bits, plus a scale and a zero point per token, per
  KV head, for K and for V, in a 16-bit dtype; unquantized K/V are 16-bit values. FP8 K/V (`quant_policy` 16 / 17):
  1 byte per value and no per-token metadata (meta_bytes=0; the scale is one scalar per layer).
"""
from __future__ import annotations

FP16_BYTES = 2
FP32_BYTES = 4
FP8_BYTES = 1
KV_META_BYTES = 2 * FP16_BYTES  # scale + zero point, per token, per KV head, for K and for V each


def quantized_weight_bytes(n_weights: int, n_groups: int, w_bit: int, zero_point: bool = True,
                           layout: str = "awq") -> int:
    """Bytes of `n_weights` codes in `n_groups` quantization groups (all groups of all rows)."""
    codes = n_weights * w_bit // 8
    if layout == "awq":
        return codes + n_groups * FP16_BYTES + (n_groups * w_bit // 8 if zero_point else 0)
    if layout == "int4_kernel":
        return codes + n_groups * 2 * FP16_BYTES
    if layout == "w8a8":
        return codes + n_groups * FP32_BYTES
    if layout in ("nvfp4", "mxfp4"):  # one call per tensor: NVFP4's global scale counted once
        return codes + n_groups * FP8_BYTES + (FP32_BYTES if layout == "nvfp4" else 0)
    raise ValueError(f"unknown weight layout {layout!r} (awq, int4_kernel, w8a8, nvfp4, mxfp4)")


def awq_linear_bytes(out_features: int, in_features: int, w_bit: int, group_size: int) -> int:
    """One Linear in AutoAWQ's GEMM layout (qweight, qzeros, scales)."""
    return quantized_weight_bytes(out_features * in_features, out_features * (in_features // group_size), w_bit)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, bits: int,
                       meta_bytes: int = KV_META_BYTES) -> int:
    """K and V of one token over all layers: codes plus scale and zero per head (bits 8 / 4), or 16-bit values."""
    if bits not in (16, 8, 4):
        raise ValueError(f"kv bits must be 16, 8 or 4, got {bits}")
    per_head = head_dim * FP16_BYTES if bits == 16 else head_dim * bits // 8 + meta_bytes
    return num_layers * 2 * num_kv_heads * per_head


def distinct_param_bytes(model) -> int:
    """Bytes the parameters occupy in their own dtypes (parameters() yields a tied parameter once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fp16_param_bytes(model) -> int:
    """Every parameter at 2 bytes, tied parameters once."""
    return sum(p.numel() for p in model.parameters()) * FP16_BYTES


def packed_weight_bytes(model, qtensors: dict) -> dict:
    """Bytes of the weights as deployed: each quantized Linear's codes in its own layout (`nbytes_packed`: an integer
    QTensor's packed codes + fp16 scales/zeros, the AWQ layout; an FP4Tensor's nvfp4 / mxfp4 layout), fp16 for every
    other parameter (tied parameters counted once)."""
    total_fp16 = fp16_param_bytes(model)
    q_bytes = sum(q.nbytes_packed() for q in qtensors.values())
    rest = total_fp16 - sum(model.get_submodule(n).weight.numel() for n in qtensors) * FP16_BYTES
    return {"weight_bytes": q_bytes + rest, "weight_bytes_fp16": total_fp16,
            "quantized_linear_bytes": q_bytes, "unquantized_bytes": rest,
            "weight_bytes_ratio": (q_bytes + rest) / total_fp16}
