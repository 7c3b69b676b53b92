"""Export in the compressed-tensors layout: what llm-compressor writes and vLLM, transformers (through the
`compressed-tensors` package) read (LMDeploy 0.18's W4A16 MoE kernel reads a narrower form only: bf16 scales, int32
shapes, routed experts alone; backends/lmdeploy.py checks for it). Dense models and mixtures of experts alike:
each routed expert is its own Linear under the architecture's checkpoint names (quant/export/names.py), the router
(and a shared expert's gate) kept in the model dtype and listed in `ignore`.

The layout is compressed-tensors 0.20.1's (COMPRESSED_TENSORS_VERSION; pinned in constraints.txt, and the round-trip
test decompresses with that package's own compressors). Per quantized Linear `<name>` [out, in]:

`pack-quantized` (integer codes, 1..8 bits; compressors/pack_quantized/base.py, helpers.py `pack_to_int32`):
  `<name>.weight_packed`     int32 [out, ceil(in * b / 32)]: the codes offset to unsigned (signed q + 2^(b-1); the
                             harness's asymmetric codes are already that), packed densely along `in`: code i of a row
                             holds bits i*b .. i*b+b-1 of the row's bit stream, least significant first, 32 a word, a
                             code straddling two words where b does not divide 32 (compressed-tensors >= 0.18; up to
                             0.17 it packed 32 // b codes a word, which is the same layout for 4 and 8 bits only);
  `<name>.weight_scale`      fp16 [out, G] (G = in / group_size; 1 for a per-channel Linear);
  `<name>.weight_zero_point` int32 [ceil(out * b / 32), G]: asymmetric only, the integer zero points (signed
                             z - 2^(b-1), offset back to z), packed the same way along `out` (packed_dim=0);
  `<name>.weight_shape`      int64 [2] = (out, in).
  w = (q - z) * s: compressed-tensors' `_dequantize` in the scale's dtype, so fp16 (q - z) * s rounded once, the
  harness's (q - z) * float(s) rounded to fp16 bit for bit.
`nvfp4-pack-quantized` (compressors/nvfp4/base.py): `weight_packed` uint8 [out, in / 2], two e2m1 codes a byte, low
  nibble first (the harness's pack_e2m1); `weight_scale` float8_e4m3fn [out, in / 16]; `weight_global_scale` fp32 [1]
  = 448 * 6 / amax|w|, the divisor form (w = e2m1 * (scale / global_scale)), as quant/formats/fp4.py holds it.
`mxfp4-pack-quantized` (compressors/mxfp4/base.py): `weight_packed` as NVFP4's; `weight_scale` uint8 [out, in / 32],
  the e8m0 biased exponent (w = e2m1 * 2^(scale - 127)).

config.json's `quantization_config`: `quant_method: compressed-tensors`, `format` (the one format, or
`mixed-precision`), `version`, `quantization_status: compressed`, `ignore` (every Linear left unquantized, routers
included), and `config_groups`: one scheme (`targets: ["Linear"]`) or, with per-layer overrides or a per-channel
fallback, one group per scheme targeting its Linears by name; each scheme's `weights` as compressed-tensors'
QuantizationArgs serialise them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quant.export.awq import _check_model, _check_weights_match, _plain_tensors, _write_dir, unquantized_linears
from quant.export.names import CheckpointNames
from quant.formats.fp4 import FP4Tensor
from quant.primitives import QTensor

COMPRESSED_TENSORS_VERSION = "0.20.1"  # the release whose layout this writes (its `version` in quantization_config)
PACK_BITS = range(1, 9)  # pack_to_int32 takes 1..8 bits
PACKED = "pack-quantized"
# QuantizationArgs of the FP4 formats as compressed-tensors serialises its presets NVFP4A16 / MXFP4A16
# (quantization/quant_scheme.py), and the compression format each is written in
FP4_SCHEMES = {
    "nvfp4": ("nvfp4-pack-quantized", {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16,
                                       "strategy": "tensor_group", "dynamic": False,
                                       "scale_dtype": "torch.float8_e4m3fn"}),
    "mxfp4": ("mxfp4-pack-quantized", {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32,
                                       "strategy": "group", "dynamic": False, "scale_dtype": "torch.uint8"}),
}
FORMAT_NAME = "compressed-tensors"  # quantization_config.quant_method


class CompressedTensorsExportError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Pure packing
# ---------------------------------------------------------------------------------------------------------------

def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [R, C] (0 .. 2^bits - 1) -> int32 [R, ceil(C * bits / 32)], compressed-tensors' dense packing
    along C (pack_to_int32 with packed_dim=1, after its offset to unsigned): each group of 32 codes fills `bits` words;
    code j of a group starts at bit j * bits of them, least significant first."""
    if bits not in PACK_BITS:
        raise CompressedTensorsExportError(f"quant.w_bit={bits}: compressed-tensors packs 1..8 bits")
    r, c = codes.shape
    v = codes.to(torch.int64)
    if int(v.min()) < 0 or int(v.max()) >= 1 << bits:
        raise CompressedTensorsExportError(f"codes must lie in 0..{(1 << bits) - 1} to pack at {bits} bits")
    groups = -(-c // 32)
    v = nn.functional.pad(v, (0, groups * 32 - c)).reshape(r, groups, 32)
    words = torch.zeros(r, groups, bits + 1, dtype=torch.int64)  # one spare word for the last code's overflow
    for j in range(32):
        w, o = divmod(j * bits, 32)
        words[:, :, w] |= (v[:, :, j] << o) & 0xFFFFFFFF
        words[:, :, w + 1] |= v[:, :, j] >> (32 - o)  # the bits past the word's end (none when o + bits <= 32)
    words = words[:, :, :bits].reshape(r, groups * bits)[:, : -(-c * bits // 32)]
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()


def weight_args(qt) -> tuple[str, dict]:
    """(compression format, QuantizationArgs as JSON) of one Linear's codes."""
    if isinstance(qt, FP4Tensor):
        fmt, args = FP4_SCHEMES[qt.format]
        return fmt, dict(args)
    channel = qt.scales.shape[1] == 1  # one group per row: compressed-tensors' channel strategy
    return PACKED, {"num_bits": qt.w_bit, "type": "int", "symmetric": qt.zeros is None,
                    "group_size": None if channel else qt.group_size, "strategy": "channel" if channel else "group",
                    "dynamic": False}


def compress(qt) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one Linear (suffix -> tensor), as the format's compressor writes them."""
    if isinstance(qt, FP4Tensor):
        out = {"weight_packed": qt.packed().contiguous(), "weight_scale": qt.scales.contiguous()}
        if qt.global_scale is not None:
            out["weight_global_scale"] = qt.global_scale.to(torch.float32).reshape(1).contiguous()
        return out
    b = qt.w_bit
    unsigned = qt.q.to(torch.int64) if qt.zeros is not None else qt.q.to(torch.int64) + (1 << (b - 1))
    out = {"weight_packed": pack_int32(unsigned, b), "weight_scale": qt.scales.to(torch.float16).contiguous(),
           "weight_shape": torch.tensor(tuple(qt.q.shape), dtype=torch.int64)}
    if qt.zeros is not None:
        out["weight_zero_point"] = pack_int32(qt.zeros.round().to(torch.int64).t(), b).t().contiguous()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------

def check_qtensor(qt, where: str = "") -> None:
    at = f" ({where})" if where else ""
    if isinstance(qt, FP4Tensor):
        if qt.format not in FP4_SCHEMES:
            raise CompressedTensorsExportError(f"quant.format={qt.format}{at}: compressed-tensors "
                                               f"{COMPRESSED_TENSORS_VERSION} writes {', '.join(FP4_SCHEMES)} as FP4")
        return
    if not isinstance(qt, QTensor):
        raise CompressedTensorsExportError(f"{type(qt).__name__}{at}: not integer or FP4 weight codes")
    if qt.w_bit not in PACK_BITS:
        raise CompressedTensorsExportError(f"quant.w_bit={qt.w_bit}{at}: compressed-tensors packs 1..8 bits")
    if qt.q.shape[1] % qt.group_size:
        raise CompressedTensorsExportError(f"group size {qt.group_size}{at} does not divide "
                                           f"in_features={qt.q.shape[1]}")


def check_compressed_tensors_config(cfg, model=None) -> None:
    """Whether a run's quant config can be written in this layout, before any quantization (`model`: any module tree
    with the real shapes, e.g. on the meta device, to check every planned layer too)."""
    from quant import METHODS
    from quant.export import formats_of

    if cfg.method == "fp16":
        raise CompressedTensorsExportError("quant.method=fp16: nothing is quantized, so there is no compressed-tensors "
                                           "checkpoint to write; choose a weight-only method, e.g. quant=rtn_w4")
    own = formats_of(cfg)
    if FORMAT_NAME not in own:
        fmt = getattr(cfg, "format", "int")
        has = [m for m in METHODS if FORMAT_NAME in METHODS.get(m).formats]
        other = f"its checkpoint formats are {', '.join(own)}" if own else "it has no checkpoint format"
        raise CompressedTensorsExportError(
            f"quant.method: {cfg.method}{'' if fmt == 'int' else f' (quant.format={fmt})'} — {other}; the "
            f"compressed-tensors layout holds the weight codes of {', '.join(has)} — export one of those, "
            f"e.g. quant=rtn_w4 or quant=rtn_nvfp4")
    if model is None:
        return
    from quant.surgery import plan_layers

    try:
        specs = plan_layers(model, cfg).quantized()
    except ValueError as e:
        raise CompressedTensorsExportError(str(e).splitlines()[0]) from None
    for name, spec in specs.items():
        if spec.format == "int" and spec.w_bit not in PACK_BITS:
            raise CompressedTensorsExportError(f"quant.w_bit={spec.w_bit} ({name}): compressed-tensors packs 1..8 bits")


def _check_fp4_weights(model: nn.Module, qtensors: dict) -> None:
    """The model's FP4 Linears hold their codes' dequantization (within a quarter of the finest e2m1 step, 0.5 times
    the block's factor, plus the model dtype's rounding), as awq._check_weights_match does for integer codes."""
    modules = dict(model.named_modules())
    for name, qt in qtensors.items():
        w = modules[name].weight.detach().float()
        deq = qt.dequantize(torch.float32)
        step = 0.5 * qt.factors().repeat_interleave(qt.group_size, dim=1)
        if bool(((w - deq).abs() > 0.25 * step + deq.abs() * torch.finfo(modules[name].weight.dtype).eps).any()):
            raise CompressedTensorsExportError(f"{name}: the model's weight is not its FP4 codes' dequantization; the "
                                               f"codes do not describe this model's weights")


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------

def quantization_config(schemes: dict[str, tuple[str, dict, list[str]]], ignore: list[str]) -> dict:
    """config.json's quantization_config, with the keys ModelCompressor.update_config writes."""
    groups = {}
    for i, (fmt, args, names) in enumerate(schemes.values()):
        groups[f"group_{i}"] = {"targets": ["Linear"] if len(schemes) == 1 else sorted(names), "weights": args,
                                "input_activations": None, "output_activations": None, "format": fmt}
    formats = {fmt for fmt, _, _ in schemes.values()}
    return {"quant_method": FORMAT_NAME, "version": COMPRESSED_TENSORS_VERSION, "config_groups": groups,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision", "ignore": ignore,
            "quantization_status": "compressed", "kv_cache_scheme": None, "global_compression_ratio": None,
            "moe_sparsity_config": None, "sparsity_config": {}, "transform_config": {}}


def export_compressed_tensors(model: nn.Module, qtensors: dict, out_dir, tokenizer=None,
                              quant_meta: dict | None = None, check_weights: bool = True,
                              manifest: dict | None = None) -> Path:
    """Write a compressed-tensors checkpoint of `model` (its quantized Linears' codes: QTensor or FP4Tensor by
    qualified name) to out_dir, atomically, replacing it if present (the caller decides whether it may); with
    `manifest`, harness.outputs.MANIFEST too. Returns out_dir."""
    _, _, tied = _check_model(model, qtensors, check_qtensor, False, CompressedTensorsExportError)
    if check_weights:
        ints = {n: qt for n, qt in qtensors.items() if not isinstance(qt, FP4Tensor)}
        if ints:
            try:
                _check_weights_match(model, ints)
            except ValueError as e:
                raise CompressedTensorsExportError(str(e)) from None
        _check_fp4_weights(model, {n: qt for n, qt in qtensors.items() if isinstance(qt, FP4Tensor)})
    names = CheckpointNames(model)  # the architecture's checkpoint names (Mixtral's experts: w1/w3/w2)

    tensors = {names(k): t for k, t in _plain_tensors(model, qtensors).items()}
    schemes: dict[str, tuple[str, dict, list[str]]] = {}
    packed_bytes = 0
    for name, qt in qtensors.items():
        ckpt = names.module(name)
        for suffix, t in compress(qt).items():
            tensors[f"{ckpt}.{suffix}"] = t
            packed_bytes += t.numel() * t.element_size()
        fmt, args = weight_args(qt)
        schemes.setdefault(json.dumps([fmt, args], sort_keys=True), (fmt, args, []))[2].append(ckpt)
    qcfg = quantization_config(schemes, sorted(names.module(n) for n in unquantized_linears(model, qtensors)))

    config = model.config.to_dict()
    config["quantization_config"] = qcfg
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)
    meta = {
        "format": FORMAT_NAME,
        "compression_format": qcfg["format"],
        "compressed_tensors_version": COMPRESSED_TENSORS_VERSION,
        "schemes": [{"format": fmt, **args, "n_linears": len(n)} for fmt, args, n in schemes.values()],
        "n_quantized_linears": len(qtensors),
        "tied_word_embeddings": tied,
        "quantized_packed_bytes": packed_bytes,  # the codes, scales and zero points as written
        "file_bytes": None,  # filled by _write_dir
        **(quant_meta or {}),
    }
    return _write_dir(out_dir, tensors, config, meta, model, tokenizer, manifest=manifest)
