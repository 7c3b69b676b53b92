"""Export to the AWQ "GEMM" checkpoint format (AutoAWQ's WQLinear_GEMM), which LMDeploy reads with
`model_format='awq'` and transformers/AutoAWQ read through `quantization_config`; and load such a checkpoint back,
dequantized, for CPU evaluation without autoawq.

Layout per quantized Linear `<name>` (out_features N, in_features K, G = K / group_size groups), as AutoAWQ's
`WQLinear_GEMM` buffers (awq/modules/linear/gemm.py, `__init__` and `from_linear`, casper-hansen/AutoAWQ@88e4c76):
  `<name>.qweight` int32 [K, N/8]: the codes transposed to [K, N], eight 4-bit codes per int32 along N, the code of
                   column 8c + AWQ_ORDER[i] in bits 4i..4i+3 of word c;
  `<name>.qzeros`  int32 [G, N/8]: the integer zero points, packed the same way;
  `<name>.scales`  fp16  [G, N].
Dequantization: w[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]. LMDeploy unpacks with the inverse order
(lmdeploy/turbomind/weight_format.py `_unpack_awq_gemm`, AutoAWQ awq/utils/packing_utils.py `reverse_awq_order`).
Tensor names are the architecture's checkpoint names (quant/export/names.py): a mixture of experts' routed experts
one Linear each, e.g. Mixtral `block_sparse_moe.experts.<e>.w1.qweight`, Qwen3-MoE `mlp.experts.<e>.gate_proj.qweight`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from harness.moe_unfuse import unfuse_experts
from quant.export.names import CheckpointNames
from quant.primitives import QTensor, pack_int4_pairs, unpack_int4_pairs

if sys.byteorder != "little":  # the int32 words are built from bytes below
    raise ImportError("quant.export.awq assumes a little-endian machine")

AWQ_BITS = 4
AWQ_PACK = 32 // AWQ_BITS  # codes per int32
# AutoAWQ's GEMM interleave (gemm.py `order_map`, packing_utils.py AWQ_ORDER): slot i of a word holds column ORDER[i]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in slot REVERSE[j]
WEIGHTS_FILE = "model.safetensors"
META_FILE = "quant_meta.json"


class AWQExportError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Pure packing
# ---------------------------------------------------------------------------------------------------------------

def _pack_cols(x: torch.Tensor) -> torch.Tensor:
    """[R, C] integers 0..15 -> int32 [R, C/8], AWQ GEMM order along C.

    Slot i of a word is bits 4i..4i+3, i.e. the low (even i) or high (odd i) nibble of little-endian byte i // 2; so
    the words are the interleaved codes packed two per byte, low nibble first, viewed as int32 (this equals AutoAWQ's
    `qweight[:, col] |= code << (i * 4)` loop bit for bit, sign bit included)."""
    r, c = x.shape
    if c % AWQ_PACK:
        raise AWQExportError(f"AWQ GEMM packs {AWQ_PACK} codes per int32 along out_features; {c} is not a multiple of {AWQ_PACK}")
    x = x.to(torch.uint8).reshape(r, c // AWQ_PACK, AWQ_PACK)[..., list(AWQ_ORDER)].reshape(r, c)
    return pack_int4_pairs(x).contiguous().view(torch.int32)


def _unpack_cols(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] -> uint8 [R, C], the inverse of `_pack_cols`."""
    r = words.shape[0]
    slots = unpack_int4_pairs(words.contiguous().view(torch.uint8)).reshape(r, -1, AWQ_PACK)
    return slots[..., list(AWQ_REVERSE_ORDER)].reshape(r, -1)


def _check_bits_and_zero_point(w_bit: int, zero_point: bool, at: str) -> None:
    if w_bit != AWQ_BITS:
        raise AWQExportError(f"quant.w_bit={w_bit}{at}: the AWQ GEMM format is 4-bit only; export with quant.w_bit=4")
    if not zero_point:
        raise AWQExportError(f"quant.zero_point=False{at}: the AWQ GEMM format stores unsigned codes with a zero point; "
                             f"export needs quant.zero_point=True")


def check_awq_config(cfg, model=None) -> None:
    """Whether a run's quant config (harness.config.QuantConfig) can be written as an AWQ GEMM checkpoint, before any
    quantization: 4 bits with a zero point, and one group size dividing every quantized Linear's in_features of
    `model` (any module tree with the real shapes, e.g. built on the meta device)."""
    if cfg.method == "fp16":
        raise AWQExportError("quant.method=fp16: nothing is quantized, so there is no AWQ checkpoint to write; "
                             "choose a 4-bit method, e.g. quant=awq_w4 or quant=rtn_w4")
    from quant import METHODS

    if getattr(cfg, "format", "int") != "int":  # FP4 codes: quant/export/compressed_tensors.py
        raise AWQExportError(f"quant.format: {cfg.format} — the AWQ GEMM format holds integer codes only — export "
                             f"FP4 codes in the compressed-tensors format, or quant.format=int (e.g. quant=rtn_w4)")
    own = METHODS.get(cfg.method).export_formats(cfg)
    if "awq" not in own:  # e.g. SmoothQuant W8A8: another format (its class's formats), no w_bit/group_size at all
        awq_methods = [m for m in METHODS if "awq" in METHODS.get(m).formats]
        other = f"its checkpoint format is {', '.join(own)}" if own else "it has none"
        raise AWQExportError(f"quant.method: {cfg.method} — the AWQ GEMM format holds the codes of the weight-only "
                             f"methods ({', '.join(awq_methods)}); {other} — export one of those, e.g. quant=awq_w4")
    _check_bits_and_zero_point(cfg.w_bit, cfg.zero_point, "")
    if cfg.group_size == -1:
        raise AWQExportError("quant.group_size=-1 (per channel): AWQ's quantization_config holds one group size; "
                             "export with a group size that divides every in_features, e.g. 64")
    if model is None:
        return
    from quant.surgery import plan_layers, quantizable_linears

    try:
        plan = plan_layers(model, cfg)
    except ValueError as e:
        raise AWQExportError(str(e).splitlines()[0]) from None
    fallbacks = plan.fallbacks
    for name, spec in plan.quantized().items():  # layer overrides: skipped layers stay FP16 (modules_to_not_convert)
        _check_bits_and_zero_point(spec.w_bit, spec.zero_point, f" ({name}, quant.layer_overrides)")
        if spec.group_size != cfg.group_size and not spec.fell_back:
            raise AWQExportError(f"quant.layer_overrides: {name} has group size {spec.group_size}, the others "
                                 f"{cfg.group_size}; AWQ's quantization_config holds one group size")
    if fallbacks:
        raise AWQExportError(f"quant.group_size={cfg.group_size} does not divide in_features of {len(fallbacks)} layers "
                             f"(first: {fallbacks[0]}), which group_fallback=per_channel would quantize per channel; "
                             f"AWQ's quantization_config holds one group size")
    for name, lin in quantizable_linears(model).items():
        if lin.out_features % AWQ_PACK:
            raise AWQExportError(f"out_features={lin.out_features} ({name}) is not a multiple of {AWQ_PACK}, which AWQ "
                                 f"GEMM packing needs")


def check_awq_gemm(qt: QTensor, where: str = "") -> None:
    at = f" ({where})" if where else ""
    _check_bits_and_zero_point(qt.w_bit, qt.zeros is not None, at)
    out, inn = qt.q.shape
    if inn % qt.group_size:
        raise AWQExportError(f"quant.group_size={qt.group_size}{at} does not divide in_features={inn}")
    if out % AWQ_PACK:
        raise AWQExportError(f"out_features={out}{at} is not a multiple of {AWQ_PACK}, which AWQ GEMM packing needs")


def pack_awq_gemm(q: torch.Tensor, zeros: torch.Tensor, w_bit: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes q [out, in] (0..15) and integer zeros [out, G] -> (qweight int32 [in, out/8], qzeros int32 [G, out/8])."""
    if w_bit != AWQ_BITS:
        raise AWQExportError(f"quant.w_bit={w_bit}: the AWQ GEMM format is 4-bit only")
    if zeros is None:
        raise AWQExportError("quant.zero_point=False: the AWQ GEMM format needs integer zero points")
    if int(q.min()) < 0 or int(q.max()) > 15 or int(zeros.min()) < 0 or int(zeros.max()) > 15:
        raise AWQExportError("AWQ GEMM codes and zero points must lie in 0..15")
    if not torch.equal(zeros, zeros.round()):
        raise AWQExportError("AWQ GEMM zero points must be integers")
    return _pack_cols(q.t()), _pack_cols(zeros.t())


def unpack_awq_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, w_bit: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact inverse of `pack_awq_gemm`: -> (q uint8 [out, in], zeros float32 [out, G])."""
    if w_bit != AWQ_BITS:
        raise AWQExportError(f"quant.w_bit={w_bit}: the AWQ GEMM format is 4-bit only")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise AWQExportError(f"AWQ GEMM qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    return _unpack_cols(qweight).t().contiguous(), _unpack_cols(qzeros).t().float().contiguous()


def qtensor_to_awq(qt: QTensor) -> dict[str, torch.Tensor]:
    """The three AWQ GEMM tensors of one Linear (suffix -> tensor)."""
    qweight, qzeros = pack_awq_gemm(qt.q, qt.zeros, qt.w_bit)
    return {"qweight": qweight, "qzeros": qzeros, "scales": qt.scales.t().to(torch.float16).contiguous()}


def awq_to_qtensor(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> QTensor:
    q, zeros = unpack_awq_gemm(qweight, qzeros)
    n_groups = scales.shape[0]
    if q.shape[1] % n_groups:
        raise AWQExportError(f"AWQ scales have {n_groups} groups, which does not divide in_features={q.shape[1]}")
    return QTensor(q, scales.t().float().contiguous(), zeros, AWQ_BITS, q.shape[1] // n_groups)


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------

def _check_weights_match(model: nn.Module, qtensors: dict[str, QTensor]) -> None:
    """The model's fake-quantized Linear weights must be the QTensors' dequantization (up to the model dtype's
    rounding): otherwise the checkpoint would not hold what was evaluated."""
    modules = dict(model.named_modules())
    for name, qt in qtensors.items():
        w = modules[name].weight.detach()
        deq = qt.dequantize(torch.float32)
        step = qt.scales.repeat_interleave(qt.group_size, dim=1)
        tol = 0.25 * step + deq.abs() * torch.finfo(w.dtype).eps
        if bool(((w.float() - deq).abs() > tol).any()):
            bad = ((w.float() - deq).abs() / step).max().item()
            raise AWQExportError(f"{name}: the model's weight differs from its QTensor's dequantization by up to "
                                 f"{bad:.2f} quantization steps; the QTensors do not describe this model's weights")


def _check_model(model: nn.Module, qtensors: dict[str, QTensor], check_qt, check_weights: bool, error=None):
    """The QTensors fit this model's Linears (and the format: `check_qt(qt, name)`); lm_head tied to the embedding is
    not among them; with check_weights, the model holds their dequantization. Returns (modules, out_emb, tied).
    (Shared with quant/export/gptq.py.)"""
    error = error or AWQExportError
    if not qtensors:
        raise error("export: no quantized Linears given")
    modules = dict(model.named_modules())
    for name, qt in qtensors.items():
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear):
            raise error(f"{name}: not an nn.Linear of this model")
        if tuple(qt.q.shape) != tuple(mod.weight.shape):
            raise error(f"{name}: QTensor shape {tuple(qt.q.shape)} != weight shape {tuple(mod.weight.shape)}")
        check_qt(qt, name)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    if tied and any(modules[n] is out_emb for n in qtensors):
        raise error("the output embedding (lm_head) is tied to the input embedding: quantizing it would "
                    "quantize the embedding table too; leave lm_head unquantized")
    if check_weights:
        _check_weights_match(model, qtensors)
    return modules, out_emb, tied


def unquantized_linears(model: nn.Module, qtensors: dict) -> list[str]:
    """Every Linear-like module left in the model dtype, by module name: unquantized nn.Linears (lm_head, skipped
    layers) and a mixture of experts' routers and shared-expert gates (harness.architectures MoE.kept), which
    transformers 5 builds as other modules. (Shared with quant/export/compressed_tensors.py.)"""
    from harness.architectures import ARCHITECTURES, architecture_for

    out = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in qtensors}
    if getattr(model.config, "model_type", None) in ARCHITECTURES and (arch := architecture_for(model)).moe is not None:
        out |= {f"{arch.blocks}.{i}.{k}" for i in range(len(model.get_submodule(arch.blocks))) for k in arch.moe.kept()}
    return sorted(out)


def _quantization_config(qtensors: dict[str, QTensor], skipped: list[str]) -> dict:
    group_sizes = {qt.group_size for qt in qtensors.values()}
    if len(group_sizes) != 1:
        raise AWQExportError(f"quant.group_size: AWQ's quantization_config holds one group size, the QTensors use "
                             f"{sorted(group_sizes)}")
    # the keys lmdeploy/lite/apis/auto_awq.py writes (LMDeploy asserts version == 'gemm')
    cfg = {"quant_method": "awq", "version": "gemm", "bits": AWQ_BITS, "group_size": group_sizes.pop(),
           "zero_point": True}
    if skipped:
        cfg["modules_to_not_convert"] = skipped
    return cfg


def export_awq(model: nn.Module, qtensors: dict[str, QTensor], out_dir, tokenizer=None,
               quant_meta: dict | None = None, check_weights: bool = True, manifest: dict | None = None) -> Path:
    """Write an AWQ GEMM checkpoint to out_dir (replacing it if present: the caller decides whether it may,
    harness.outputs), atomically; with `manifest`, harness.outputs.MANIFEST is written in it too. Returns out_dir."""
    modules, out_emb, tied = _check_model(model, qtensors, check_awq_gemm, check_weights, AWQExportError)
    names = CheckpointNames(model)  # the architecture's checkpoint names (an MoE's experts: quant/export/names.py)

    tensors = {names(k): t for k, t in _plain_tensors(model, qtensors).items()}
    for name, qt in qtensors.items():
        for suffix, t in qtensor_to_awq(qt).items():
            tensors[f"{names.module(name)}.{suffix}"] = t

    skipped = sorted(names.module(n) for n in unquantized_linears(model, qtensors) if modules.get(n) is not out_emb)
    qcfg = _quantization_config(qtensors, skipped)
    config = model.config.to_dict()
    config["quantization_config"] = qcfg
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)

    any_qt = next(iter(qtensors.values()))
    meta = {
        "format": "awq-gemm",
        "w_bit": any_qt.w_bit,
        "group_size": any_qt.group_size,
        "zero_point": True,
        "n_quantized_linears": len(qtensors),
        "tied_word_embeddings": tied,
        "quantized_packed_bytes": sum(qt.nbytes_packed() for qt in qtensors.values()),
        # LMDeploy 0.18 TurboMind takes AWQ at group_size 128 only (turbomind/converter.py _SUPPORTED_GROUP_SIZES);
        # its PyTorch engine takes any group size dividing in_features (a Triton kernel with BLOCK_SIZE_K = group)
        "lmdeploy_engines": ["pytorch", "turbomind"] if any_qt.group_size == 128 else ["pytorch"],
        "file_bytes": None,  # filled below
        **(quant_meta or {}),
    }

    return _write_dir(out_dir, tensors, config, meta, model, tokenizer, manifest=manifest)


def _plain_tensors(model: nn.Module, qtensors: dict) -> dict[str, torch.Tensor]:
    """Every tensor that is not a quantized weight, as fp16; tied tensors (lm_head = embed_tokens) are written once,
    under the first name, as save_pretrained does. (Shared with quant/export/gptq.py.)"""
    quantized_weights = {f"{n}.weight" for n in qtensors}
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        if key in quantized_weights:
            continue
        ident = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = (t.detach().to(torch.float16) if t.is_floating_point() else t.detach()).contiguous().clone()
    return tensors


def _write_dir(out_dir, tensors: dict, config: dict, meta: dict, model: nn.Module, tokenizer,
               extra_json: dict | None = None, manifest: dict | None = None) -> Path:
    """Write a checkpoint directory atomically (weights, config.json, quant_meta.json with file_bytes, any extra
    JSON files, and last the manifest naming them all when `manifest` is given); an existing out_dir is replaced.
    (Shared with quant/export/gptq.py.)"""
    from safetensors.torch import save_file

    from harness.assets import atomic_directory

    with atomic_directory(out_dir) as tmp:  # a killed writer leaves nothing at out_dir (and is cleaned up next time)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for fname, obj in (extra_json or {}).items():
            (tmp / fname).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta["file_bytes"] = (tmp / WEIGHTS_FILE).stat().st_size
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        if manifest is not None:
            from harness.outputs import write_manifest

            write_manifest(tmp, manifest)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------------------------
# Load back (no autoawq needed)
# ---------------------------------------------------------------------------------------------------------------

def _read(directory) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    d = Path(directory)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise AWQExportError(f"{d}: no .safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    config = json.loads((d / "config.json").read_text())
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") != "awq" or qcfg.get("version", "gemm").lower() != "gemm":
        raise AWQExportError(f"{d}: not an AWQ GEMM checkpoint (quantization_config={qcfg})")
    if qcfg.get("bits", 4) != AWQ_BITS or not qcfg.get("zero_point", True):
        raise AWQExportError(f"{d}: quantization_config bits={qcfg.get('bits')} zero_point={qcfg.get('zero_point')}; "
                             f"only 4-bit with zero point is AWQ GEMM")
    return tensors, config


def _split(tensors: dict[str, torch.Tensor], group_size: int):
    qt: dict[str, QTensor] = {}
    for key in [k for k in tensors if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        qt[name] = awq_to_qtensor(tensors[key], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"])
        if qt[name].group_size != group_size:
            raise AWQExportError(f"{name}: group size {qt[name].group_size} != quantization_config.group_size {group_size}")
    packed = {f"{n}.{suffix}" for n in qt for suffix in ("qweight", "qzeros", "scales")}
    plain = {k: v for k, v in tensors.items() if k not in packed}  # a quantized Linear's bias stays here
    return qt, plain


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def load_awq_qtensors(directory) -> dict[str, QTensor]:
    """The codes of every quantized Linear, keyed by its checkpoint name (a Mixtral expert: `...experts.<e>.w1`)."""
    tensors, config = _read(directory)
    return _split(tensors, int(config["quantization_config"]["group_size"]))[0]


def load_awq_dequantized(directory, dtype: torch.dtype = torch.float32):
    """A transformers model whose Linears hold w = (q - z) * s (scales as stored, fp16), in `dtype`, on CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tensors, config = _read(directory)
    qtensors, plain = _split(tensors, int(config["quantization_config"]["group_size"]))
    cfg = AutoConfig.from_pretrained(str(directory))
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # build a plain model: the Linears get dequantized weights, not AWQ modules
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every parameter is overwritten below; random init would cost seconds
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.tie_weights()
    unfuse_experts(model)  # a mixture of experts: per-expert Linears, as the checkpoint stores them
    key = CheckpointNames(model).inverse(model)  # checkpoint name -> the model's own
    state = {key.get(k, k): v.to(dtype) if v.is_floating_point() else v for k, v in plain.items()}
    for name, qt in qtensors.items():
        state[f"{key.get(name, name)}.weight"] = qt.dequantize(torch.float32).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise AWQExportError(f"{directory}: tensors the model does not have: {unexpected[:5]}")
    out_emb = model.get_output_embeddings()
    if out_emb is not None and out_emb.weight is model.get_input_embeddings().weight:  # tied: written once
        missing = [k for k in missing if k != f"{_module_name(model, out_emb)}.weight"]
    if missing:
        raise AWQExportError(f"{directory}: the checkpoint lacks {missing[:5]}")
    return model.eval()
