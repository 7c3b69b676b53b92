"""Export to the GPTQ checkpoint layout (AutoGPTQ's QuantLinear buffers), which vLLM and LMDeploy TurboMind read
through `quantization_config.quant_method = "gptq"`.

Layout per quantized Linear `<name>` (out_features N, in_features K, G = K / group_size groups), as AutoGPTQ's
`QuantLinear.pack` (auto_gptq/nn_modules/qlinear/qlinear_exllama.py and the other qlinear modules):
  `<name>.qweight` int32 [K/8, N]: eight 4-bit codes per int32 along K, the code of input 8r + i in bits 4i..4i+3 of
                   word r (no interleave);
  `<name>.qzeros`  int32 [G, N/8]: zero points packed along N the same way. checkpoint_format "gptq" (v1, AutoGPTQ's
                   `zeros -= 1` before packing; vLLM, TurboMind and transformers read stored + 1) or "gptq_v2"
                   (GPTQModel: stored as is; vLLM reads it with `checkpoint_format: gptq_v2`);
  `<name>.scales`  fp16  [G, N];
  `<name>.g_idx`   int32 [K]: the group of each input column, k // group_size (GPTQ with static groups).
Dequantization: w[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n].

v1 cannot hold a zero point of 0 (stored -1: AutoGPTQ's uint32 cast then corrupts the other seven slots of the word;
a 4-bit -1 reads back as 16): the harness's asymmetric grid gives 0 when a group's minimum is above -scale/2, so
such a QTensor is refused in v1 with a pointer to gptq_v2. Symmetric QTensors (codes -8..7, w = q * s) are written
as codes + 8 with zero point 8, AutoGPTQ's symmetric convention (`zero = (maxq + 1) / 2`), `sym: true`.

`desc_act` is written false: with static groups (quant/gptq) g_idx is k // group_size, so the checkpoint is an
ordinary grouped one whatever order GPTQ processed the columns in (TurboMind refuses desc_act=true; vLLM's fast paths
need no reordering). LMDeploy 0.18 TurboMind also needs `sym: true` and group_size 128
(lmdeploy/turbomind/converter.py), so asymmetric or g64 checkpoints load in vLLM, not TurboMind; quant_meta.json says
which engines apply.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quant.export.awq import _check_model, _plain_tensors, _write_dir
from quant.primitives import QTensor

GPTQ_BITS = 4
PACK = 32 // GPTQ_BITS  # codes per int32
FORMATS = ("gptq", "gptq_v2")


class GPTQExportError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Pure packing
# ---------------------------------------------------------------------------------------------------------------

def pack_along_dim0(x: torch.Tensor) -> torch.Tensor:
    """[R, C] integers 0..15 -> int32 [R/8, C]: word r holds rows 8r..8r+7, row 8r+i in bits 4i..4i+3 (the sign bit
    is the top nibble's high bit, as AutoGPTQ's uint32 words cast to int32)."""
    r, c = x.shape
    if r % PACK:
        raise GPTQExportError(f"GPTQ packs {PACK} codes per int32; {r} is not a multiple of {PACK}")
    shifts = torch.arange(PACK, device=x.device, dtype=torch.int64)[None, :, None] * GPTQ_BITS
    words = (x.to(torch.int64).reshape(r // PACK, PACK, c) << shifts).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_along_dim0(words: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_along_dim0`: int32 [R/8, C] -> uint8 [R, C]."""
    shifts = torch.arange(PACK, device=words.device, dtype=torch.int64)[None, :, None] * GPTQ_BITS
    slots = (words.to(torch.int64)[:, None, :] >> shifts) & 0xF
    return slots.reshape(-1, words.shape[1]).to(torch.uint8)


def _unsigned(qt: QTensor, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Codes 0..15 [N, K] and integer zero points 0..15 [N, G] of a 4-bit QTensor (symmetric: codes + 8, zero 8)."""
    at = f" ({where})" if where else ""
    if qt.w_bit != GPTQ_BITS:
        raise GPTQExportError(f"quant.w_bit={qt.w_bit}{at}: this GPTQ export is 4-bit only")
    if qt.zeros is None:
        return (qt.q.to(torch.int16) + 8).to(torch.uint8), torch.full_like(qt.scales, 8.0)
    return qt.q, qt.zeros


def check_gptq(qt: QTensor, where: str = "", checkpoint_format: str = "gptq") -> None:
    at = f" ({where})" if where else ""
    if checkpoint_format not in FORMATS:
        raise GPTQExportError(f"checkpoint_format={checkpoint_format!r}: one of {', '.join(FORMATS)}")
    q, zeros = _unsigned(qt, where)
    out, inn = q.shape
    if inn % qt.group_size or inn % PACK or out % PACK:
        raise GPTQExportError(f"shape [{out}, {inn}]{at} with group_size={qt.group_size}: GPTQ packing needs "
                              f"in_features and out_features multiples of {PACK} and of the group size")
    if checkpoint_format == "gptq" and bool((zeros == 0).any()):
        n = int((zeros == 0).sum())
        raise GPTQExportError(f"{n} groups{at} have zero point 0, which checkpoint_format=gptq (v1, stores zero - 1) "
                              f"cannot hold; export with checkpoint_format=gptq_v2")


def pack_gptq(qt: QTensor, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """The four GPTQ tensors of one Linear (suffix -> tensor)."""
    check_gptq(qt, "", checkpoint_format)
    q, zeros = _unsigned(qt)
    z = zeros.t().round().to(torch.int64)  # [G, N]
    if checkpoint_format == "gptq":
        z = z - 1  # AutoGPTQ v1: `zeros -= 1` before packing; readers add 1 back
    k = q.shape[1]
    return {
        "qweight": pack_along_dim0(q.t()),
        "qzeros": pack_along_dim0(z.t()).t().contiguous(),
        "scales": qt.scales.t().to(torch.float16).contiguous(),
        "g_idx": torch.arange(k, dtype=torch.int32, device=q.device) // qt.group_size,
    }


def unpack_gptq(tensors: dict[str, torch.Tensor], checkpoint_format: str = "gptq", sym: bool = False) -> QTensor:
    """The exact inverse of `pack_gptq` (scales as stored, fp16 -> float32). Needs g_idx = k // group_size."""
    q = unpack_along_dim0(tensors["qweight"]).t().contiguous()
    z = unpack_along_dim0(tensors["qzeros"].t()).t().float()  # [G, N]
    if checkpoint_format == "gptq":
        z = z + 1
    n_groups = tensors["scales"].shape[0]
    g = q.shape[1] // n_groups
    g_idx = tensors.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(q.shape[1]) // g):
        raise GPTQExportError("g_idx is not k // group_size (an act-order checkpoint with dynamic groups)")
    scales = tensors["scales"].t().float().contiguous()
    if sym:
        return QTensor((q.to(torch.int16) - 8).to(torch.int8), scales, None, GPTQ_BITS, g)
    return QTensor(q, scales, z.t().contiguous(), GPTQ_BITS, g)


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------

def quantization_config(qtensors: dict[str, QTensor], checkpoint_format: str = "gptq") -> dict:
    group_sizes = {qt.group_size for qt in qtensors.values()}
    syms = {qt.zeros is None for qt in qtensors.values()}
    if len(group_sizes) != 1 or len(syms) != 1:
        raise GPTQExportError(f"quant.group_size / zero_point: a GPTQ quantization_config holds one group size and one "
                              f"sym flag, the QTensors use group sizes {sorted(group_sizes)}, sym {sorted(syms)}")
    # the keys AutoGPTQ's BaseQuantizeConfig.to_dict writes and vLLM's GPTQConfig.from_config reads
    return {"quant_method": "gptq", "bits": GPTQ_BITS, "group_size": group_sizes.pop(), "desc_act": False,
            "sym": syms.pop(), "static_groups": True, "checkpoint_format": checkpoint_format}


def export_gptq(model: nn.Module, qtensors: dict[str, QTensor], out_dir, tokenizer=None,
                quant_meta: dict | None = None, check_weights: bool = True, checkpoint_format: str = "gptq") -> Path:
    """Write a GPTQ checkpoint to out_dir (replacing it if present), atomically. Returns out_dir."""
    modules, out_emb, tied = _check_model(model, qtensors, lambda qt, name: check_gptq(qt, name, checkpoint_format),
                                          check_weights, GPTQExportError)
    tensors = _plain_tensors(model, qtensors)
    for name, qt in qtensors.items():
        for suffix, t in pack_gptq(qt, checkpoint_format).items():
            tensors[f"{name}.{suffix}"] = t
    qcfg = quantization_config(qtensors, checkpoint_format)
    skipped = sorted(n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in qtensors
                     and m is not out_emb)
    if skipped:
        qcfg["modules_to_not_convert"] = skipped
    config = model.config.to_dict()
    config["quantization_config"] = qcfg
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)
    engines = ["vllm"]
    if qcfg["sym"] and qcfg["group_size"] == 128 and checkpoint_format == "gptq":
        engines.append("lmdeploy-turbomind")  # turbomind/converter.py: sym, not desc_act, group 128, v1 zeros
    meta = {"format": f"gptq ({checkpoint_format})", "w_bit": GPTQ_BITS, "group_size": qcfg["group_size"],
            "zero_point": not qcfg["sym"], "n_quantized_linears": len(qtensors), "tied_word_embeddings": tied,
            "quantized_packed_bytes": sum(qt.nbytes_packed() for qt in qtensors.values()), "engines": engines,
            "file_bytes": None, **(quant_meta or {})}
    # AutoGPTQ and GPTQModel read quantize_config.json; transformers, vLLM and LMDeploy read config.json's copy
    return _write_dir(out_dir, tensors, config, meta, model, tokenizer,
                      extra_json={"quantize_config.json": {k: v for k, v in qcfg.items()
                                                           if k != "modules_to_not_convert"}})


def load_gptq_qtensors(directory) -> dict[str, QTensor]:
    """The QTensors of a checkpoint written by `export_gptq` (or any GPTQ checkpoint with g_idx = k // group)."""
    import json

    from safetensors.torch import load_file

    d = Path(directory)
    qcfg = json.loads((d / "config.json").read_text()).get("quantization_config") or {}
    if qcfg.get("quant_method") != "gptq" or qcfg.get("bits") != GPTQ_BITS:
        raise GPTQExportError(f"{d}: not a 4-bit GPTQ checkpoint (quantization_config={qcfg})")
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    fmt, sym = qcfg.get("checkpoint_format", "gptq"), bool(qcfg.get("sym", True))
    out = {}
    for key in [k for k in tensors if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        out[name] = unpack_gptq({s: tensors[f"{name}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")
                                 if f"{name}.{s}" in tensors}, fmt, sym)
    return out
