"""Export a SmoothQuant W8A8 model in the layout LMDeploy's PyTorch engine loads (`quant_method: smooth_quant`), and
read such a checkpoint's codes back.

What the engine reads (InternLM/lmdeploy@1263d5cd; function names):
- config.json `quantization_config` = {"quant_method": "smooth_quant", "quant_dtype": <torch dtype name>}, as lite
  `smooth_quant` writes it (`str(quant_dtype).split('.')[1]`: "int8", "float8_e4m3fn", "float8_e5m2");
  pytorch/config.py `QuantizationConfig.from_config` resolves quant_dtype with `getattr(torch, quant_dtype)`.
- per decoder Linear `<name>` (pytorch/nn/linear/w8a8.py `W8A8Linear.create_weights` / `register_all_parameters`):
  `<name>.weight` [out, in] in quant_dtype, `<name>.scale` float32 [out, 1], `<name>.bias` in the model dtype when
  present. The model's `load_weights` (e.g. pytorch/models/llama.py) maps `.q_proj/.k_proj/.v_proj` into `.qkv_proj`
  and `.gate_proj/.up_proj` into `.gate_up_proj` by substring, so `.scale` follows its `.weight` into the fused layer.
- every other tensor (embeddings, norms holding the folded smoothing, lm_head) in the model dtype, as
  `save_pretrained` writes them; a tied lm_head is written once (the loader skips `lm_head.weight` when tied). The
  block norms are built as `RMSNorm(..., quant_config)` and quantize their output per token (`rms_norm_dynamic_quant`):
  they read only `.weight`, which is the smoothed norm weight.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quant.primitives import QTensor
from quant.smoothquant.linear import W8A8Linear

WEIGHTS_FILE = "model.safetensors"
QUANT_DTYPE_NAMES = {torch.int8: "int8", torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}


class SmoothQuantExportError(ValueError):
    pass


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The codes' bytes (torch has no equality for float8 tensors on the CPU)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def quantization_config(dtype: torch.dtype) -> dict:
    if dtype not in QUANT_DTYPE_NAMES:
        raise SmoothQuantExportError(f"codes of dtype {dtype}: LMDeploy's W8A8 takes {list(QUANT_DTYPE_NAMES.values())}")
    return {"quant_method": "smooth_quant", "quant_dtype": QUANT_DTYPE_NAMES[dtype]}


def checkpoint_tensors(model: nn.Module, qtensors: dict[str, QTensor]) -> dict[str, torch.Tensor]:
    """Name -> tensor of the checkpoint: codes and fp32 scales of the quantized Linears, the rest in its own dtype."""
    modules = dict(model.named_modules())
    dtypes = set()
    out: dict[str, torch.Tensor] = {}
    for name, qt in qtensors.items():
        mod = modules.get(name)
        if not isinstance(mod, W8A8Linear):
            raise SmoothQuantExportError(f"{name}: not a W8A8Linear of this model (quantize with quant.method=smoothquant)")
        same_codes = mod.weight.dtype == qt.q.dtype and torch.equal(_bits(mod.weight), _bits(qt.q))
        if not (same_codes and torch.equal(mod.scale, qt.scales)):
            raise SmoothQuantExportError(f"{name}: the model's codes/scales differ from its QTensor's; the checkpoint "
                                         f"would not hold what was evaluated")
        if qt.zeros is not None or qt.group_size != qt.q.shape[1] or tuple(qt.scales.shape) != (qt.q.shape[0], 1):
            raise SmoothQuantExportError(f"{name}: W8A8 needs symmetric per-output-channel codes (scales [out, 1])")
        dtypes.add(qt.q.dtype)
        out[f"{name}.weight"] = qt.q
        out[f"{name}.scale"] = qt.scales.float()
    if len(dtypes) != 1:
        raise SmoothQuantExportError(f"one quant_dtype per checkpoint; the QTensors hold {sorted(map(str, dtypes))}")
    quantization_config(dtypes.pop())  # a dtype LMDeploy takes
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        if key in out:
            continue
        ident = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:  # tied (lm_head = embed_tokens): written once, as save_pretrained
            continue
        if ident is not None:
            seen[ident] = key
        out[key] = t
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def export_smoothquant(model: nn.Module, qtensors: dict[str, QTensor], out_dir, tokenizer=None) -> Path:
    """Write the checkpoint to out_dir (replacing it), atomically. Returns out_dir."""
    if not qtensors:
        raise SmoothQuantExportError("export_smoothquant: no quantized Linears given")
    from safetensors.torch import save_file

    tensors = checkpoint_tensors(model, qtensors)
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(next(iter(qtensors.values())).q.dtype)
    from harness.assets import atomic_directory

    with atomic_directory(out_dir) as tmp:  # a killed writer leaves nothing at out_dir (and is cleaned up next time)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def load_smoothquant_qtensors(directory) -> dict[str, QTensor]:
    """The QTensors of a smooth_quant checkpoint: every `<name>.scale` beside a `<name>.weight` in quant_dtype."""
    from safetensors.torch import load_file

    d = Path(directory)
    qcfg = json.loads((d / "config.json").read_text()).get("quantization_config") or {}
    if qcfg.get("quant_method") != "smooth_quant":
        raise SmoothQuantExportError(f"{d}: not a smooth_quant checkpoint (quantization_config={qcfg})")
    dtype = getattr(torch, qcfg.get("quant_dtype", "int8"))
    tensors = load_file(str(d / WEIGHTS_FILE))
    out = {}
    for key in [k for k in tensors if k.endswith(".scale")]:
        name = key[: -len(".scale")]
        q = tensors[f"{name}.weight"]
        if q.dtype != dtype:
            raise SmoothQuantExportError(f"{name}.weight is {q.dtype}, quantization_config says {dtype}")
        out[name] = QTensor(q=q, scales=tensors[key], zeros=None, w_bit=8, group_size=q.shape[1])
    return out
