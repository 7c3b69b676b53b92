"""Memory: what the weights and the KV cache occupy (arithmetic from the quantized tensors and the model shape), and
the run's measured peak (process RSS on CPU, torch.cuda.max_memory_allocated on GPU).

Weight bytes, two layouts of the same int4 codes:
- `awq_packed`: AWQ's checkpoint format (llm-awq / AutoAWQ GEMM): codes at w_bit bits, fp16 scales, zero points
  packed at w_bit bits (QTensor.nbytes_packed);
- `int4_kernel`: what the CPU int4 kernel holds in memory (quant/kernels/int4_linear.py): codes at 4 bits, and a bf16
  (scale, float zero) pair per group.
Weights in an FP4 format (quant.format=nvfp4 / mxfp4) are counted in that format's own layout, under its name.
Everything not quantized (embeddings, tied lm_head, norms) counts at 2 bytes per value (fp16/bf16), tied parameters
once. The FP16 baseline is every parameter at 2 bytes.
"""
from __future__ import annotations

import resource
import sys

import torch

from eval.registry import EvalContext, evaluator
from harness.storage_bytes import FP16_BYTES, fp16_param_bytes, quantized_weight_bytes

def weight_memory(model: torch.nn.Module, qtensors: dict) -> dict:
    w8a8 = [n for n in qtensors if not isinstance(getattr(model.get_submodule(n), "weight", None), torch.nn.Parameter)]
    if w8a8:  # the method swapped its Linears for modules holding codes (SmoothQuant W8A8): count those bytes
        return _w8a8_memory(model, qtensors)
    fp16_total = fp16_param_bytes(model)
    quantized_params = sum(model.get_submodule(name).weight.numel() for name in qtensors)
    # parameters left in fp16: everything else (a quantized Linear's bias stays fp16 too)
    rest = fp16_total - quantized_params * FP16_BYTES
    formats = {getattr(qt, "format", "int") for qt in qtensors.values()}
    if formats - {"int"}:  # FP4 codes: their own layout (harness.storage_bytes nvfp4 / mxfp4), no AWQ or int4 kernel
        return _float_format_memory(qtensors, sorted(formats), fp16_total, quantized_params, rest)
    codes = sum(qt.q.numel() * qt.w_bit // 8 for qt in qtensors.values())
    awq_meta = sum(qt.nbytes_packed() for qt in qtensors.values()) - codes
    kernel_meta = sum(quantized_weight_bytes(qt.q.numel(), qt.scales.numel(), qt.w_bit, layout="int4_kernel")
                      for qt in qtensors.values()) - codes
    out = {
        "fp16_bytes": fp16_total,
        "n_quantized_linears": len(qtensors),
        "quantized_params": quantized_params,
        "unquantized_fp16_bytes": rest,
    }
    if qtensors:
        for layout, meta in (("awq_packed", awq_meta), ("int4_kernel", kernel_meta)):
            total = rest + codes + meta
            out[layout] = {"total_bytes": total, "codes_bytes": codes, "scales_zeros_bytes": meta,
                           "ratio_to_fp16": total / fp16_total}
    return out


def _float_format_memory(qtensors: dict, formats: list[str], fp16_total: int, quantized_params: int,
                         rest: int) -> dict:
    """Weights in an FP4 format's layout (FP4Tensor.nbytes_packed: e2m1 codes two a byte, a 1-byte scale per block,
    NVFP4's fp32 global scale), under the format's name; every remaining parameter at 2 bytes."""
    codes = quantized_params // 2
    stored = sum(qt.nbytes_packed() for qt in qtensors.values())
    total = rest + stored
    return {"fp16_bytes": fp16_total, "n_quantized_linears": len(qtensors), "quantized_params": quantized_params,
            "unquantized_fp16_bytes": rest,
            "+".join(formats): {"total_bytes": total, "codes_bytes": codes, "scales_bytes": stored - codes,
                                "ratio_to_fp16": total / fp16_total}}


def _w8a8_memory(model: torch.nn.Module, qtensors: dict) -> dict:
    """Weights in LMDeploy's W8A8 layout (harness.storage_bytes "w8a8"): the swapped Linears' 1-byte codes and fp32
    per-row scales, every remaining parameter at 2 bytes; the FP16 model's bytes for the ratio."""
    rest = fp16_param_bytes(model)  # parameters only: the swapped modules keep codes and scales as buffers
    quantized_params = sum(qt.q.numel() for qt in qtensors.values())
    w8a8 = sum(quantized_weight_bytes(qt.q.numel(), qt.scales.numel(), 8, layout="w8a8") for qt in qtensors.values())
    fp16_total = rest + quantized_params * FP16_BYTES
    return {"fp16_bytes": fp16_total, "n_quantized_linears": len(qtensors), "quantized_params": quantized_params,
            "unquantized_fp16_bytes": rest,
            "w8a8": {"total_bytes": rest + w8a8, "codes_bytes": quantized_params,
                     "scales_bytes": w8a8 - quantized_params, "ratio_to_fp16": (rest + w8a8) / fp16_total}}


def kv_memory(config, bits: int, context_len: int, batch_size: int, fmt: str = "int") -> dict:
    from quant.kv_cache import kv_bytes_per_token

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = text.num_hidden_layers
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_tok = kv_bytes_per_token(layers, kv_heads, head_dim, bits, fmt=fmt)
    per_tok_fp16 = kv_bytes_per_token(layers, kv_heads, head_dim, 16)
    return {
        "bits": bits,
        "format": fmt,
        "bytes_per_token": per_tok,
        "fp16_bytes_per_token": per_tok_fp16,
        "ratio_to_fp16": per_tok / per_tok_fp16,
        "context_len": context_len,
        "batch_size": batch_size,
        "bytes_at_context": per_tok * context_len * batch_size,
        "shape": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim},
    }


def peak_memory(device: str = "cpu") -> dict:
    """The process's peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS), current RSS, and on CUDA
    the allocator's peak."""
    import psutil

    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_bytes": ru if sys.platform == "darwin" else ru * 1024,
           "rss_bytes": psutil.Process().memory_info().rss}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


@evaluator("memory")
def evaluate_memory(ctx: EvalContext) -> dict | None:
    mc = ctx.cfg.eval.memory
    if not mc.enabled:
        return None
    return {
        "weights": weight_memory(ctx.model, ctx.qtensors),
        "kv_cache": kv_memory(ctx.model.config, ctx.cfg.kv.bits, mc.context_len, mc.batch_size, ctx.cfg.kv.format),
        # the peak so far: loading, quantization and the evaluators that ran before this one (throughput runs after)
        "measured": peak_memory(ctx.cfg.model.device),
    }


def forward_bytes(config, batch_size: int, seq_len: int, kv_bits: int, logits_positions: int | None = None,
                  act_bytes: int = 2) -> int:
    """A generous estimate of what one forward over [batch, seq_len] needs beyond the weights: the KV cache, one
    layer's activations (hidden x 4 + MLP intermediate x 3), the attention scores if materialised, and fp32 logits
    at `logits_positions` positions (default: all)."""
    kv = kv_memory(config, kv_bits, seq_len, batch_size)["bytes_at_context"]
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    tokens = batch_size * seq_len
    acts = tokens * (4 * text.hidden_size + 3 * getattr(text, "intermediate_size", 4 * text.hidden_size)) * act_bytes
    scores = batch_size * text.num_attention_heads * seq_len * seq_len * 4
    logits = (tokens if logits_positions is None else logits_positions) * text.vocab_size * 4 * 2  # logits + softmax
    return kv + acts + scores + logits


def calibration_bytes(config, n_samples: int, seqlen: int, act_bytes: int = 2) -> int:
    """What a block-by-block calibration (AWQ, quant/awq/method.py) holds at once, per calibration token: the block's
    input and output and the inputs of its Linears (q/k/v share one, o, gate/up share one, down): hidden x 5 +
    MLP intermediate. A lower bound of the peak (the searches add their own), so a refusal is never a false alarm."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    inter = getattr(text, "intermediate_size", 4 * text.hidden_size)
    return n_samples * seqlen * (5 * text.hidden_size + inter) * act_bytes


def check_calibration_fits(config, calib, device: str = "cpu", act_bytes: int = 2, extra_bytes: int = 0) -> None:
    """ConfigError naming quant.calib.n_samples when the calibration activations clearly do not fit in free memory
    (checked before the model loads; `calib` is a CalibConfig). `extra_bytes`: what the method holds beyond them,
    independent of n_samples (quant.registry.Method.extra_calibration_bytes: AutoRound's backward pass)."""
    from harness.config import user_error

    need = calibration_bytes(config, calib.n_samples, calib.seqlen, act_bytes) + extra_bytes
    free = available_bytes(device)
    if need > 0.9 * free:
        fit = int((0.9 * free - extra_bytes) / calibration_bytes(config, 1, calib.seqlen, act_bytes))
        own = f" ({extra_bytes / 2**30:.1f} GiB of it the method's backward pass)" if extra_bytes else ""
        raise user_error("quant.calib.n_samples", calib.n_samples,
                         f"{calib.n_samples} x {calib.seqlen} calibration tokens need about {need / 2**30:.1f} GiB of "
                         f"activations{own} but {free / 2**30:.1f} GiB is free on {device}",
                         f"use at most quant.calib.n_samples={fit}" if fit >= 1 else "use a shorter quant.calib.seqlen")


def available_bytes(device: str = "cpu") -> int:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def check_fits(config, batch_size: int, seq_len: int, kv_bits: int, field: str, device: str = "cpu",
               logits_positions: int | None = None) -> None:
    """ConfigError naming `field` when a batch clearly does not fit in the free memory (checked before the work)."""
    from harness.config import ConfigError

    need = forward_bytes(config, batch_size, seq_len, kv_bits, logits_positions)
    free = available_bytes(device)
    if need > 0.9 * free:
        raise ConfigError(f"{field}: batch {batch_size} x {seq_len} tokens needs about {need / 2**30:.1f} GiB "
                          f"(KV cache at {kv_bits} bits, activations, logits) but {free / 2**30:.1f} GiB is free on "
                          f"{device}; lower the batch size or the lengths")
