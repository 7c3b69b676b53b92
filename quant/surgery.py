"""Model surgery shared by the methods: find the Linears to quantize, settle each one's spec (bits, group size, weight
format, or skipped, with the config's per-layer overrides: `plan_layers`, before any long work), and replace a Linear's
weight by its quantize-dequantize image while keeping the codes (integer, or FP4: quant/formats/fp4.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from harness.architectures import ARCHITECTURES, Architecture, architecture_for, get_blocks
from harness.config import ConfigError, WeightQuantConfig, user_error
from quant.formats.fp4 import FP4Tensor, check_blocks, quantize_fp4
from quant.primitives import QTensor, check_group_size, quantize_tensor


def quantizable_linears(model, arch: Architecture | None = None) -> dict[str, nn.Linear]:
    """Qualified name -> Linear for every Linear the layer map quantizes (lm_head and embeddings never are)."""
    arch = arch or architecture_for(model)
    out = {}
    for i, block in enumerate(get_blocks(model, arch)):
        for rel in arch.linears:
            out[f"{arch.blocks}.{i}.{rel}"] = block.get_submodule(rel)
    return out


@dataclass(frozen=True)
class LayerSpec:
    """How one Linear is quantized: the method's w_bit / group size / zero point, or a layer override's; `skip`
    keeps it unquantized (no codes, no export packing, FP16 in the bytes). `format`: the grid a rounding step rounds
    to (int, or nvfp4 / mxfp4 with group_size the format's block and no zero point: WeightQuantConfig.validate)."""

    w_bit: int
    group_size: int
    zero_point: bool
    skip: bool = False
    override: int | None = None  # index into quant.layer_overrides of the entry that decided, if any
    fell_back: bool = False  # the group size asked for did not divide in_features: per channel (group_fallback)
    format: str = "int"


@dataclass
class LayerPlan:
    """One LayerSpec per quantizable Linear (qualified name), settled before any long work."""

    specs: dict[str, LayerSpec]
    fallbacks: list[str] = field(default_factory=list)  # group size did not divide: per channel (group_fallback)

    def quantized(self) -> dict[str, LayerSpec]:
        return {n: s for n, s in self.specs.items() if not s.skip}

    def summary(self) -> dict:
        """For the record's quant summary: which layers the overrides changed, and to what (empty without any)."""
        changed = {n: ({"skip": True} if s.skip else {"w_bit": s.w_bit, "group_size": s.group_size})
                   for n, s in self.specs.items() if s.override is not None}
        if not changed:
            return {}
        return {"layer_overrides": changed, "layers_skipped": sorted(n for n, s in self.specs.items() if s.skip)}


def group_size_for(in_features: int, cfg: WeightQuantConfig, name: str, group_size: int | None = None) -> int:
    """The group size used for a layer (`group_size`, default cfg.group_size); with group_fallback=per_channel a
    non-dividing size becomes -1 (recorded)."""
    g = cfg.group_size if group_size is None else group_size
    try:
        check_group_size(in_features, g, name)
        return g
    except ValueError:
        if cfg.group_fallback == "per_channel":
            return -1
        raise


def layer_spec(name: str, in_features: int, cfg: WeightQuantConfig) -> LayerSpec:
    """The spec of one Linear: the first quant.layer_overrides entry matching its name decides (fields left null keep
    the method's), then the group-size fallback."""
    i, o = next(((i, o) for i, o in enumerate(cfg.layer_overrides) if o.matches(name)), (None, None))
    w_bit = cfg.w_bit if o is None or o.w_bit is None else o.w_bit
    g = cfg.group_size if o is None or o.group_size is None else o.group_size
    if o is not None and o.skip:  # never quantized; a group size that fits still serves AWQ's per-group statistics
        return LayerSpec(w_bit, g if g == -1 or in_features % g == 0 else -1, cfg.zero_point, skip=True, override=i,
                         format=cfg.format)
    if cfg.format != "int":  # the block is the format's: a layer it does not divide is refused (no fallback)
        check_blocks(in_features, cfg.format, name)
        return LayerSpec(w_bit, g, cfg.zero_point, override=i, format=cfg.format)
    used = group_size_for(in_features, cfg, name, g)
    return LayerSpec(w_bit, used, cfg.zero_point, override=i, fell_back=used != g)


def _check_overrides_match(cfg: WeightQuantConfig, names: list[str]) -> None:
    """An override whose pattern names no quantized Linear is a typo that would silently change nothing."""
    for i, o in enumerate(cfg.layer_overrides):
        if not any(o.matches(n) for n in names):
            raise ConfigError(f"quant.layer_overrides[{i}].pattern: {o.pattern!r} matches no quantized Linear — "
                              f"names look like {names[0] if names else '(none)'} — use a glob (model.layers.*.mlp.*) "
                              f"or re:<regex> over such names")


def _check_something_quantized(cfg: WeightQuantConfig, specs: dict[str, LayerSpec]) -> None:
    """Overrides that skip every Linear leave the FP16 model, which a record would label as the method."""
    if specs and all(s.skip for s in specs.values()):
        patterns = ", ".join(o.pattern for o in cfg.layer_overrides if o.skip)
        raise user_error("quant.layer_overrides", f"skip {patterns}", f"every Linear is skipped ({len(specs)} of "
                         f"{len(specs)}): nothing would be quantized, yet the row would be labelled {cfg.method}",
                         "use quant=fp16 for the unquantized model, or narrow the skip patterns")


def plan_layers(model, cfg: WeightQuantConfig) -> LayerPlan:
    """A LayerSpec per quantized Linear; raises before any long work on a bad group size, an unmatched override, or
    overrides that skip every Linear."""
    linears = quantizable_linears(model)
    _check_overrides_match(cfg, list(linears))
    plan = LayerPlan({})
    for name, lin in linears.items():
        spec = plan.specs[name] = layer_spec(name, lin.in_features, cfg)
        if spec.fell_back:
            plan.fallbacks.append(name)
    _check_something_quantized(cfg, plan.specs)
    return plan


def plan_group_sizes(model, cfg: WeightQuantConfig) -> tuple[dict[str, int], list[str]]:
    """Group size per quantized Linear (skipped ones left out), and the layers that fell back (plan_layers)."""
    plan = plan_layers(model, cfg)
    return {n: s.group_size for n, s in plan.quantized().items()}, plan.fallbacks


def check_group_sizes(cfg: WeightQuantConfig, hf_config: dict) -> None:
    """plan_layers from the model's config.json alone, so a group size that does not divide a layer, or overrides that
    skip every Linear, fail before the model loads (the layer map gives each Linear's in_features; an unknown architecture is left to the method)."""
    if not isinstance(cfg, WeightQuantConfig) or hf_config.get("model_type") not in ARCHITECTURES:
        return
    try:
        tensors = ARCHITECTURES.get(hf_config["model_type"]).tensors(hf_config)
    except KeyError:  # a config.json without the usual dimension names: the method checks the loaded model
        return
    linears = [t for t in tensors if t.kind == "linear"]
    _check_overrides_match(cfg, [t.name for t in linears])
    _check_something_quantized(cfg, {t.name: layer_spec(t.name, t.shape[1], cfg) for t in linears})


@torch.no_grad()
def quantize_linear_(linear: nn.Linear, w_bit: int, group_size: int, zero_point: bool,
                     fmt: str = "int") -> QTensor | FP4Tensor:
    """Quantize a Linear's weight in place to its dequantized image, rounded to nearest on the integer grid or in an
    FP4 format (`fmt`: a LayerSpec's format; w_bit, group_size and zero_point are then the format's); return the
    codes."""
    if fmt == "int":
        qt = quantize_tensor(linear.weight.data, w_bit, group_size, zero_point)
    else:
        qt = quantize_fp4(linear.weight.data, fmt)
    linear.weight.data.copy_(qt.dequantize(linear.weight.dtype))
    return qt


def format_summary(cfg: WeightQuantConfig) -> dict:
    """The summary's entry for a weight format other than the integer grid (none for int: summaries as before)."""
    return {} if cfg.format == "int" else {"format": cfg.format}
