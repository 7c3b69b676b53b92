"""A quantization config in the field's words: "FP16", "RTN w4 g64", "AWQ w4 g64 (search+clip) + KV int8". One
label function per method: its config class's `label_detail` (harness.config), or AWQ's entry in LABELS; the report's rows, the web page's variants and the benchmarks' rows
all name a config through `config_label`. Works on plain dicts (a record's config), so readers of old records and
live configs share it."""
from __future__ import annotations

import dataclasses
from typing import Callable

from harness.config import QUANT_CONFIGS, WeightQuantConfig, group_text
from harness.registry import Registry

# detail (group size and variant) and a sort key within the method, from the quant config as a dict: AWQ's here, since
# its records (and the report) are read without importing quant; every other method's label is its config class's
# `label_detail` (harness.config.QuantConfig; WeightQuantConfig's "g64" serves RTN and any weight-only method)
LABELS: Registry[Callable[[dict], tuple[str, tuple]]] = Registry("row label (by quant.method)")
METHOD_ORDER = ["fp16", "rtn", "awq"]  # rows: FP16 first, then baselines, then methods; others alphabetically after


@LABELS.register("awq")
def _label_awq(q):
    # Lin et al. 2023: scale search (Sec. 3.2) + weight clipping; LMDeploy's `lite auto_awq` default is a fixed
    # smoothing ratio with neither search nor clipping.
    search, clip, ratio = q.get("search_scale", True), q.get("clip", True), q.get("smooth_ratio", 0.5)
    if search:
        variant, rank = ("search+clip" if clip else "search"), 0 if clip else 1
    elif not clip and ratio == 0.5:
        variant, rank = "LMDeploy smoothing", 2
    else:
        variant, rank = f"smoothing α={ratio:g}" + ("+clip" if clip else ""), 3
    if q.get("duo_scaling"):
        variant += ", duo"
    if q.get("layer_overrides"):
        variant += ", overrides"
    return f"{group_text(q)} ({variant})", (rank,)


@LABELS.register("smoothquant")
def _label_smoothquant(q):
    # Xiao et al. 2023: weights and activations both in 8 bits (LMDeploy's `lite smooth_quant`), migration strength α
    return f"W8A8 {q.get('dtype', 'int8').replace('_', ' ')} (α={q.get('alpha', 0.5):g})", ()


NAMES = {"fp16": "FP16", "smoothquant": "SmoothQuant", "awq_gptq": "AWQ+GPTQ"}  # else the method's name in capitals


def method_name(q: dict) -> str:
    m = q.get("method", "fp16")
    if m == "recipe":  # a list of steps (quant/recipe.py): its methods in order
        return "→".join(method_name(s) for s in q.get("steps", [])) or "recipe"
    return NAMES.get(m, m.upper())


def method_detail(q: dict) -> tuple[str, tuple]:
    m = q.get("method", "fp16")
    if m in LABELS:
        return LABELS.get(m)(q)
    return (QUANT_CONFIGS.get(m) if m in QUANT_CONFIGS else WeightQuantConfig).label_detail(q)


def kv_text(kv_bits: int, kv_format: str = "int") -> str:
    if kv_bits == 16:
        return ""
    return f" + KV int{kv_bits}" if kv_format == "int" else f" + KV {kv_format.replace('_', ' ')}"


def backend_text(backend: str) -> str:
    return "" if backend in ("hf", None) else f" [{backend}]"


def config_label(quant, kv_bits: int = 16, backend: str = "hf", kv_format: str = "int") -> str:
    """`quant`: a QuantConfig or its dict. The text of a report row for that config (a KV cache of `kv_bits` in
    `kv_format`: int, fp8_e4m3, fp8_e5m2)."""
    q = dataclasses.asdict(quant) if dataclasses.is_dataclass(quant) else dict(quant)
    bits = "" if q.get("method", "fp16") == "fp16" or q.get("w_bit") is None else f" w{q.get('w_bit')}"
    detail = method_detail(q)[0]
    return f"{method_name(q)}{bits}{(' ' + detail) if detail else ''}{kv_text(kv_bits, kv_format)}{backend_text(backend)}"
